"""Session channels end to end: a real asyncssh client, the gateway, the embedded cluster.

Each test opens a rig (cluster + in-process gateway) and talks SSH to it. Channel
requests whose replies asyncssh's client never asks for (``env``) go through
:class:`ReplyingChannel`, which asks for a reply to every request, so a refusal
is visible as ``False``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
import trio
import trio_asyncio
from asyncssh.channel import SSHClientChannel
from asyncssh.packet import String, UInt32
from gatewaykit import open_rig

T = TypeVar("T")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


async def aio(fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
    result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kw)
    return result


class RawSession(asyncssh.SSHClientSession[bytes]):
    """Collects everything a session channel sends back."""

    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.closed = asyncio.Event()
        self.got_data = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        (self.stderr if datatype == asyncssh.EXTENDED_DATA_STDERR else self.stdout).extend(data)
        self.got_data.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class ReplyingChannel(SSHClientChannel[bytes]):
    """A client channel that wants a reply to every ``env`` request it sends."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.env_replies: list[asyncio.Future[bool]] = []

    def _send_request(self, request: bytes, *args: bytes, want_reply: bool = False) -> None:
        if request == b"env" and not want_reply:
            waiter: asyncio.Future[bool] = self._loop.create_future()
            self._request_waiters.append(waiter)
            self.env_replies.append(waiter)
            want_reply = True
        super()._send_request(request, *args, want_reply=want_reply)

    async def request(self, name: bytes, *args: bytes) -> bool | None:
        """A channel request with want-reply set; True/False is the server's answer."""
        return await self._make_request(name, *args)


async def open_raw(conn: asyncssh.SSHClientConnection, command: str | None = None, *,
                   env: dict[str, str] | None = None, subsystem: str | None = None,
                   term: str | None = None) -> tuple[ReplyingChannel, RawSession]:
    """Open a session channel (asyncio-flavoured) with replies for env requests."""
    c: Any = conn
    chan = ReplyingChannel(c, c._loop, "strict", None, "strict", 2 * 1024 * 1024, 32768)
    env_bytes = {k.encode(): v.encode() for k, v in (env or {}).items()}
    session = await chan.create(RawSession, command, subsystem, env_bytes, term is not None,
                                term, (80, 24), {}, False, None, None, False, False)
    assert isinstance(session, RawSession)
    return chan, session


async def run(conn: asyncssh.SSHClientConnection, command: str,
              **kw: Any) -> asyncssh.SSHCompletedProcess:
    async def go() -> asyncssh.SSHCompletedProcess:
        return await conn.run(command, encoding=None, **kw)

    with trio.fail_after(20):
        return await aio(go)


async def close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await aio(conn.wait_closed)


# ------------------------------------------------------------------- env


async def test_env_values_reach_the_process_verbatim(tmp_path: Path) -> None:
    tricky = "it's \"quoted\"\nline two $(touch /tmp/pwned) `id` $HOME \\ ; | &"
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        r = await run(conn, 'printf "%s|%s" "$TRICKY" "$EMPTY"',
                      env={"TRICKY": tricky, "EMPTY": ""})
        assert r.exit_status == 0, r.stderr
        assert r.stdout == f"{tricky}|".encode()
        await close(conn)


async def test_invalid_env_name_is_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def go() -> tuple[list[bool], RawSession]:
            chan, session = await open_raw(
                conn, 'echo "[$GOOD]"; env | grep -c "^BAD" || true',
                env={"GOOD": "yes", "BAD-NAME": "x", "1BAD": "y", "BAD=X": "z", "UID": "0"})
            replies = [await f for f in chan.env_replies]
            await session.closed.wait()
            return replies, session

        replies, session = await aio(go)
        assert replies == [True, False, False, False, False]
        assert session.stdout == b"[yes]\n0\n"
        assert session.exit_status == 0
        await close(conn)


# ------------------------------------------------------------------- bad requests


