"""Embedded-cluster benchmark: pod start latency and exec stream throughput.

``python -m benchmarks.cluster [--pods N] [--mib M] [--json FILE]``

Measures, against an in-process embedded cluster over HTTPS, through
kubernetes-asyncio (the client the gateway uses):

* pod create → Running: p50 / p99 over N pods created one after another;
* exec stream MiB/s, pod → client (``head -c`` of M MiB from ``/dev/urandom``;
  the pod ``tee``s it into ``sha256sum``, whose digest on stderr must equal the
  client's digest of what it received) and client → pod (M MiB into ``wc -c``,
  whose count must equal the bytes sent);
* as a baseline measured in the same run, the same byte count through a local
  pipe into the same consumer (``head -c | wc -c``), so the ratio shows what
  the WebSocket hop costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trio
import trio_asyncio
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.stream import WsApiClient

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster

CHUNK = 64 * 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _configuration(cluster: EmbeddedCluster) -> client.Configuration:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.kubeconfig_path),
                                  client_configuration=cfg)
    return cfg


async def pod_start_latencies(cluster: EmbeddedCluster, count: int) -> list[float]:
    cfg = await _configuration(cluster)
    latencies = []
    async with client.ApiClient(cfg) as api_client:
        v1 = client.CoreV1Api(api_client)
        for _ in range(count):
            name = f"bench-{uuid.uuid4().hex[:8]}"
            body = {"metadata": {"name": name}, "spec": {"restartPolicy": "Never", "containers": [
                {"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}}
            start = time.perf_counter()
            created = await v1.create_namespaced_pod("default", body)
            async with watch.Watch() as w:
                async for event in w.stream(v1.list_namespaced_pod, "default",
                                            field_selector=f"metadata.name={name}",
                                            resource_version=created.metadata.resource_version,
                                            timeout_seconds=30):
                    if event["object"].status.phase == "Running":
                        w.stop()
            latencies.append(time.perf_counter() - start)
            await v1.delete_namespaced_pod(name, "default", grace_period_seconds=0)
    return latencies


async def exec_throughput(cluster: EmbeddedCluster, pod: str, mib: int) -> dict[str, float]:
    cfg = await _configuration(cluster)
    size = mib << 20
    result: dict[str, float] = {}
    async with WsApiClient(cfg) as ws_client:
        v1 = client.CoreV1Api(ws_client)
        proto = {"sec-websocket-protocol": "v5.channel.k8s.io"}
        # The pod hashes exactly what it sends: tee into a FIFO read by sha256sum.
        script = ('d=$(mktemp -d) && mkfifo "$d/f" && { sha256sum < "$d/f" >&2 & } && '
                  f'head -c {size} /dev/urandom | tee "$d/f"; wait; rm -r "$d"')
        cm = await v1.connect_get_namespaced_pod_exec(
            pod, "default", command=["sh", "-c", script],
            stdout=True, stderr=True, _preload_content=False, _headers=proto)
        digest, got, stderr = hashlib.sha256(), 0, b""
        start = time.perf_counter()
        async with cm as ws:
            async for msg in ws:
                if msg.data[0] == 1:
                    digest.update(msg.data[1:])
                    got += len(msg.data) - 1
                elif msg.data[0] == 2:
                    stderr += msg.data[1:]
        result["download_mib_s"] = mib / (time.perf_counter() - start)
        if got != size:
            raise SystemExit(f"download lost bytes: {got} != {size}")
        sent = stderr.split()[0].decode() if stderr.split() else f"nothing ({stderr!r})"
        if sent != digest.hexdigest():
            raise SystemExit(f"download corrupt: pod sent sha256 {sent}, "
                             f"client received {digest.hexdigest()}")
        cm = await v1.connect_get_namespaced_pod_exec(
            pod, "default", command=["sh", "-c", "wc -c"], stdin=True, stdout=True,
            _preload_content=False, _headers=proto)
        block = b"\x00" + b"u" * CHUNK
        start = time.perf_counter()
        async with cm as ws:
            for _ in range(size // CHUNK):
                await ws.send_bytes(block)
            await ws.send_bytes(b"\xff\x00")
            out = b""
            async for msg in ws:
                if msg.data[0] == 1:
                    out += msg.data[1:]
        result["upload_mib_s"] = mib / (time.perf_counter() - start)
        if int(out.strip() or 0) != size:
            raise SystemExit(f"upload lost bytes: {out!r} != {size}")
    return result


async def pipe_baseline(mib: int) -> float:
    start = time.perf_counter()
    await trio.run_process(["sh", "-c", f"head -c {mib << 20} /dev/urandom | wc -c"],
                           capture_stdout=True)
    return mib / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with open_aio_loop(), open_embedded_cluster(https=True) as cluster:
        latencies = await trio_asyncio.aio_as_trio(pod_start_latencies)(cluster, args.pods)
        name = f"bench-{uuid.uuid4().hex[:8]}"
        cluster.store.create_pod("default", {"metadata": {"name": name}, "spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}})
        with trio.fail_after(30):
            while cluster.store.get_pod("default", name)["status"].get("phase") != "Running":
                await trio.sleep(0.02)
        streams = await trio_asyncio.aio_as_trio(exec_throughput)(cluster, name, args.mib)
        baseline = await pipe_baseline(args.mib)
    return {
        "pods": args.pods,
        "pod_start_p50_ms": 1000 * statistics.median(latencies),
        "pod_start_p99_ms": 1000 * percentile(latencies, 0.99),
        **streams,
        "local_pipe_mib_s": baseline,
        "download_vs_pipe": streams["download_mib_s"] / baseline,
        "upload_vs_pipe": streams["upload_mib_s"] / baseline,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = trio.run(main, args)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}" if isinstance(value, float) else
              f"{key:<{width}}  {value:>10}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    cli()
