"""Health and readiness: the endpoints, and readiness during start, drain, and API trouble."""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path
from typing import Any

import trio
from lifecyclekit import StallProxy
from observekit import aio, http_get, open_observed

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.observe import GatewayMetrics, HealthEndpoint, Readiness
from kuberun_trio.observe.service import EndpointAddresses, serve_endpoints


async def _until(path: str, address: tuple[str, int] | None, status: int,
                 within: float = 15.0) -> bytes:
    with trio.fail_after(within):
        while True:
            got, body = await http_get(address, path)
            if got == status:
                return body
            await trio.sleep(0.1)


async def test_ready_gateway_answers_ok_everywhere(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        health = rig.gateway.endpoints.health
        assert await _until("/readyz", health, 200) == b"ok"
        assert await http_get(health, "/healthz") == (200, b"ok")
        assert await http_get(health, "/any/path") == (200, b"ok")
        assert rig.gateway.ready
        assert rig.gateway.readiness.reasons() == []


async def _alive() -> None:
    return None


async def test_not_ready_before_listening_and_on_a_failing_condition() -> None:
    readiness = Readiness()
    readiness.watch_api(time.monotonic, grace=5)
    async with trio.open_nursery() as nursery:
        addresses: EndpointAddresses = await nursery.start(functools.partial(
            serve_endpoints, GatewayMetrics(process=False), readiness, _alive,
            metrics_at=None, health_at=HealthEndpoint("127.0.0.1", 0)))
        health = addresses.health
        assert await http_get(health, "/readyz") == (503, b"not ok")
        assert await http_get(health, "/") == (503, b"not ok")
        assert await http_get(health, "/healthz") == (200, b"ok")
        readiness.listening()
        assert await http_get(health, "/readyz") == (200, b"ok")
        readiness.set_unready("lease", "cannot renew the Lease")  # the hook for other parts
        assert await http_get(health, "/readyz") == (503, b"not ok")
        assert readiness.reasons() == ["lease: cannot renew the Lease"]
        readiness.set_ready("lease")
        assert await http_get(health, "/readyz") == (200, b"ok")
        nursery.cancel_scope.cancel()


async def test_liveness_fails_when_the_loop_does_not_answer() -> None:
    async def stuck() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        addresses: EndpointAddresses = await nursery.start(functools.partial(
            serve_endpoints, GatewayMetrics(process=False), Readiness(), stuck,
            metrics_at=None, health_at=HealthEndpoint("127.0.0.1", 0)))
        assert await http_get(addresses.health, "/healthz") == (503, b"not ok")
        nursery.cancel_scope.cancel()


async def test_not_ready_while_draining(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        health = rig.gateway.endpoints.health
        await _until("/readyz", health, 200)
        conn = await rig.connect()
        process = await aio(conn.create_process, "echo started; sleep 60")
        assert await aio(process.stdout.readline) == "started\n"
        rig.nursery.start_soon(rig.gateway.shutdown, 30.0)
        await _until("/readyz", health, 503)
        assert not rig.gateway.ready
        assert "draining for shutdown" in rig.gateway.readiness.reasons()
        assert await http_get(health, "/healthz") == (200, b"ok")
        assert rig.gateway.connections  # the session still runs
        process.close()
        conn.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_not_ready_while_the_api_server_is_unreachable(tmp_path: Path) -> None:
    async def nowhere(cluster: EmbeddedCluster, nursery: trio.Nursery) -> dict[str, Any]:
        return {"host": f"http://127.0.0.1:{_closed_port()}"}

    async with open_observed(tmp_path, connection=nowhere, timeouts={"http": "1s"}) as rig:
        health = rig.gateway.endpoints.health
        await trio.sleep(1.5)
        assert await http_get(health, "/readyz") == (503, b"not ok")
        assert await http_get(health, "/healthz") == (200, b"ok")
        assert rig.gateway.readiness.reasons() == ["the Kubernetes API has not answered yet"]


async def test_not_ready_while_the_api_server_stalls(tmp_path: Path) -> None:
    proxies: list[StallProxy] = []

    async def through_proxy(cluster: EmbeddedCluster, nursery: trio.Nursery) -> dict[str, Any]:
        proxy = StallProxy(("127.0.0.1", int(cluster.url.rsplit(":", 1)[1])))
        proxies.append(proxy)
        return {"host": f"http://127.0.0.1:{await nursery.start(proxy.serve)}"}

    async with open_observed(tmp_path, https=False, connection=through_proxy,
                             timeouts={"http": "1s"}) as rig:
        health = rig.gateway.endpoints.health
        await _until("/readyz", health, 200)
        rule = proxies[0].stall(b"GET /version", to="client")  # answers never come back
        started = trio.current_time()
        await _until("/readyz", health, 503)
        assert trio.current_time() - started >= 1.5  # not before timeouts.http x 2
        assert await http_get(health, "/healthz") == (200, b"ok")
        assert any("has not answered for" in r for r in rig.gateway.readiness.reasons())
        rule.release.set()
        await _until("/readyz", health, 200)
        assert rig.gateway.ready


async def test_http_server_bounds_what_a_client_can_send() -> None:
    async with trio.open_nursery() as nursery:
        addresses: EndpointAddresses = await nursery.start(functools.partial(
            serve_endpoints, GatewayMetrics(process=False), Readiness(), _alive,
            metrics_at=None, health_at=HealthEndpoint("127.0.0.1", 0)))
        assert addresses.health is not None

        async def exchange(request: bytes) -> bytes:
            stream = await trio.open_tcp_stream(*addresses.health)  # type: ignore[misc]
            async with stream:
                await stream.send_all(request)
                answer = b""
                with trio.fail_after(15):
                    try:
                        while chunk := await stream.receive_some(65536):
                            answer += chunk
                    except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                        pass
                return answer

        posted = await exchange(b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405 ")
        head = await exchange(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        huge = await exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
                              + b"a" * 40_000 + b"\r\n\r\n")
        assert not huge.startswith(b"HTTP/1.1 200")  # refused, not served
        nursery.cancel_scope.cancel()


async def test_a_readiness_of_our_own_survives_a_restart(tmp_path: Path) -> None:
    """An application marks a condition before the gateway runs; a second run after a
    shutdown starts undrained, and the condition still counts."""
    readiness = Readiness()
    readiness.set_unready("lease", "not acquired yet")
    for _ in range(2):
        async with open_observed(tmp_path, readiness=readiness) as rig:
            assert rig.gateway.readiness is readiness
            await trio.sleep(0.5)
            assert await http_get(rig.gateway.endpoints.health, "/readyz") == (503, b"not ok")
            assert readiness.reasons() == ["lease: not acquired yet"]
            readiness.set_ready("lease")
            await _until("/readyz", rig.gateway.endpoints.health, 200)
            await rig.gateway.shutdown(1.0)
            assert not rig.gateway.ready
            readiness.set_unready("lease", "not acquired yet")
