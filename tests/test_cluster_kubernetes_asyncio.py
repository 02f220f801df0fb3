"""The embedded cluster through kubernetes-asyncio, the client the gateway uses.

Covers the v4 exec path (no half-close), v5 half-close, port-forward to a port
a pod listens on, and a watch that resumes after a forced 410.
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
import trio
import trio_asyncio
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster

F = TypeVar("F", bound=Callable[..., Any])


def leaks_ws_transport(test: F) -> F:
    """For the tests that use kubernetes-asyncio's own ``WsApiClient``.

    Now and then that client leaves the aiohttp transport of a closed WebSocket
    unclosed, reported as an unraisable ResourceWarning when it is collected.
    That is the client library's, not the cluster's (the gateway's own leak
    tests count file descriptors instead). Only these tests mute it, and they
    collect garbage at teardown so the leak surfaces within them, never in a
    later test that does not mute it.
    """
    test = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")(test)
    marked: F = pytest.mark.usefixtures("collect_garbage")(test)
    return marked


@pytest.fixture
def collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


async def with_api(cluster: EmbeddedCluster, fn: Callable[[client.CoreV1Api], Awaitable[Any]],
                   *, ws: bool = False) -> Any:
    async def inner() -> Any:
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(cluster.kubeconfig_path),
                                      client_configuration=cfg)
        api_client = (
            client.ApiClient(cfg) if not ws else __import__(
                "kubernetes_asyncio.stream", fromlist=["WsApiClient"]).WsApiClient(cfg))
        async with api_client:
            return await fn(client.CoreV1Api(api_client))

    return await trio_asyncio.aio_as_trio(inner)()


def pod_body(name: str, *command: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"app": "t"}},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "c", "image": "busybox",
                                     "command": list(command or ("sleep", "3600"))}]}}


async def start_pod(cluster: EmbeddedCluster, *command: str) -> str:
    name = f"k-{uuid.uuid4().hex[:8]}"

    async def create_and_wait(v1: client.CoreV1Api) -> None:
        await v1.create_namespaced_pod("default", pod_body(name, *command))
        async with watch.Watch() as w:
            async for event in w.stream(v1.list_namespaced_pod, "default",
                                        field_selector=f"metadata.name={name}",
                                        timeout_seconds=30):
                if event["object"].status.phase == "Running":
                    w.stop()

    await with_api(cluster, create_and_wait)
    return name


async def exec_frames(cluster: EmbeddedCluster, pod: str, command: list[str], stdin: bytes,
                      protocol: str) -> tuple[dict[int, bytes], dict[str, Any], str | None]:
    async def run(v1: client.CoreV1Api) -> tuple[dict[int, bytes], dict[str, Any], str | None]:
        out: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
        ws_cm = await v1.connect_get_namespaced_pod_exec(
            pod, "default", command=command, stdin=True, stdout=True, stderr=True, tty=False,
            _preload_content=False, _headers={"sec-websocket-protocol": protocol})
        async with ws_cm as ws:
            chosen = ws._response.headers.get("Sec-WebSocket-Protocol")
            await ws.send_bytes(b"\x00" + stdin)
            if chosen == "v5.channel.k8s.io":
                await ws.send_bytes(b"\xff\x00")
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                if len(msg.data) > 1:
                    out[msg.data[0]] += msg.data[1:]
                if chosen != "v5.channel.k8s.io" and out[1].endswith(b"EOF\n"):
                    break  # v4: no half-close, the client ends the session by closing
        status = json.loads(out[3]) if out[3] else {}
        return out, status, chosen

    result: tuple[dict[int, bytes], dict[str, Any], str | None] = await with_api(
        cluster, run, ws=True)
    return result


@leaks_ws_transport
async def test_exec_v5_half_close(cluster: EmbeddedCluster, aio_loop: None) -> None:
    pod = await start_pod(cluster)
    out, status, chosen = await exec_frames(
        cluster, pod, ["sh", "-c", "wc -c; echo err >&2; exit 4"], b"hello",
        "v5.channel.k8s.io,v4.channel.k8s.io")
    assert chosen == "v5.channel.k8s.io"
    assert out[1].strip() == b"5" and out[2] == b"err\n"
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0] == {"reason": "ExitCode", "message": "4"}
    assert "command terminated with exit code 4" in status["message"]


@leaks_ws_transport
async def test_exec_v4_has_no_half_close(cluster: EmbeddedCluster, aio_loop: None) -> None:
    pod = await start_pod(cluster)
    # ``cat`` never sees EOF on v4: the client must close the socket itself.
    out, status, chosen = await exec_frames(
        cluster, pod, ["sh", "-c", "head -c 3; echo; echo EOF; cat"], b"abc", "v4.channel.k8s.io")
    assert chosen == "v4.channel.k8s.io"
    assert out[1] == b"abc\nEOF\n"
    assert status == {}


@leaks_ws_transport
async def test_default_exec_status_success(cluster: EmbeddedCluster, aio_loop: None) -> None:
    pod = await start_pod(cluster)

    async def run(v1: client.CoreV1Api) -> str:
        text: str = await v1.connect_get_namespaced_pod_exec(
            pod, "default", command=["echo", "hi there"], stdout=True, stderr=True)
        return text

    assert await with_api(cluster, run, ws=True) == "hi there\n"


@leaks_ws_transport
async def test_port_forward(cluster: EmbeddedCluster, aio_loop: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = (f"import socket;s=socket.create_server(('127.0.0.1',{port}))\n"
              "while True:c,_=s.accept();d=c.recv(100);c.sendall(d.upper());c.close()")
    pod = await start_pod(cluster, sys.executable, "-c", server)
    await accepting(port)  # the pod's process shares this host's network

    async def forward(v1: client.CoreV1Api) -> list[bytes]:
        frames: list[bytes] = []
        ws_cm = await v1.connect_get_namespaced_pod_portforward(
            pod, "default", ports=str(port), _preload_content=False)
        async with ws_cm as ws:
            await ws.send_bytes(b"\x00ping")
            async for msg in ws:
                frames.append(msg.data)
                if b"PING" in b"".join(f[1:] for f in frames if f[0] == 0):
                    break
        return frames

    frames = await with_api(cluster, forward, ws=True)
    prefix = port.to_bytes(2, "little")
    assert frames[0] in (b"\x00" + prefix, b"\x01" + prefix)
    assert {frames[0], frames[1]} == {b"\x00" + prefix, b"\x01" + prefix}
    assert b"".join(f[1:] for f in frames[2:] if f[0] == 0) == b"PING"


async def accepting(port: int) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    with trio.fail_after(30):
        while True:
            try:
                probe = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
            else:
                await probe.aclose()
                return


async def test_watch_resumes_and_sees_forced_410(cluster: EmbeddedCluster, aio_loop: None) -> None:
    async def scenario(v1: client.CoreV1Api) -> tuple[list[str], int]:
        listed = await v1.list_namespaced_pod("default")
        rv = listed.metadata.resource_version
        await v1.create_namespaced_pod("default", pod_body("w-one"))
        seen = []
        async with watch.Watch() as w:
            async for event in w.stream(v1.list_namespaced_pod, "default", resource_version=rv,
                                        timeout_seconds=5):
                seen.append(f"{event['type']} {event['object'].metadata.name}")
                w.stop()
        cluster.faults.expire_watches()
        try:
            async with watch.Watch() as w:
                async for _ in w.stream(v1.list_namespaced_pod, "default",
                                        resource_version=rv, timeout_seconds=5):
                    pass
        except ApiException as exc:
            return seen, int(exc.status)
        return seen, 0

    seen, code = await with_api(cluster, scenario)
    assert seen == ["ADDED w-one"]
    assert code == 410


async def test_unauthorized_without_token(cluster: EmbeddedCluster, aio_loop: None) -> None:
    async def get() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(
                cluster.url + "/api/v1/namespaces/default/pods", ssl=False) as resp:
            return resp.status, await resp.json()

    status, body = await trio_asyncio.aio_as_trio(get)()
    assert status == 401
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
