"""Agent forwarding, the asyncio half: the relay's exec and one bridge per agent connection.

Theory of operation
-------------------
The trio side (:mod:`kuberun_trio.gateway.agent`) decides and owns the lifetimes; this
module only moves bytes, each function awaited once through the bridge:

* :func:`run_relay` opens the relay's pods/exec (the listener in the pod, with stdin
  open so that a real kubelet's stdin EOF ends it) and hands every line it prints on
  stdout or stderr, synchronously, to a callback (``ready``, ``conn N``, noise). It
  returns when the exec ends; cancelling it closes the WebSocket.
* :func:`bridge_connection` carries one agent connection: it first opens an
  ``auth-agent@openssh.com`` channel to the client (asyncssh's
  ``create_agent_channel``: its ``create_agent_connection`` insists on a listener on
  the gateway host, which we never make), and only then the per-connection exec that
  connects to the pod-side socket; bytes flow channel ↔ exec stdin/stdout on the
  asyncio side, with the SSH channel's write window holding the exec reader
  (``pause_writing``/``resume_writing``). When the exec ends, the channel gets EOF and
  closes; when the client closes the channel, the exec's stdin is half-closed. When the
  client refuses the channel (its agent is gone), the exec still runs, with stdin closed
  at once: the agent client in the pod sees its connection end now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import asyncssh

from .execstream import ExecResult, ExecStream, open_exec

if TYPE_CHECKING:
    from .sshsession import ExecTarget

log = logging.getLogger(__name__)

MAX_LINE = 1024
"""Longest line of relay output kept (the rest of a longer line is dropped)."""


class _LineSink:
    """An :class:`~.execstream.OutputSink` that splits output into lines for a callback."""

    def __init__(self, on_line: Callable[[str, str], None]) -> None:
        self._on_line = on_line
        self._partial = {"stdout": bytearray(), "stderr": bytearray()}

    def _feed(self, stream: str, data: bytes) -> None:
        buf = self._partial[stream]
        buf += data
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_LINE:
                    del buf[MAX_LINE:]
                return
            line = bytes(buf[:end][:MAX_LINE]).decode("utf-8", "replace")
            del buf[: end + 1]
            self._on_line(stream, line)

    def write_stdout(self, data: bytes) -> None:
        self._feed("stdout", data)

    def write_stderr(self, data: bytes) -> None:
        self._feed("stderr", data)

    async def wait_writable(self) -> None:
        return None


async def run_relay(target: ExecTarget, argv: Sequence[str],
                    on_line: Callable[[str, str], None]) -> ExecResult:
    """Run the relay listener until it ends. Asyncio-flavoured; raises ``ExecError``."""
    stream = await open_exec(target.ws_client, target.namespace, target.pod, target.container,
                             argv, tty=False, stdin=True, throttle=target.throttle,

                             open_within=target.open_timeout)
    return await stream.run(_LineSink(on_line))


class _AgentChannelSession(asyncssh.SSHUNIXSession):  # type: ignore[type-arg]
    """The gateway's end of one ``auth-agent@openssh.com`` channel."""

    def __init__(self) -> None:
        self.chan: Any = None
        self.stream: ExecStream | None = None
        self._early: list[bytes] = []
        self._writable = asyncio.Event()
        self._writable.set()
        self.eof = False
        self.stderr = bytearray()

    # -- asyncssh callbacks
    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.stream is not None:
            self.stream.send_stdin(data)
        else:  # the agent answers only questions, so this is at most a few bytes
            self._early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.stream is not None:
            self.stream.close_stdin()
        return True

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.chan = None
        self._writable.set()
        if self.stream is not None:
            self.stream.close_stdin()

    # -- OutputSink of the per-connection exec
    def write_stdout(self, data: bytes) -> None:
        if self.chan is not None:
            self.chan.write(data)

    def write_stderr(self, data: bytes) -> None:
        self.stderr += data[: max(0, MAX_LINE - len(self.stderr))]

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def attach(self, stream: ExecStream) -> None:
        self.stream = stream
        chan = self.chan
        if chan is not None:
            stream.on_pause, stream.on_resume = chan.pause_reading, chan.resume_reading
        for data in self._early:
            stream.send_stdin(data)
        self._early.clear()
        if self.eof or chan is None:
            stream.close_stdin()


class _Discard:
    def write_stdout(self, data: bytes) -> None:
        pass

    def write_stderr(self, data: bytes) -> None:
        pass

    async def wait_writable(self) -> None:
        return None


TURN_AWAY_TIMEOUT = 5.0
"""Seconds the exec that ends a refused agent connection in the pod may take."""


async def _turn_away(target: ExecTarget, argv: Sequence[str]) -> None:
    """The client refused the agent channel (its agent is gone): connect to the pod side
    and close at once, so that the agent client there sees the end now rather than after
    the relay's wait. Best effort, bounded."""
    async def turn_away() -> None:
        stream = await open_exec(target.ws_client, target.namespace, target.pod,
                                 target.container, argv, tty=False, stdin=True,
                                 throttle=target.throttle,

                                 open_within=target.open_timeout)
        stream.close_stdin()
        await stream.run(_Discard())

    with contextlib.suppress(Exception):
        await asyncio.wait_for(turn_away(), TURN_AWAY_TIMEOUT)


async def bridge_connection(conn: Any, target: ExecTarget, argv: Sequence[str]) -> str:
    """Carry one agent connection between the pod and the client. Asyncio-flavoured.

    Returns how it ended, for the log; raises ``asyncssh.ChannelOpenError`` when the
    client refuses the channel and ``ExecError`` when the exec cannot be opened.
    """
    session = _AgentChannelSession()
    chan = conn.create_agent_channel()
    try:
        await chan.open(lambda: session)
    except asyncssh.ChannelOpenError:
        await _turn_away(target, argv)
        raise
    try:
        stream = await open_exec(target.ws_client, target.namespace, target.pod,
                                 target.container, argv, tty=False, stdin=True,
                                 throttle=target.throttle,

                                 open_within=target.open_timeout)
        session.attach(stream)
        result = await stream.run(session)
    finally:
        if session.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                session.chan.write_eof()
            session.chan.close()
    if result.exit_code == 0:
        return "closed"
    detail = session.stderr.decode("utf-8", "replace").strip() or result.message
    return f"exit {result.exit_code}: {detail[:200]}"
