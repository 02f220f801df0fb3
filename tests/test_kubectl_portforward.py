"""``kubectl port-forward`` against the embedded cluster, with the real kubectl binaries.

The newest kubectl speaks SPDY tunnelled in a WebSocket (``SPDY/3.1+portforward.k8s.io``,
a GET); kubectl 1.30 upgrades to SPDY directly (a POST). Pods run on the host, so the
"pod" serves HTTP on a free loopback port with ``python3 -m http.server``.
"""

from __future__ import annotations

import re
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from support import (
    kubectl_id,
    kubectl_version,
    kubectl_versions,
    require_kubectl,
    require_tools,
)
from test_kubectl_conformance import kc

from kuberun_trio.cluster import EmbeddedCluster


@pytest.fixture(params=kubectl_versions() or ["kubectl"],
                ids=lambda p: kubectl_id(p) if kubectl_versions() else "kubectl-missing")
def kubectl(request: pytest.FixtureRequest) -> str:
    require_kubectl()
    return str(request.param)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def start_pod(cluster: EmbeddedCluster, kubectl: str, *command: str) -> str:
    name = f"pf-{uuid.uuid4().hex[:8]}"
    await kc(cluster, kubectl, "run", name, "--image=busybox", "--restart=Never", "--", *command)
    await kc(cluster, kubectl, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=30s")
    return name


async def http_pod(cluster: EmbeddedCluster, kubectl: str, port: int) -> str:
    name = await start_pod(cluster, kubectl, sys.executable, "-m", "http.server", str(port),
                           "--bind", "127.0.0.1")
    with trio.fail_after(10):  # the server listens a moment after the pod is Ready
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return name
            except OSError:
                await trio.sleep(0.05)


class PortForward:
    """A running ``kubectl port-forward``: its local port, its output so far."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc, self.out, self.err = proc, b"", b""
        self.local = 0

    async def _read(self, which: str) -> None:
        stream = self.proc.stdout if which == "out" else self.proc.stderr
        assert stream is not None
        async for chunk in stream:
            setattr(self, which, getattr(self, which) + chunk)


Start = Callable[..., Awaitable[PortForward]]


@pytest.fixture
async def forward() -> AsyncIterator[Start]:
    """Start ``kubectl port-forward ARGS...`` and wait for its local port; killed at the end."""
    async with trio.open_nursery() as nursery:

        async def start(cluster: EmbeddedCluster, kubectl: str, *args: str) -> PortForward:
            proc = await trio.lowlevel.open_process(
                [kubectl, "--kubeconfig", str(cluster.kubeconfig_path), "port-forward", *args],
                stdout=-1, stderr=-1)
            pf = PortForward(proc)
            nursery.start_soon(pf._read, "out")
            nursery.start_soon(pf._read, "err")
            with trio.fail_after(15):
                while not (m := re.search(rb"Forwarding from 127\.0\.0\.1:(\d+)", pf.out)):
                    assert proc.poll() is None, f"kubectl exited: {pf.err!r}"
                    await trio.sleep(0.05)
            pf.local = int(m[1])
            procs.append(proc)
            return pf

        procs: list[trio.Process] = []
        try:
            yield start
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                await proc.wait()
            nursery.cancel_scope.cancel()


async def http_get(port: int, path: str = "/") -> tuple[bytes, bytes]:
    """One HTTP/1.0 request through the forward: ``(status line, body)``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def spdy_requests(cluster: EmbeddedCluster, pod: str) -> list[str]:
    return [e.method for e in cluster.request_log.for_pod("default", pod)
            if e.kind == "http" and e.path.endswith("/portforward") and e.status == 101]


async def test_http_through_kubectl_port_forward(
    cluster: EmbeddedCluster, kubectl: str, forward: Start
) -> None:
    require_tools("curl")
    port = free_port()
    pod = await http_pod(cluster, kubectl, port)
    pf = await forward(cluster, kubectl, f"pod/{pod}", f"0:{port}")
    got = await trio.run_process(["curl", "-sS", "-m", "10", f"http://127.0.0.1:{pf.local}/"],
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert got.returncode == 0, got.stderr
    assert b"Directory listing" in got.stdout
    results: dict[int, tuple[bytes, bytes]] = {}

    async def fetch(i: int) -> None:
        results[i] = await http_get(pf.local, f"/?n={i}")

    async with trio.open_nursery() as nursery:  # concurrent connections, one kubectl
        for i in range(8):
            nursery.start_soon(fetch, i)
    assert all(status.endswith(b" 200 OK") and b"Directory listing" in body
               for status, body in results.values()) and len(results) == 8
    # 1.31+: the WebSocket tunnel (GET), no fallback; 1.30: the plain SPDY upgrade (POST)
    assert spdy_requests(cluster, pod) == (["GET"] if kubectl_version(kubectl) >= (1, 31)
                                           else ["POST"])
    assert b"error" not in pf.err.lower()


async def test_nothing_listening_is_the_kubelets_error(
    cluster: EmbeddedCluster, kubectl: str, forward: Start
) -> None:
    pod = await start_pod(cluster, kubectl, "sleep", "3600")
    closed = free_port()
    pf = await forward(cluster, kubectl, f"pod/{pod}", f"0:{closed}")
    uid = cluster.store.get_pod("default", pod)["metadata"]["uid"]
    stream = await trio.open_tcp_stream("127.0.0.1", pf.local)
    with trio.fail_after(10):
        assert await stream.receive_some(1024) == b""  # the data stream closes: EOF
        assert await pf.proc.wait() == 1
    await stream.aclose()
    err = pf.err.decode().replace('\\"', '"')  # 1.31+ logs it as a quoted klog value
    assert (f"an error occurred forwarding {pf.local} -> {closed}: error forwarding port {closed} "
            f"to pod {uid}, uid : failed to execute portforward in network namespace "
            f'"/var/run/netns/cni-{uid}": failed to connect to localhost:{closed} inside '
            f'namespace "{uid}", IPv4: dial tcp4 127.0.0.1:{closed}: connect: connection '
            f"refused IPv6 dial tcp6 [::1]:{closed}: connect: connection refused ") in err
    assert err.rstrip().endswith("error: lost connection to pod")


async def test_pod_deleted_while_forwarding(
    cluster: EmbeddedCluster, kubectl: str, forward: Start
) -> None:
    port = free_port()
    pod = await http_pod(cluster, kubectl, port)
    pf = await forward(cluster, kubectl, f"pod/{pod}", f"0:{port}")
    held = await trio.open_tcp_stream("127.0.0.1", pf.local)  # a connection kept open
    await held.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # an unfinished request
    await trio.sleep(0.2)
    await kc(cluster, kubectl, "delete", "pod", pod, "--grace-period=0", "--force", "--wait=false")
    with trio.fail_after(10):
        while await held.receive_some(65536):  # the stream ends with the pod
            pass
    await held.aclose()
    late = await trio.open_tcp_stream("127.0.0.1", pf.local)  # a new one finds no sandbox
    with trio.fail_after(10):
        assert await late.receive_some(1024) == b""
        assert await pf.proc.wait() == 1
    await late.aclose()
    assert b"in store: not found" in pf.err and b"lost connection to pod" in pf.err
