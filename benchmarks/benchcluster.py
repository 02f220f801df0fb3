"""The embedded cluster in its own process, with its request log on tap.

``python -m benchmarks.benchcluster KUBECONFIG``

Theory of operation
-------------------
The same thing as ``python -m kuberun_trio embedded-cluster`` (HTTPS, a
kubeconfig written to KUBECONFIG), plus a line protocol on stdin that the
benchmark orchestrator uses, one JSON line of reply per command:

* ``log SEQ`` -- request-log entries with ``seq >= SEQ``; their times are
  converted from ``trio.current_time()`` (which carries a random offset) to
  ``time.monotonic()``, the clock every benchmark process shares;
* ``pods`` -- pods the API server holds and sandboxes the kubelet runs.

EOF on stdin shuts the cluster down (every pod is killed first).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import attrs
import trio

from kuberun_trio.cluster import open_embedded_cluster

from .procstats import raise_fd_limit


async def main(kubeconfig: Path) -> None:
    async with open_embedded_cluster(https=True, kubeconfig_path=kubeconfig) as cluster:
        print("ready", flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            command, *args = line.split()
            if command == "log":
                since = int(args[0]) if args else 0
                offset = trio.current_time() - time.monotonic()
                entries = [{**attrs.asdict(e), "time": e.time - offset,
                            "received": e.received - offset}
                           for e in cluster.request_log.since(since)]
                print(json.dumps(entries), flush=True)
            elif command == "pods":
                stats = cluster.kubelet.statistics()
                print(json.dumps({"pods": cluster.store.count("pods", "default"),
                                  "sandboxes": stats["pods"]}),
                      flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


if __name__ == "__main__":
    raise_fd_limit()
    trio.run(main, Path(sys.argv[1]))
