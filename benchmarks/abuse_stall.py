"""Pods left after an API stall longer than ``timeouts.podStop`` (goal: 0 within one sweep).

``python -m benchmarks.abuse_stall [--connections N] [--sweep SECONDS] [--json FILE]``

An embedded cluster and a gateway (with its Lease, reaper and sweeps) run in this
process. The API server is stalled (``faults.stall()``: every request held), N asyncssh
clients connect and ask for a command; each connection's pod create times out
(``timeouts.http``), its clean-up times out (``timeouts.podStop``), the clients get an
error. Then the API server resumes: the held creates go through late and make pods
nobody owns. The result records how many such pods appeared, how many were left at the
end of one sweep interval after the resume (goal 0), and when the last one went.
:func:`measure_stall` is the function ``benchmarks.abuse`` calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncssh
import trio
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.podtemplate import LABEL_INSTANCE
from kuberun_trio.gateway.lease import LeaseOptions
from kuberun_trio.gateway.reaper import GcOptions
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway

INSTANCE = "bench-stall"


async def _client(port: int, key: asyncssh.SSHKey) -> str:
    async def go() -> str:
        try:
            async with asyncssh.connect("127.0.0.1", port, username="bench", client_keys=[key],
                                        known_hosts=None) as conn:
                result = await conn.run("echo through", check=False)
                return f"exit {result.exit_status}"
        except (OSError, asyncssh.Error) as exc:
            return type(exc).__name__

    outcome: str = await trio_asyncio.aio_as_trio(go)()
    return outcome


async def measure_stall(*, connections: int = 5, http: float = 1.0, pod_stop: float = 2.0,
                        sweep: float = 5.0) -> dict[str, Any]:
    """Stall past ``pod_stop`` while ``connections`` clients connect; count pods left."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    with tempfile.TemporaryDirectory(prefix="abuse-stall-") as tmp:
        async with open_aio_loop(), open_embedded_cluster(
                https=True, kubeconfig_path=Path(tmp) / "kubeconfig") as cluster:
            kubernetes = parse_config({
                "connection": {"kubeconfig": str(cluster.kubeconfig_path)},
                "timeouts": {"http": http, "podStop": pod_stop, "podStart": 30}})
            options = GatewayOptions(
                kubernetes=kubernetes,
                authenticator=PublicKeyAuthenticator([key.export_public_key("openssh").decode()]),
                host_keys=(host_key.export_private_key("openssh"),), port=0, instance=INSTANCE,
                lease=LeaseOptions(namespace="default"),
                gc=GcOptions(sweep_interval=sweep, startup_sweep=True))
            created: list[str] = []
            changes = cluster.store.subscribe()

            def mine() -> list[str]:
                return [p["metadata"]["name"] for p in cluster.pods()
                        if p["metadata"]["labels"].get(LABEL_INSTANCE) == INSTANCE
                        and not p["metadata"].get("deletionTimestamp")]

            async with open_gateway(options) as gateway, trio.open_nursery() as nursery:
                async def record() -> None:
                    async for type_, pod in changes:
                        if type_ == "ADDED":
                            created.append(pod["metadata"]["name"])

                nursery.start_soon(record)
                cluster.faults.stall()
                stalled_at = trio.current_time()
                outcomes: list[str] = []

                async def one() -> None:
                    outcomes.append(await _client(gateway.address[1], key))

                async with trio.open_nursery() as clients:
                    for _ in range(connections):
                        clients.start_soon(one)
                await trio.sleep(max(0.0, stalled_at + http + pod_stop + 1 - trio.current_time()))
                stall_s = trio.current_time() - stalled_at
                cluster.faults.resume()
                resumed = trio.current_time()
                peak, last_seen = 0, 0.0
                while trio.current_time() - resumed < sweep:
                    left = mine()
                    peak = max(peak, len(left))
                    if left:
                        last_seen = trio.current_time() - resumed
                    await trio.sleep(0.05)
                left_after_sweep = len(mine())
                reaper = gateway.reaper
                assert reaper is not None
                result = {
                    "connections": connections, "stall_s": round(stall_s, 2),
                    "timeouts": {"http_s": http, "pod_stop_s": pod_stop},
                    "sweep_interval_s": sweep,
                    "client_outcomes": sorted(outcomes),
                    "held_requests": cluster.faults.stalled_requests,
                    "pods_created": len(created),
                    "pods_left_peak_after_resume": peak,
                    "pods_left_after_one_sweep": left_after_sweep,
                    "last_pod_gone_after_s": round(last_seen, 2),
                    "reaped_by_retry": reaper.pods_reaped,
                    "deleted_by_sweep": reaper.orphan_pods_deleted,
                    "goal": "pods_left_after_one_sweep == 0",
                }
                nursery.cancel_scope.cancel()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse_stall",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--sweep", type=float, default=5.0, help="gc.sweepInterval (s)")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the expected failures are not news here
    result = trio.run(lambda: measure_stall(connections=args.connections, sweep=args.sweep))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["pods_left_after_one_sweep"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
