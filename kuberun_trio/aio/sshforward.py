"""The SSH side of one ``direct-tcpip`` channel (``ssh -L``, ``ssh -D``).

Theory of operation
-------------------
asyncssh asks :meth:`GatewaySSHServer.connection_requested` synchronously;
:func:`accept_forward` counts the channel against ``security.maxSessions``, creates a
:class:`ForwardSession` and hands it to the trio side (``portal.submit_forward``), and
gives asyncssh an *awaitable* session: asyncssh answers the client's open only when it
resolves -- with the session (open confirmation) or with ``ChannelOpenError`` (open
failure, with its code and text). Nothing is accepted and then reset.

The trio side (:mod:`kuberun_trio.gateway.connection`) decides where the channel goes
(:func:`kuberun_trio.core.forwarding.judge`) once the pod is Ready, and then either
refuses it (:meth:`ForwardSession.refuse`) or awaits :meth:`ForwardSession.serve` once,
through the bridge. ``serve`` opens the stream -- a ``pods/portforward`` WebSocket
(:mod:`.portforward`) or an exec of ``podNetworkCommand`` -- and pumps it on the asyncio
side. The open is confirmed once the stream is up and either the pod sent data or
``open_settle`` seconds passed without the stream ending (the API never confirms a
dial; a refused one is reported on the error channel within that time). A stream that
ends first fails the open with its reason (``connect failed``).

Flow control is the exec streams': pod → client waits on ``pause_writing`` /
``resume_writing``; client → pod pauses the channel above the stream's high-water mark,
and :class:`ForwardChannel` re-opens the receive window only for delivered data.
The client's EOF is not passed on to a port-forward (the protocol has no half-close):
the stream lives until the pod side ends it or the client closes the channel. A network
command's stdin is closed on EOF (v5 half-close), as for exec sessions. Closing the
channel cancels the trio task (``abort``), whose cancellation closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import asyncssh
import attrs
from asyncssh.constants import (
    MSG_CHANNEL_WINDOW_ADJUST,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
)
from asyncssh.packet import UInt32

from ..core.audit import ConnectionAudit, format_address
from ..core.forwarding import ViaPodNetwork, ViaPortForward
from ..observe.metrics import ByteCounts, unobserved
from .execstream import ExecStream, open_exec
from .portforward import open_portforward

if TYPE_CHECKING:
    from ..core.limits import Ticket
    from .sshsession import ExecTarget

STDERR_KEPT = 2048
"""Bytes of a network command's stderr kept for the log."""


def reopen_window(chan: Any) -> None:
    """Re-open an SSH channel's receive window only for data it delivered.

    asyncssh re-opens the window to its full size whenever it delivers a packet,
    forgetting what still waits in ``_recv_buf`` while reading is paused: every
    pause/resume cycle then lets the client send another window's worth, and the buffer
    grows without bound. Here buffered + window never exceed the initial window.
    """
    init = chan._init_recv_window
    if chan._recv_window < init // 2:
        buffered = sum(len(item) for item, _ in chan._recv_buf)
        adjust = init - buffered - chan._recv_window
        if adjust >= init // 2:
            chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
            chan._recv_window += adjust


class ForwardChannel(asyncssh.SSHTCPChannel):  # type: ignore[type-arg]
    """A direct-tcpip channel whose receive window never re-opens over buffered data."""

    def _deliver_data(self, data: bytes, datatype: asyncssh.DataType) -> None:
        reopen_window(self)
        if self._session is not None:
            self._session.data_received(data, datatype)


@attrs.frozen
class ForwardEnd:
    """How one forward channel ended."""

    accepted: bool
    """Whether the client's open was confirmed."""
    reason: str | None = None
    """Why the pod side ended (the API's error text, a command's failure); None: closed."""


