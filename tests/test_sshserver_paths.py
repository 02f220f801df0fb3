"""``aio/sshsession.py``'s edge paths, driven on purpose with scripted parts.

A :class:`GatewaySession` gets a recording channel and portal and a real
:class:`SessionMachine`; the exec it opens is a scripted stream
(``open_exec`` patched), run on a plain asyncio loop. Covered: the
``PENDING_INPUT_LIMIT`` pause and resume, non-UTF-8 ``env`` and non-ASCII
``signal`` refusals, ``break`` requests, IPv6 remote formatting for the
authenticator, and the shutdown notice appearing exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from asyncssh.packet import SSHPacket, String

from kuberun_trio.aio import sshsession
from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.execstream import ExecResult
from kuberun_trio.aio.sshsession import (
    PENDING_INPUT_LIMIT,
    ExecTarget,
    GatewayChannel,
    GatewaySession,
)
from kuberun_trio.core.audit import ConnectionAudit
from kuberun_trio.core.session import SessionConfig, SessionMachine, State
from kuberun_trio.gateway.login import LoginGate


class RecordingChannel:
    """The parts of an asyncssh server channel a session touches."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stderr = b""

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def write_stderr(self, data: bytes | str) -> None:
        self.stderr += data.encode() if isinstance(data, str) else data

    def exit(self, code: int) -> None:
        self.calls.append(("exit", code))

    def exit_with_signal(self, *args: Any) -> None:
        self.calls.append(("exit_with_signal", args))

    def close(self) -> None:
        self.calls.append(("close", None))

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading", None))

    def resume_reading(self) -> None:
        self.calls.append(("resume_reading", None))


class RecordingPortal:
    def __init__(self) -> None:
        self.submitted: list[GatewaySession] = []
        self.signals: list[Any] = []

    def submit(self, session: GatewaySession) -> None:
        self.submitted.append(session)

    def send_signal(self, session: GatewaySession, plan: Any) -> None:
        self.signals.append(plan)


class ScriptedStream:
    """Stands in for :class:`ExecStream`: records stdin, ends with exit 0."""

    def __init__(self) -> None:
        self.stdin: list[bytes] = []
        self.on_pause = lambda: None
        self.on_resume = lambda: None

    def send_stdin(self, data: bytes) -> None:
        self.stdin.append(data)

    def resize(self, width: int, height: int) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    async def run(self, sink: Any) -> ExecResult:
        return ExecResult(0)


def session_for(command: str = "cat") -> tuple[GatewaySession, RecordingChannel, RecordingPortal]:
    portal = RecordingPortal()
    machine = SessionMachine(SessionConfig(), session_id="s-1", server_env={})
    session = GatewaySession(portal, machine)  # type: ignore[arg-type]
    chan = RecordingChannel()
    session.connection_made(chan)  # type: ignore[arg-type]
    assert session.exec_requested(command)
    assert portal.submitted == [session]
    return session, chan, portal


# -- PENDING_INPUT_LIMIT ------------------------------------------------------------------------

