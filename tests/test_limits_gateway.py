"""Limits against a real asyncssh client (the attacker) and an in-process gateway.

The gateway runs through the embedding API (``GatewayOptions.limits``) on an
embedded cluster; the cluster's request log shows what reached the API server.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import pytest
import trio
from asyncssh.packet import String
from gatewaykit import Rig, kube_config
from test_gateway_sessions import aio, close, open_raw

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import open_embedded_cluster
from kuberun_trio.core.auth import AuthResult, PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.limits import Limits, MaxStartups
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway

LIMITS_LOG = "kuberun_trio.core.limits"


@contextlib.asynccontextmanager
async def open_limits_rig(tmp_path: Path, limits: Limits, *,
                          authenticator: type[PublicKeyAuthenticator] = PublicKeyAuthenticator,
                          timeouts: dict[str, str] | None = None,
                          **connection: Any) -> AsyncIterator[Rig]:
    """Cluster + gateway with ``limits`` (and ``kubernetes.connection`` extras such as qps,
    more ``kubernetes.timeouts``, another authenticator of the client's key)."""
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with open_aio_loop(), open_embedded_cluster(
            https=True, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2) as cluster:
        kubernetes = kube_config(cluster)
        if connection or timeouts:
            kubernetes = parse_config({
                "connection": {"kubeconfig": str(cluster.kubeconfig_path), **connection},
                "timeouts": {"podStart": "20s", "podStop": "10s", **(timeouts or {})}})
        options = GatewayOptions(
            kubernetes=kubernetes,
            authenticator=authenticator([client_key.export_public_key("openssh").decode()]),
            host_keys=(host_key.export_private_key("openssh"),), port=0,
            instance="limits-gw", limits=limits)
        async with open_gateway(options) as gateway:
            yield Rig(cluster, gateway, client_key, host_key)


def refusals(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "limit-refused"
            and getattr(r, "reason", None) == reason]


async def test_1000_channels_on_one_connection_get_exactly_max_sessions(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_limits_rig(tmp_path, Limits(max_sessions=10)) as rig:
        conn = await rig.connect()

        async def open_one() -> Any:
            return await conn.create_process("sleep 30", encoding=None)

        async def open_all() -> list[Any]:
            import asyncio

            return await asyncio.gather(*(open_one() for _ in range(1000)),
                                        return_exceptions=True)

        with trio.fail_after(60):
            results = await aio(open_all)
        opened = [r for r in results if isinstance(r, asyncssh.SSHClientProcess)]
        refused = [r for r in results if isinstance(r, asyncssh.ChannelOpenError)]
        assert len(opened) == 10, [r for r in results if not isinstance(
            r, asyncssh.SSHClientProcess | asyncssh.ChannelOpenError)][:3]
        assert len(refused) == 990
        assert refused[0].code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert refused[0].reason == "kuberun: too many sessions on this connection (limit 10)"
        assert len(refusals(caplog, "max-sessions")) == 990
        assert rig.gateway.metrics.sample("kuberun_requests_refused_total",
                                          {"request": "max-sessions"}) == 990
        # A closed session makes room for another.
        opened[0].close()
        await aio(opened[0].wait_closed)
        with trio.fail_after(20):
            result = await aio(conn.run, "echo again", check=True)
        assert result.stdout == "again\n"
        await close(conn)


async def test_200_connections_of_one_user_get_exactly_max_connections_per_user(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = Limits(max_connections_per_user=10, max_startups=MaxStartups.parse("1000"),
                    max_startups_per_address=1000)
    async with open_limits_rig(tmp_path, limits) as rig:
        async def attempt() -> Any:
            try:
                return await rig.connect("mallory")
            except (asyncssh.Error, OSError) as exc:
                return exc

        results: list[Any] = []

        async def one() -> None:
            results.append(await attempt())

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
        conns = [r for r in results if isinstance(r, asyncssh.SSHClientConnection)]
        refused = [r for r in results if isinstance(r, asyncssh.DisconnectError)]
        # A connection refused only after asyncssh's success message is closed at once:
        # count those that can run a command.
        alive = []
        for conn in conns:
            with trio.move_on_after(20):
                try:
                    if (await aio(conn.run, "true")).exit_status == 0:
                        alive.append(conn)
                except (asyncssh.Error, OSError):
                    pass
        assert len(alive) == 10
        assert len(refused) + len(conns) == 200, [r for r in results if not isinstance(
            r, asyncssh.SSHClientConnection | asyncssh.DisconnectError)][:3]
        assert refused, "no connection was refused"
        assert all(r.reason.startswith(
            "kuberun: too many connections for user 'mallory' (limit 10)") for r in refused)
        assert len(refusals(caplog, "max-connections-per-user")) == 190
        assert len({p["metadata"]["name"] for p in rig.pods()}) == 10
        other = await rig.connect("alice")  # another user is not affected
        assert (await aio(other.run, "echo ok")).stdout == "ok\n"
        for conn in [*conns, other]:
            await close(conn)


async def test_signal_flood_is_refused_not_queued(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_limits_rig(tmp_path, Limits(max_signals_per_second=5)) as rig:
        conn = await rig.connect()
        chan, _session = await aio(open_raw, conn, "trap 'echo got' USR1; "
                                  "while :; do sleep 0.1; done")
        with trio.fail_after(30):
            while True:  # the exec runs once the pod is ready
                pod = rig.pods()[0]["metadata"]["name"]
                if any(e.kind == "exec-open" for e in rig.cluster.request_log.for_pod(
                        "default", pod)):
                    break
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        before = len([e for e in rig.cluster.request_log.for_pod("default", pod)
                      if e.kind == "exec-open"])
        started = time.monotonic()

        async def flood() -> list[bool | None]:
            import asyncio

            return list(await asyncio.gather(*(chan.request(b"signal", String(b"USR1"))
                                               for _ in range(500))))

        answers = await aio(flood)
        took = time.monotonic() - started
        accepted = answers.count(True)
        assert answers.count(False) == 500 - accepted
        assert 1 <= accepted <= 5 + 5 * took + 1, (accepted, took)
        assert len(refusals(caplog, "signal-rate")) == 500 - accepted
        await trio.sleep(2)
        execs = [e for e in rig.cluster.request_log.for_pod("default", pod)
                 if e.kind == "exec-open"]
        assert len(execs) - before <= accepted
        chan.close()
        await close(conn)


async def test_exec_opens_go_through_the_qps_limiter(tmp_path: Path) -> None:
    qps, burst, sessions = 5.0, 2, 10
    async with open_limits_rig(tmp_path, Limits(max_sessions=sessions), qps=qps,
                               burst=burst) as rig:
        conn = await rig.connect()
        with trio.fail_after(30):
            assert (await aio(conn.run, "true")).exit_status == 0  # the pod is up
        await trio.sleep(burst / qps + 0.5)  # let the bucket fill up again
        log = rig.cluster.request_log
        mark = log.since(0)[-1].seq + 1

        async def many() -> list[Any]:
            import asyncio

            return list(await asyncio.gather(*(conn.run("true") for _ in range(sessions))))

        start = trio.current_time()  # the request log's clock
        with trio.fail_after(60):
            results = await aio(many)
        assert all(r.exit_status == 0 for r in results)
        opens = [e.time for e in log.since(mark) if e.kind == "exec-open"]
        assert len(opens) == sessions
        # At most `burst` tokens at the start, then one every 1/qps seconds: the last of
        # 10 execs reaches the API server 1.6 s after the start at the earliest (a loaded
        # machine only makes it later; the first opens may land late, so not min(opens)).
        span = max(opens) - start
        assert span >= (sessions - burst) / qps - 0.05, span
        await close(conn)


async def test_login_grace_time_disconnects_with_a_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_limits_rig(tmp_path, Limits(login_grace_time=1.0)) as rig:
        with trio.fail_after(15):
            async with await trio.open_tcp_stream("127.0.0.1", rig.port) as stream:
                await stream.send_all(b"SSH-2.0-idle_attacker\r\n")  # and then nothing
                started = trio.current_time()
                received = await read_to_eof(stream)
                took = trio.current_time() - started
        assert took < 5, took
        assert b"no login within 1 s" in received
        assert len(refusals(caplog, "login-grace-time")) == 1
        # a client that logs in in time is not affected
        conn = await rig.connect()
        await trio.sleep(1.5)
        assert (await aio(conn.run, "echo still")).stdout == "still\n"
        await close(conn)


async def idle_connection(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection that sent its SSH version and then sits there (unauthenticated)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"SSH-2.0-idle\r\n")
    assert (await stream.receive_some()).startswith(b"SSH-")  # admitted, version exchanged
    return stream


def ignore_packets(count: int) -> bytes:
    """``count`` plaintext SSH_MSG_IGNORE packets of 1 KiB (valid before key exchange)."""
    payload = bytes([2]) + String(b"x" * 1000)
    padding = 8 - (5 + len(payload)) % 8 + 8
    packet = bytes([padding]) + payload + bytes(padding)
    return (len(packet).to_bytes(4, "big") + packet) * count


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(10):
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def test_max_startups_drops_unauthenticated_connections(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = Limits(max_startups=MaxStartups.parse("2"), max_startups_per_address=100)
    async with open_limits_rig(tmp_path, limits) as rig:
        idle = [await idle_connection(rig.port) for _ in range(2)]
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", rig.port) as stream:
                await stream.send_all(b"SSH-2.0-third\r\n")
                received = await read_to_eof(stream)
        assert b"too many unauthenticated connections" in received
        assert len(refusals(caplog, "max-startups")) == 1
        with pytest.raises(asyncssh.DisconnectError, match="too many unauthenticated"):
            await rig.connect()
        if shutil.which("ssh"):  # what the OpenSSH client shows
            ssh = await trio.run_process(
                ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
                 "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-p", str(rig.port),
                 "alice@127.0.0.1", "true"], capture_stdout=True, capture_stderr=True,
                check=False)
            assert ssh.returncode == 255
            assert b"kuberun: too many unauthenticated connections" in ssh.stderr, ssh.stderr
        await idle[0].aclose()
        await trio.sleep(0.3)
        conn = await rig.connect()  # room again
        assert (await aio(conn.run, "echo in")).stdout == "in\n"
        await close(conn)
        await idle[1].aclose()


async def test_a_refused_client_that_keeps_sending_still_reads_why(
        tmp_path: Path) -> None:
    """The gateway half-closes and drains: no TCP reset eats its disconnect message.

    The client's version line and key-exchange bytes are unread when the gateway
    refuses it; closing over unread bytes would answer with a reset, and a client
    that writes before it reads (asyncssh, OpenSSH in the middle of its key
    exchange) would see "Connection reset by peer" instead of the reason.
    """
    limits = Limits(max_startups=MaxStartups.parse("1"), max_startups_per_address=100)
    async with open_limits_rig(tmp_path, limits) as rig:
        idle = await idle_connection(rig.port)
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", rig.port) as stream:
                await stream.send_all(b"SSH-2.0-eager\r\n" + ignore_packets(32))
                await trio.sleep(0.5)  # the refusal has happened
                await stream.send_all(ignore_packets(1))  # a reset would fail this
                received = b""
                while b"try again later" not in received and (chunk := await stream.receive_some()):
                    received += chunk
        assert b"kuberun: too many unauthenticated connections" in received
        await idle.aclose()


async def test_per_address_cap_on_unauthenticated_connections(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limits = Limits(max_startups=MaxStartups.parse("100"), max_startups_per_address=3)
    async with open_limits_rig(tmp_path, limits) as rig:
        idle = [await idle_connection(rig.port) for _ in range(3)]
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", rig.port) as stream:
                received = await read_to_eof(stream)
        assert b"too many unauthenticated connections from your address (limit 3)" in received
        assert len(refusals(caplog, "max-startups-per-address")) == 1
        # another source address (127.0.0.2 is loopback too) is not affected
        other = await idle_connection(rig.port, source="127.0.0.2")
        for s in [*idle, other]:
            await s.aclose()


class _OneTeamAccount(PublicKeyAuthenticator):
    """Every login is the user ``team`` (as an auth webhook's ``authenticatedUsername``)."""

    async def check_public_key(self, connection_id: str, username: str, key: str, *,
                               remote_address: str = "") -> AuthResult | None:
        result = await super().check_public_key(connection_id, username, key,
                                                remote_address=remote_address)
        return None if result is None else attrs.evolve(result, username="team")


async def test_the_per_user_limit_counts_the_authenticated_user(tmp_path: Path) -> None:
    """Two SSH names that authenticate as one user share its limit, and the second is
    refused before the client hears "logged in" (the pre-check uses the same name)."""
    async with open_limits_rig(tmp_path, Limits(max_connections_per_user=1),
                               authenticator=_OneTeamAccount) as rig:
        first = await rig.connect("a")
        with pytest.raises(asyncssh.DisconnectError,
                           match="too many connections for user 'team'"):
            await rig.connect("b")
        await close(first)


async def test_an_exec_the_api_server_does_not_open_fails_within_command_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``kubernetes.timeouts.commandStart`` bounds opening the exec stream: against a stalled
    API server the session ends with a reason instead of hanging, and the connection goes on
    once the API server answers again."""
    async with open_limits_rig(tmp_path, Limits(), timeouts={"commandStart": "1s"}) as rig:
        conn = await rig.connect()
        with trio.fail_after(30):
            assert (await aio(conn.run, "true")).exit_status == 0  # the pod is up
        rig.cluster.faults.stall()
        started = trio.current_time()
        with trio.fail_after(20):
            stalled = await aio(conn.run, "echo never")
        took = trio.current_time() - started
        rig.cluster.faults.resume()
        assert stalled.exit_status != 0
        assert "cannot start the command in pod" in stalled.stderr, stalled.stderr
        assert took < 10, took  # bounded by commandStart, not by the client's patience
        failed = [r for r in caplog.records if getattr(r, "event", None) == "exec-failed"]
        assert "did not open the exec stream within 1 s" in failed[0].error
        with trio.fail_after(30):
            assert (await aio(conn.run, "echo again")).stdout == "again\n"
        await close(conn)