class ForwardSession(asyncssh.SSHTCPSession):  # type: ignore[type-arg]
    """One forward channel: the awaitable asyncssh waits on, the sink of the stream."""

    def __init__(self, host: str, port: int, audit: ConnectionAudit, *,
                 counts: ByteCounts | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.host, self.port = host, port
        self.destination = format_address(host[:256], port)
        self.audit = audit
        self._counts = counts if counts is not None else ByteCounts()
        self._on_close = on_close
        self._opened: asyncio.Future[ForwardSession] = \
            asyncio.get_running_loop().create_future()
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._stream: ExecStream | None = None
        self._early: list[bytes] = []
        self._first = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._stderr = bytearray()
        self.abort: Callable[[], None] = lambda: None
        """Set by the trio task: cancels it (the client closed the channel)."""
        self.bytes_in = 0
        """Bytes from the client to the pod."""
        self.bytes_out = 0
        """Bytes from the pod to the client."""

    def __repr__(self) -> str:
        return f"<ForwardSession {self.destination} open={self._opened.done()}>"

    @property
    def accepted(self) -> bool:
        """Whether the client's open was (or is being) confirmed."""
        return self._opened.done() and not self._opened.cancelled() and \
            self._opened.exception() is None

    async def opened(self) -> ForwardSession:
        """What asyncssh awaits before it answers the client's channel open."""
        return await self._opened

    def _release(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def fail_open(self, code: int, reason: str) -> bool:
        """Fail the client's open (if still pending); whether this call did it."""
        if self._opened.done():
            return False
        self._opened.set_exception(asyncssh.ChannelOpenError(code, reason))
        self._opened.exception()  # retrieved: asyncio does not log it if asyncssh is gone
        self._release()
        return True

    def refuse(self, reason: str) -> None:
        """Refused by policy: ``administratively prohibited``, and the log says why."""
        if self.fail_open(OPEN_ADMINISTRATIVELY_PROHIBITED, reason):
            self.audit.refused("port-forwarding", reason, kind="direct-tcpip",
                               destination=self.destination)

    # -- asyncssh callbacks -------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        if self._early:
            chan.write(b"".join(self._early))
            self._early.clear()
        self._writable.set()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.bytes_in += len(data)
        self.audit.bytes_from_client += len(data)
        self._counts.to_pod += len(data)
        if self._stream is not None:
            self._stream.send_stdin(data)

    def eof_received(self) -> bool:
        if self._stream is not None:  # a network command's stdin closes (v5); a port-forward
            self._stream.close_stdin()  # has no half-close: nothing is sent
        return True  # keep the channel until either side closes it

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan = None
        self._writable.set()
        self._release()
        self.abort()

    # -- OutputSink for the stream -----------------------------------------
    def write_stdout(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.audit.bytes_to_client += len(data)
        self._counts.from_pod += len(data)
        self._first.set()
        if self._chan is not None:
            self._chan.write(data)
        elif not self._opened.done() or self._opened.exception() is None:
            self._early.append(data)  # before the open is confirmed: held, reading waits
            self._writable.clear()

    def write_stderr(self, data: bytes) -> None:
        self._stderr += data[: max(0, STDERR_KEPT - len(self._stderr))]

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def _pause(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def _resume(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    # -- called by the trio task (through the bridge) ----------------------
    async def serve(self, target: ExecTarget, how: ViaPortForward | ViaPodNetwork,
                    settle: float) -> ForwardEnd:
        """Open the stream (within ``target.open_timeout`` s, ``commandStart``), answer the
        client's open, pump to the end. Asyncio-flavoured."""
        metrics = target.metrics or unobserved()
        resource = "pods/portforward" if isinstance(how, ViaPortForward) else "pods/exec"
        try:
            opening: Coroutine[Any, Any, ExecStream]
            if isinstance(how, ViaPortForward):
                opening = open_portforward(target.ws_client, target.namespace, target.pod,
                                           how.port, throttle=target.throttle)
            else:
                opening = open_exec(target.ws_client, target.namespace, target.pod,
                                    target.container, how.argv, tty=False, stdin=True,
                                    throttle=target.throttle)
            stream: ExecStream = await asyncio.wait_for(opening, target.open_timeout)
        except Exception as exc:
            status = getattr(exc, "status", None) or getattr(exc.__cause__, "status", None)
            metrics.api_request("create", resource, status if isinstance(status, int) else None)
            self.fail_open(OPEN_CONNECT_FAILED, "the gateway could not open a stream to the "
                           "pod")
            return ForwardEnd(False, f"{type(exc).__name__}: {exc}")
        metrics.api_request("create", resource, 101)
        self._stream = stream
        stream.on_pause, stream.on_resume = self._pause, self._resume
        pump = asyncio.ensure_future(self._pump(stream, how))
        try:
            first = asyncio.ensure_future(self._first.wait())
            try:
                await asyncio.wait({pump, first}, timeout=settle,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                first.cancel()
            if pump.done() and not self._first.is_set():
                reason = pump.result() or "the pod side closed the stream at once"
                where = (f"port {self.port} in the pod" if isinstance(how, ViaPortForward)
                         else f"{self.destination} from the pod")
                self.fail_open(OPEN_CONNECT_FAILED, _told(reason, where))
                return ForwardEnd(False, reason)
            if not self._opened.done():
                self._opened.set_result(self)
            return ForwardEnd(True, await pump)
        finally:
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            self.fail_open(OPEN_CONNECT_FAILED, "the connection is closing")
            if self._chan is not None:
                self._chan.close()

    async def _pump(self, stream: ExecStream, how: ViaPortForward | ViaPodNetwork) -> str | None:
        if isinstance(how, ViaPortForward):
            error: str | None = await stream.run(self)  # type: ignore[assignment]
            return error
        result = await stream.run(self)
        if result.exit_code == 0:
            return None
        said = self._stderr.decode(errors="replace").strip()
        status = (f"status {result.exit_code}" if result.exit_code is not None
                  else result.message or "no status")
        return f"{how.argv[0]} ended with {status}" + (f": {said}" if said else "")


def _told(reason: str, where: str) -> str:
    """What the client reads when the pod side ended before the open was confirmed: the
    last words of the API server's (or the command's) text; the whole text is logged."""
    tail = reason.rsplit(": ", 1)[-1][:200]
    return f"kuberun: cannot connect to {where}: {tail}"


def accept_forward(conn: asyncssh.SSHServerConnection, audit: ConnectionAudit,
                   submit: Callable[[ForwardSession], None], host: str, port: int, *,
                   ticket: Ticket | None, refused: Callable[[Any], None],
                   counts: ByteCounts | None = None) -> tuple[Any, Any]:
    """asyncssh's ``connection_requested`` answer: (channel, awaitable session)."""
    if ticket is not None:
        refusal = ticket.open_session()
        if refusal is not None:
            refused(refusal)
            raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"kuberun: {refusal.message}")
    session = ForwardSession(host, port, audit, counts=counts,
                             on_close=ticket.close_session if ticket is not None else None)
    chan = conn.create_tcp_channel()
    chan.__class__ = ForwardChannel  # overrides one method, adds no state
    submit(session)
    return chan, session.opened()
