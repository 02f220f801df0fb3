"""Port forwarding (direct-tcpip) through the in-process gateway: asyncssh as the client.

The decisions (:mod:`kuberun_trio.core.forwarding`) are tested as pure functions; the
gateway's behaviour with an in-process embedded cluster, whose pods share this host's
network (a listener of the test is "in the pod"), and whose request log shows that every
port-forward stream closed before the pod's DELETE.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import trio
import trio_asyncio
from gatewaykit import Rig, open_rig

from kuberun_trio.core.forwarding import (
    FORWARDING_DISABLED,
    ForwardingPolicy,
    PodAddress,
    Refused,
    ViaPodNetwork,
    ViaPortForward,
    command_problems,
    judge,
)
from kuberun_trio.core.limits import Limits
from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.server.config import parse_server_config

ON = ForwardingPolicy(enabled=True)
POD = PodAddress("kuberun-abc", ("10.1.2.3",))


# == the decision ==============================================================================

@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.1", "::1", "[::1]",
                                  "kuberun-abc", "10.1.2.3", "0:0:0:0:0:0:0:1"])
def test_the_pod_itself_goes_through_port_forward(host: str) -> None:
    assert judge(ON, host, 8080, POD) == ViaPortForward(8080)


def test_other_destinations_are_refused_with_a_reason() -> None:
    verdict = judge(ON, "example.com", 80, POD)
    assert isinstance(verdict, Refused) and "podNetworkCommand" in verdict.reason
    assert judge(ForwardingPolicy(), "localhost", 80, POD) == Refused(FORWARDING_DISABLED)
    assert isinstance(judge(ON, "localhost", 0, POD), Refused)
    assert isinstance(judge(ON, "127.0.0.2", 80, POD), Refused)  # not the pod's address


def test_pod_network_command_gets_host_and_port_as_argv_elements() -> None:
    policy = ForwardingPolicy(enabled=True, pod_network_command=("nc", "{host}", "{port}"))
    assert judge(policy, "db.internal", 5432, POD) == \
        ViaPodNetwork(("nc", "db.internal", "5432"))
    assert judge(policy, "localhost", 5432, POD) == ViaPortForward(5432)
    for host in ("-e/bin/sh", "a b", "$(reboot)", "x;y", "", "a" * 300):
        assert isinstance(judge(policy, host, 80, POD), Refused), host


def test_pod_network_command_problems() -> None:
    assert command_problems(["nc", "{host}", "{port}"]) == []
    assert command_problems([]) != []
    assert command_problems(["nc", "{hots}", "{port}"]) == \
        ["element 1: unknown placeholder {hots} (only {host} and {port})"]
    assert command_problems(["nc", "{host}"]) == ["must contain {host} and {port}"]


def test_pod_address_from_status() -> None:
    pod = {"status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}}
    assert PodAddress.of("p", pod) == PodAddress("p", ("10.0.0.5", "fd00::5"))


# == configuration ============================================================================

def test_config_keys_and_defaults() -> None:
    assert parse_server_config({}, instance="gw").security.forwarding.policy() == \
        ForwardingPolicy()
    config = parse_server_config({"security": {"forwarding": {
        "forwardingMode": "enable", "podNetworkCommand": ["nc", "{host}", "{port}"]}}},
        instance="gw")
    assert config.security.forwarding.policy() == ForwardingPolicy(
        enabled=True, pod_network_command=("nc", "{host}", "{port}"))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config({"security": {"forwarding": {
            "forwardingMode": "yes", "podNetworkCommand": ["nc", "{hostname}", "{port}"]}}},
            instance="gw")
    errors = info.value.errors if isinstance(info.value, ConfigErrors) else (info.value,)
    assert {e.path: e.problem for e in errors} == {
        "security.forwarding.forwardingMode": "must be enable or disable, got 'yes'",
        "security.forwarding.podNetworkCommand":
            "element 1: unknown placeholder {hostname} (only {host} and {port})"}
    with pytest.raises(ConfigError) as info:
        parse_server_config({"security": {"forwarding": {"agentForwarding": "x"}}},
                            instance="gw")
    assert "security.forwarding.agentForwarding" in str(info.value)


def test_the_demo_enables_forwarding() -> None:
    import argparse

    from kuberun_trio.server.settings import apply_flags

    args = argparse.Namespace()
    demo = apply_flags({}, args, "embedded")
    assert demo["security"]["forwarding"]["forwardingMode"] == "enable"
    said = {"security": {"forwarding": {"forwardingMode": "disable"}}}
    assert apply_flags(said, args, "embedded")["security"]["forwarding"][
        "forwardingMode"] == "disable"  # what the file says wins
    assert "security" not in apply_flags({}, args, "kubeconfig")


# == through the gateway =======================================================================

async def echo_server(nursery: trio.Nursery) -> int:
    """A TCP echo server on this host (where the embedded cluster's pods live)."""
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def aio(fn: Any, *args: Any) -> Any:
    return await trio_asyncio.aio_as_trio(fn)(*args)


async def roundtrip(conn: asyncssh.SSHClientConnection, host: str, port: int,
                    data: bytes) -> bytes:
    async def go() -> bytes:
        reader, writer = await conn.open_connection(host, port)
        writer.write(data)
        got = await reader.readexactly(len(data))
        writer.close()
        return got

    result: bytes = await aio(go)
    return result


async def open_failure(conn: asyncssh.SSHClientConnection, host: str,
                       port: int) -> asyncssh.ChannelOpenError:
    async def go() -> asyncssh.ChannelOpenError:
        try:
            await conn.open_connection(host, port)
        except asyncssh.ChannelOpenError as exc:
            return exc
        raise AssertionError("the channel opened")

    exc: asyncssh.ChannelOpenError = await aio(go)
    return exc


async def no_pods(rig: Rig) -> None:
    with trio.fail_after(15):
        while rig.pods():
            await trio.sleep(0.05)


async def test_forward_to_the_pod_and_streams_closed_before_delete(tmp_path: Path) -> None:
    async with trio.open_nursery() as servers:
        port = await echo_server(servers)
        async with open_rig(tmp_path, options={"forwarding": ON}) as rig:
            conn = await rig.connect()
            assert await roundtrip(conn, "localhost", port, b"hello pod") == b"hello pod"
            pod = rig.pods()[0]["metadata"]["name"]

            async def hold() -> Any:  # a forward left open, with data in flight
                reader, writer = await conn.open_connection(pod, port)
                writer.write(b"x" * 100_000)
                writer.write_eof()  # no half-close: the stream stays
                await reader.readexactly(100_000)
                return writer

            await aio(hold)
            conn.close()
            await no_pods(rig)
            entries = rig.cluster.request_log.for_pod("default", pod)
            forwards = [e for e in entries if e.kind == "exec-close" and "portforward" in e.path]
            deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
            assert len(forwards) == 2 and len(deletes) == 1
            assert max(e.time for e in forwards) < deletes[0].received
            assert rig.gateway.metrics.sample("kuberun_forwards_total",
                                              {"result": "opened"}) == 2
            assert rig.gateway.metrics.sample("kuberun_api_requests_total", {
                "verb": "create", "resource": "pods/portforward", "code": "101"}) == 2
        servers.cancel_scope.cancel()


async def test_refused_and_failed_opens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_rig(tmp_path, options={"forwarding": ON}) as rig:
        conn = await rig.connect()
        closed = free_port()
        failed = await open_failure(conn, "127.0.0.1", closed)
        assert failed.code == asyncssh.OPEN_CONNECT_FAILED
        assert "connection refused" in failed.reason
        line = next(r for r in caplog.records if getattr(r, "event", "") == "forward-failed")
        assert "connection refused" in line.getMessage() and str(closed) in line.getMessage()
        other = await open_failure(conn, "example.com", 80)
        assert other.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert "only the pod itself" in other.reason
        refused = [r for r in caplog.records if getattr(r, "event", "") == "request-refused"]
        assert any(getattr(r, "destination", "") == "example.com:80" for r in refused)
        # the connection lives on: a session still runs
        result = await aio(conn.run, "echo still here")
        assert result.stdout == "still here\n"
        metrics = rig.gateway.metrics
        assert metrics.sample("kuberun_forwards_total", {"result": "failed"}) == 1
        assert metrics.sample("kuberun_forwards_total", {"result": "refused"}) == 1
        conn.close()
        await no_pods(rig)


async def test_forwarding_disabled_by_default(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        exc = await open_failure(conn, "localhost", 22)
        assert exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert exc.reason == FORWARDING_DISABLED
        assert not rig.pods() or all(
            "portforward" not in e.path for e in rig.cluster.request_log.entries)
        conn.close()
        await no_pods(rig)


async def test_forwards_count_against_max_sessions(tmp_path: Path) -> None:
    async with trio.open_nursery() as servers:
        port = await echo_server(servers)
        async with open_rig(tmp_path, Limits(max_sessions=2), options={"forwarding": ON}) as rig:
            conn = await rig.connect()

            async def two_then_one() -> tuple[list[Any], asyncssh.ChannelOpenError]:
                held = [await conn.open_connection("localhost", port) for _ in range(2)]
                try:
                    await conn.open_connection("localhost", port)
                except asyncssh.ChannelOpenError as exc:
                    return held, exc
                raise AssertionError("a third channel opened")

            held, exc = await aio(two_then_one)
            assert exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            assert "too many sessions" in exc.reason
            held[0][1].close()  # one closes: a new one fits again

            async def again() -> None:
                for _ in range(50):
                    try:
                        reader, writer = await conn.open_connection("localhost", port)
                    except asyncssh.ChannelOpenError:
                        await asyncio_sleep(0.05)
                        continue
                    writer.write(b"ok")
                    assert await reader.readexactly(2) == b"ok"
                    return
                raise AssertionError("the closed forward was not given back")

            await aio(again)
            conn.close()
            await no_pods(rig)
        servers.cancel_scope.cancel()


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.mark.parametrize("how", ["evict", "kill"])
async def test_pod_lost_with_a_forward_open(tmp_path: Path, how: str) -> None:
    async with trio.open_nursery() as servers:
        port = await echo_server(servers)
        async with open_rig(tmp_path, options={"forwarding": ON}) as rig:
            conn = await rig.connect()  # forwards only, no session (ssh -N -L)

            async def hold() -> Any:
                reader, writer = await conn.open_connection("localhost", port)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                return reader

            reader = await aio(hold)
            pod = rig.pods()[0]["metadata"]["name"]
            await getattr(rig.cluster.faults, how)("default", pod)
            with trio.fail_after(10):
                assert await aio(reader.read) == b""  # the channel ends
                await aio(conn.wait_closed)  # and the connection, as with sessions
            await no_pods(rig)
            entries = rig.cluster.request_log.for_pod("default", pod)
            assert any(e.kind == "exec-close" and "portforward" in e.path for e in entries)
        servers.cancel_scope.cancel()


RELAY = """
import socket, sys, threading
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
except OSError as exc:
    sys.exit(f"relay: {exc.strerror.lower()}")
s.settimeout(None)
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""


async def test_pod_network_command_reaches_other_hosts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import sys

    caplog.set_level(logging.INFO)
    policy = ForwardingPolicy(enabled=True,
                              pod_network_command=(sys.executable, "-c", RELAY, "{host}", "{port}"))
    async with trio.open_nursery() as servers:
        port = await echo_server(servers)
        async with open_rig(tmp_path, options={"forwarding": policy}) as rig:
            conn = await rig.connect()
            # 127.0.0.2 is not the pod: the relay runs in the pod and connects there
            assert await roundtrip(conn, "127.0.0.2", port, b"via the pod") == b"via the pod"

            async def half_close() -> bytes:  # the command's stdin closes on the client's EOF
                reader, writer = await conn.open_connection("127.0.0.2", port)
                writer.write(b"abc")
                writer.write_eof()
                got: bytes = await reader.read()  # the echo server closes: EOF comes back
                return got

            with trio.fail_after(10):
                assert await aio(half_close) == b"abc"
            closed = free_port()
            failed = await open_failure(conn, "127.0.0.2", closed)
            assert failed.code == asyncssh.OPEN_CONNECT_FAILED
            assert failed.reason.endswith(f"127.0.0.2:{closed} from the pod: connection refused")
            refused = await open_failure(conn, "-oProxyCommand=x", 22)
            assert refused.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            conn.close()
            await no_pods(rig)
            opened = [e.path.rsplit("/", 1)[-1] for e in rig.cluster.request_log.entries
                      if e.kind == "exec-open"]
            assert opened == ["exec"] * 3  # one exec per channel, no port-forward
        servers.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if getattr(r, "via", "") == "exec"]
    assert any("ended" in line for line in lines) and any("failed" in line for line in lines)


MiB = 1024 * 1024


async def settled(read: Any, *, quiet: float = 1.0, within: float = 30) -> int:
    """A growing counter's value once it has not moved for ``quiet`` seconds."""
    with trio.fail_after(within):
        value, since = read(), trio.current_time()
        while trio.current_time() - since < quiet:
            await trio.sleep(0.05)
            if (now := read()) != value:
                value, since = now, trio.current_time()
        return int(value)


async def test_forward_backpressure_both_ways(tmp_path: Path) -> None:
    """A pod side that does not read stops the client's writes, a client that does not read
    stops the pod side's writes -- after a bounded number of bytes -- and nothing is lost."""
    total, bound = 32 * MiB, 16 * MiB
    sent, received, gate = [0], [0], trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await serve_one(stream)

    async def serve_one(stream: trio.SocketStream) -> None:
        what = await stream.receive_some(1)
        if what == b"D":  # download: write until the client stops reading
            block = b"d" * (256 * 1024)
            while sent[0] < total:
                await stream.send_all(block)
                sent[0] += len(block)
        else:  # upload: read only once the gate opens
            await gate.wait()
            while received[0] < total:
                data = await stream.receive_some(1024 * 1024)
                if not data:
                    break
                received[0] += len(data)
            await stream.send_all(b"done")

    async with trio.open_nursery() as servers:
        listeners = await servers.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        async with open_rig(tmp_path, options={"forwarding": ON}) as rig:
            conn = await rig.connect()
            reader, writer = await aio(conn.open_connection, "localhost", port)
            writer.write(b"D")
            got = len(await aio(reader.readexactly, MiB))
            writer.channel.pause_reading()  # the client stops reading
            stuck = await settled(lambda: sent[0])
            assert stuck < got + bound, stuck / MiB
            writer.channel.resume_reading()
            while got < total:
                got += len(await aio(reader.read, 4 * MiB))
            assert got == total

            reader, writer = await aio(conn.open_connection, "localhost", port)
            progress = [0]

            async def feed() -> None:
                writer.write(b"U")
                block = b"u" * (256 * 1024)
                while progress[0] < total:
                    writer.write(block)
                    await writer.drain()
                    progress[0] += len(block)

            async with trio.open_nursery() as feeding:
                feeding.start_soon(aio, feed)
                stuck = await settled(lambda: progress[0])  # drain() blocks
                assert stuck < bound, stuck / MiB
                gate.set()
            assert await aio(reader.readexactly, 4) == b"done"
            assert received[0] == total
            conn.close()
            await no_pods(rig)
        servers.cancel_scope.cancel()


async def test_concurrent_forwards_and_a_forward_before_the_pod_is_ready(tmp_path: Path) -> None:
    import os

    async with trio.open_nursery() as servers:
        port = await echo_server(servers)
        async with open_rig(tmp_path, Limits(max_sessions=20),
                            options={"forwarding": ON}) as rig:
            rig.cluster.faults.delay_start(1.0)  # the first channel waits for the pod
            conn = await rig.connect()
            payloads = [os.urandom(256 * 1024 + i) for i in range(12)]
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await roundtrip(conn, "localhost", port, payloads[i])

            with trio.fail_after(30):
                started = trio.current_time()
                await one(0)  # opened before the pod was Ready: answered once it is
                assert trio.current_time() - started >= 0.9
                async with trio.open_nursery() as nursery:
                    for i in range(1, 12):
                        nursery.start_soon(one, i)
            assert [results[i] == payloads[i] for i in range(12)] == [True] * 12
            pod = rig.pods()[0]["metadata"]["name"]
            conn.close()
            await no_pods(rig)
            streams = [e for e in rig.cluster.request_log.for_pod("default", pod)
                       if e.kind == "exec-open" and "portforward" in e.path]
            assert len(streams) == 12  # one WebSocket per channel
        servers.cancel_scope.cancel()