async def test_requests_after_start_are_refused_without_harm(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        other = await rig.connect()

        async def go() -> tuple[list[bool | None], RawSession]:
            chan, session = await open_raw(conn, "cat")
            answers = [
                await chan.request(b"env", String("LATE"), String("1")),
                await chan.request(b"pty-req", String("xterm"), UInt32(80), UInt32(24),
                                   UInt32(0), UInt32(0), String(b"\x00")),
                await chan.request(b"exec", String("echo second")),
                await chan.request(b"shell"),
                await chan.request(b"subsystem", String("sftp")),
                await chan.request(b"signal", String("NOSUCH")),
            ]
            chan.write(b"still alive\n")
            chan.write_eof()
            await session.closed.wait()
            return answers, session

        answers, session = await aio(go)
        assert answers == [False, False, False, False, False, False]
        assert session.stdout == b"still alive\n"
        assert session.exit_status == 0
        r = await run(other, "echo other connection")
        assert r.stdout == b"other connection\n"
        r = await run(conn, "echo same connection")
        assert r.stdout == b"same connection\n"
        await close(conn)
        await close(other)


# ------------------------------------------------------------------- pty


async def test_pty_sets_term_size_and_tty(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        r = await run(conn, 'echo "$TERM"; stty size; tty >/dev/null && echo tty; echo err >&2',
                      term_type="xterm-256color", term_size=(101, 37))
        assert r.exit_status == 0
        assert r.stdout.split(b"\r\n") == [b"xterm-256color", b"37 101", b"tty", b"err", b""]
        assert r.stderr == b""  # a terminal merges stderr into stdout
        r = await run(conn, 'tty >/dev/null || echo "no tty, TERM=${TERM-unset}"')
        assert r.stdout == b"no tty, TERM=unset\n"
        await close(conn)


async def test_window_change_resizes_the_pod_pty(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def go() -> tuple[bytes, int | None]:
            process = await conn.create_process(
                "stty -echo; stty size; read _; stty size", term_type="vt100",
                term_size=(80, 24), encoding=None)
            first = await process.stdout.readline()
            process.change_terminal_size(132, 50)
            await asyncio.sleep(0.2)  # resize and input travel on different exec channels
            process.stdin.write(b"go\n")
            rest = await process.stdout.read()
            await process.wait()
            return first + rest, process.exit_status

        with trio.fail_after(20):
            output, status = await aio(go)
        assert output.split(b"\r\n") == [b"24 80", b"50 132", b""]
        assert status == 0
        await close(conn)


# ------------------------------------------------------------------- shell/exec/subsystem


async def test_shell_runs_the_shell_command(tmp_path: Path) -> None:
    async with open_rig(tmp_path, shellCommand=["/bin/echo", "custom-shell"]) as rig:
        conn = await rig.connect()

        async def shell(term: str | None) -> tuple[bytes, int | None]:
            _, session = await open_raw(conn, None, term=term)
            await session.closed.wait()
            return bytes(session.stdout), session.exit_status

        assert await aio(shell, None) == (b"custom-shell\n", 0)
        assert await aio(shell, "xterm") == (b"custom-shell -l\r\n", 0)
        await close(conn)


async def test_exec_runs_through_sh_c(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        r = await run(conn, 'echo "$0" a | tr a b; for i in 1 2; do printf %s $i; done; exit 7')
        assert (r.stdout, r.exit_status) == (b"/bin/sh b\n12", 7)
        r = await run(conn, "no-such-command-here")
        assert r.exit_status == 127
        assert b"not found" in r.stderr
        await close(conn)


@pytest.mark.needs(paths=[SFTP_SERVER])
async def test_sftp_subsystem_put_get(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    remote = tmp_path / "remote.bin"  # the embedded pod shares the host filesystem
    back = tmp_path / "down.bin"
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def go() -> None:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(local), str(remote))
                await sftp.get(str(remote), str(back))
                assert await sftp.getsize(str(remote)) == len(payload)

        with trio.fail_after(20):
            await aio(go)
        digest = hashlib.sha256(payload).hexdigest()
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        r = await run(conn, f"sha256sum {remote}")
        assert r.stdout.split()[0].decode() == digest
        await close(conn)


async def test_unknown_subsystem_fails_the_request(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def go() -> None:
            await conn.create_process(subsystem="no-such-subsystem")

        with pytest.raises(asyncssh.ChannelOpenError, match="Session request failed"):
            await aio(go)
        r = await run(conn, "echo fine")
        assert r.stdout == b"fine\n"
        await close(conn)


@pytest.mark.needs("ssh")
async def test_openssh_client_exec_and_tty(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        key = tmp_path / "id"
        key.write_bytes(rig.client_key.export_private_key("openssh"))
        key.chmod(0o600)
        base = ["ssh", "-p", str(rig.port), "-i", str(key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                "LogLevel=ERROR", "127.0.0.1"]
        r = await trio.run_process([*base, "printf '%s' \"$LANG_X\"; exit 5"], capture_stdout=True,
                                   capture_stderr=True, check=False,
                                   env={**os.environ, "LANG_X": "x"})
        assert (r.returncode, r.stdout) == (5, b"")  # OpenSSH sends no env unless SendEnv
        r = await trio.run_process([*base[:-1], "-o", "SendEnv=LANG_X", "127.0.0.1",
                                    "printf '%s' \"$LANG_X\""], capture_stdout=True,
                                   capture_stderr=True, check=False,
                                   env={**os.environ, "LANG_X": "sent"})
        assert (r.returncode, r.stdout) == (0, b"sent"), r.stderr
        r = await trio.run_process([*base[:-1], "-tt", "127.0.0.1", "tty >/dev/null && echo t"],
                                   capture_stdout=True, capture_stderr=True, check=False,
                                   stdin=subprocess.DEVNULL)
        assert (r.returncode, r.stdout) == (0, b"t\r\n"), r.stderr


# ------------------------------------------------------------------- signals and exits


async def test_signal_reaches_the_process_group(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def go() -> tuple[bytes, tuple[str, bool, str, str] | None, int | None]:
            process = await conn.create_process(
                "echo ready; sleep 30; echo not-reached", encoding=None)
            line = await process.stdout.readline()
            process.send_signal("TERM")
            rest = await process.stdout.read()
            await process.wait()
            return line + rest, process.exit_signal, process.exit_status

        with trio.fail_after(20):
            out, exit_signal, status = await aio(go)
        assert out == b"ready\n"
        assert exit_signal is not None and exit_signal[0] == "TERM"
        assert status == -1  # asyncssh: exit-signal instead of exit-status
        # The group kill also took the shell's child: no sleep 30 is left in the pod.
        r = await run(conn, "ps -eo args | grep -c '^sleep 30' || true")
        assert r.stdout == b"0\n"
        await close(conn)


async def test_exit_signal_rules(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        r = await run(conn, "kill -KILL $$")
        assert r.exit_signal is not None and r.exit_signal[0] == "KILL"
        r = await run(conn, "exit 130")  # could be a SIGINT death; we did not send one
        assert (r.exit_status, r.exit_signal) == (130, None)
        r = await run(conn, "kill -TERM $$")  # a TERM we did not deliver: reported as status
        assert (r.exit_status, r.exit_signal) == (143, None)
        await close(conn)


async def test_exec_processes_are_session_leaders(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        r = await run(conn, "cat /proc/$$/stat; echo $$")
        stat, pid = r.stdout.decode().splitlines()
        fields = stat.rsplit(")", 1)[1].split()
        # fields: state ppid pgrp session ...; the session's wrapper (our parent, which
        # removes the PID file at the end) leads the session and the process group
        assert fields[1] != pid and fields[2] == fields[1] and fields[3] == fields[1]
        await close(conn)


# ------------------------------------------------------------------- stdin EOF


async def _wc_after_eof(conn: asyncssh.SSHClientConnection) -> RawSession:
    chan, session = await open_raw(conn, "wc -c")
    chan.write(b"abc")
    chan.write_eof()
    await session.closed.wait()
    return session


async def test_stdin_eof_via_v5_half_close(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        with trio.fail_after(20):
            session = await aio(_wc_after_eof, conn)
        assert (session.stdout.strip(), session.exit_status) == (b"3", 0)
        await close(conn)


async def test_stdin_eof_against_a_v4_only_server(tmp_path: Path) -> None:
    """v4 cannot half-close stdin: the process sees EOF only when the channel closes."""
    async with open_rig(tmp_path) as rig:
        rig.cluster.faults.serve_v4_only()
        conn = await rig.connect()

        async def go() -> RawSession:
            chan, session = await open_raw(conn, "wc -c; echo done >&2")
            chan.write(b"abc")
            chan.write_eof()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(session.closed.wait()), 1.0)
            chan.close()
            await session.closed.wait()
            return session

        with trio.fail_after(20):
            session = await aio(go)
        assert session.stdout == b"" and session.exit_status is None
        pod = rig.pods()[0]["metadata"]["name"]
        with trio.fail_after(10):  # the exec stream is closed and wc is gone
            while True:
                log = rig.cluster.request_log.entries
                if sum(e.kind == "exec-open" for e in log) == sum(
                        e.kind == "exec-close" for e in log):
                    break
                await trio.sleep(0.05)
        r = await run(conn, "ps -eo args | grep -c '^wc -c' || true")
        assert r.stdout == b"0\n", pod
        await close(conn)


# ------------------------------------------------------------------- parallel sessions


async def test_parallel_sessions_share_the_pod(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        results: list[asyncssh.SSHCompletedProcess] = []

        async def one() -> None:
            results.append(await run(conn, "hostname; sleep 0.5"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        pods = rig.pods()
        assert len(pods) == 1
        name = pods[0]["metadata"]["name"].encode()
        assert [r.stdout for r in results] == [name + b"\n"] * 5
        entries = rig.cluster.request_log.entries
        opens = [e.time for e in entries if e.kind == "exec-open"]
        closes = [e.time for e in entries if e.kind == "exec-close"]
        assert len(opens) == 5 and max(opens) < min(closes)  # they really ran side by side
        await close(conn)
