"""The part every pod-stream WebSocket session shares: channel framing, idle timer, ending.

Theory of operation
-------------------
A :class:`ChannelSession` owns one upgraded :class:`~.websocket.WebSocket`. Frames go
through the :class:`~.websocket.ChannelCodec` of the negotiated subprotocol (a channel
byte, or base64 text on the v1 ``base64`` protocol). Every frame in either direction
touches the :class:`IdleTimer`, a cancel scope that expires ``idle_timeout`` seconds
after the last traffic (4 h by default, as both real servers do). A session that stops
early records why in ``ended`` (``gone``: the client went away, ``break``: a protocol
error ends the read loop, ``cut``: ``Faults.cut_exec``), and :meth:`ChannelSession._close`
then drops TCP instead of closing the WebSocket with 1000.

The subclasses are :class:`~.remotecommand.RemoteCommand` (exec/attach) and
:class:`~.portforward.PortForward`.
"""

from __future__ import annotations

import contextlib

import trio

from .websocket import ChannelCodec, WebSocket

CHUNK = 32 * 1024
"""Output read size: Go's ``io.Copy`` buffer."""
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CLOSE = 255


class IdleTimer:
    """A cancel scope that expires ``timeout`` seconds after the last :meth:`touch`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope(deadline=trio.current_time() + timeout)

    def touch(self) -> None:
        self.scope.deadline = trio.current_time() + self.timeout


class ChannelSession:
    """What exec/attach and port-forward sessions share: framing, idle timer, end reason."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.ws: WebSocket | None = None
        self.codec = ChannelCodec(base64=False)
        self.ended: str | None = None
        """Why the session stopped early: ``gone``, ``break``, ``cut`` (None: normally)."""
        self._scope = trio.CancelScope()
        self._idle: IdleTimer | None = None

    def _start(self, ws: WebSocket) -> IdleTimer:
        self.ws, self.codec = ws, ChannelCodec.for_protocol(ws.protocol)
        self._idle = IdleTimer(self.idle_timeout)
        return self._idle

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self._scope.cancel()

    async def _send(self, channel: int, payload: bytes) -> bool:
        """Send one frame; False (and the session ends) if the client is gone."""
        assert self.ws is not None and self._idle is not None
        try:
            await self.ws.send_message(self.codec.encode(channel, payload), text=self.codec.base64)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end("gone")
            return False
        self._idle.touch()
        return True

    async def _receive(self) -> bytes | None:
        assert self.ws is not None and self._idle is not None
        msg = await self.ws.receive()
        if msg is None:
            self._end("gone")
        else:
            self._idle.touch()
        return msg

    async def _close(self) -> None:
        """Close 1000 after a normal end; drop TCP after a cut, a timeout or a vanished peer."""
        assert self.ws is not None
        if self.ended in ("gone", "cut") or self.ws.closed or (
                self._idle is not None and self._idle.scope.cancelled_caught):
            await self.ws.abort()
        else:
            await self.ws.close(1000)


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """``aclose()``, ignoring a stream that is already broken or closed."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.aclose()