def test_input_before_the_exec_pauses_the_channel_and_resumes_once_delivered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = ScriptedStream()

    async def open_exec(*args: Any, **kw: Any) -> ScriptedStream:
        return stream

    monkeypatch.setattr(sshsession, "open_exec", open_exec)
    session, chan, _ = session_for()
    chunk = b"x" * 32768
    sent = 0
    while sent <= PENDING_INPUT_LIMIT:  # the pod is still starting: input waits
        session.data_received(chunk, None)
        sent += len(chunk)
        if sent <= PENDING_INPUT_LIMIT:
            assert ("pause_reading", None) not in chan.calls
    assert chan.calls.count(("pause_reading", None)) >= 1
    assert ("resume_reading", None) not in chan.calls
    target = ExecTarget(None, "default", "pod-1", "shell")
    result = asyncio.run(session.serve_exec(target))
    assert result == ExecResult(0)
    assert b"".join(stream.stdin) == chunk * (sent // len(chunk))  # nothing lost, in order
    assert chan.calls.count(("resume_reading", None)) == 1
    session.data_received(b"later", None)  # now straight to the stream
    assert stream.stdin[-1] == b"later"


def test_input_below_the_limit_never_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = ScriptedStream()

    async def open_exec(*args: Any, **kw: Any) -> ScriptedStream:
        return stream

    monkeypatch.setattr(sshsession, "open_exec", open_exec)
    session, chan, _ = session_for()
    session.data_received(b"y" * 1000, None)
    asyncio.run(session.serve_exec(ExecTarget(None, "default", "pod-1", "shell")))
    assert stream.stdin == [b"y" * 1000]
    assert ("pause_reading", None) not in chan.calls
    assert ("resume_reading", None) not in chan.calls


# -- env and signal requests that are not text ---------------------------------------------------

class RecordingSession:
    def __init__(self) -> None:
        self.env: list[tuple[str, str]] = []
        self.signals: list[str] = []
        self.audit = ConnectionAudit("c-5", "192.0.2.5:22")

    def env_requested(self, name: str, value: str) -> bool:
        self.env.append((name, value))
        return True

    def signal_requested(self, name: str) -> bool:
        self.signals.append(name)
        return True


def channel_with(session: RecordingSession) -> GatewayChannel:
    chan: GatewayChannel = GatewayChannel.__new__(GatewayChannel)  # only _session is used
    chan._session = session  # type: ignore[assignment]
    return chan


@pytest.mark.parametrize(("key", "value"), [(b"LANG\xff", b"C"), (b"LANG", b"caf\xe9")])
def test_non_utf8_env_is_refused_before_the_session_sees_it(key: bytes, value: bytes) -> None:
    recorder = RecordingSession()
    chan = channel_with(recorder)
    assert chan._process_env_request(SSHPacket(String(key) + String(value))) is False
    assert recorder.env == []
    assert chan._process_env_request(SSHPacket(String(b"LANG") + String(b"C.UTF-8")))
    assert recorder.env == [("LANG", "C.UTF-8")]


def test_non_ascii_signal_is_refused_before_the_session_sees_it() -> None:
    recorder = RecordingSession()
    chan = channel_with(recorder)
    assert chan._process_signal_request(SSHPacket(String("TÉRM".encode()))) is False
    assert recorder.signals == []
    assert chan._process_signal_request(SSHPacket(String(b"TERM")))
    assert recorder.signals == ["TERM"]


# -- break ----------------------------------------------------------------------------------------

def test_break_is_refused_and_harmless() -> None:
    # Pins the behaviour, not the line: without the override asyncssh's default also
    # refuses a break, so removing it would not fail this test (nor change anything).
    session, chan, portal = session_for("sleep 10")
    state = session.machine.state
    assert session.break_received(500) is False
    assert (chan.calls, chan.stderr, portal.signals) == ([], b"", [])
    assert session.machine.state is state


# -- IPv6 remote address --------------------------------------------------------------------------

@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


@pytest.mark.parametrize(("peer", "remote"), [
    (("::1", 2222), "[::1]:2222"),
    (("fe80::1%eth0", 22), "[fe80::1%eth0]:22"),
    (("127.0.0.1", 40000), "127.0.0.1:40000"),
])
async def test_the_authenticator_gets_a_bracketed_ipv6_remote(
        peer: tuple[str, int], remote: str) -> None:
    seen: list[tuple[str, str, str, str]] = []

    class Check:
        def methods(self) -> frozenset[str]:
            return frozenset({"password"})

        async def check_password(self, connection_id: str, username: str, credential: str, *,
                                 remote_address: str) -> Any:
            await trio.lowlevel.checkpoint()
            seen.append((connection_id, username, credential, remote_address))
            return None  # refused

    gate = LoginGate(Check())  # type: ignore[arg-type]
    state = gate.connection("c-6", *peer)  # what GatewaySSHServer.connection_made does
    assert await gate.password(state, "alice", "secret") is not None  # a refusal
    assert seen == [("c-6", "alice", "secret", remote)]


# -- the shutdown notice ----------------------------------------------------------------------

def running_session() -> tuple[GatewaySession, RecordingChannel]:
    session, chan, _ = session_for("sleep 10")
    session._apply(session.machine.started())
    assert session.machine.state is State.RUNNING
    return session, chan


def test_a_notice_then_the_same_failure_is_printed_once() -> None:
    session, chan = running_session()
    message = "the gateway is shutting down"
    session.notice(message)
    session.fail(message)
    session.fail(message)  # a second end changes nothing
    assert chan.stderr.decode().count(message) == 1
    assert chan.calls.count(("exit", 255)) == 1


def test_a_failure_other_than_the_notice_is_printed_too() -> None:
    session, chan = running_session()
    session.notice("the gateway is shutting down")
    session.fail("the pod pod-1 is gone: Evicted: low memory")
    text = chan.stderr.decode()
    assert text.count("the gateway is shutting down") == 1
    assert text.count("the pod pod-1 is gone") == 1
    assert chan.calls.count(("exit", 255)) == 1
