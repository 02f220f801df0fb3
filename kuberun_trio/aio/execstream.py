"""One ``pods/exec`` WebSocket stream, pumped entirely on the asyncio side.

Theory of operation
-------------------
Bytes that cross the trio/asyncio boundary one chunk at a time cost a lot
(``shared/PITFALLS.md``), so an exec stream never does: the trio task that
owns a session awaits :meth:`ExecStream.run` *once*, and everything inside --
reading frames, writing them to the SSH channel, flow control -- happens in
asyncio. Cancelling the trio task cancels ``run``, whose ``finally`` closes the
WebSocket.

* **Opening** (:func:`open_exec`): kubernetes-asyncio's ``WsApiClient`` with
  ``_preload_content=False`` and the subprotocol list
  ``v5.channel.k8s.io,v4.channel.k8s.io``; the server picks v5 when it can
  (half-close of stdin), else v4. The negotiated protocol is read from the 101
  response (kubernetes-asyncio passes the list as a raw header, so aiohttp's
  ``ws.protocol`` stays None).
* **Pod → client**: the reader demultiplexes channel 1/2 frames into the
  :class:`OutputSink` and collects the channel-3 status. Before reading the
  next frame it awaits ``sink.wait_writable()``: when the SSH peer's window is
  full we stop reading, the TCP window to the API server fills, and the pod's
  writes block -- backpressure end to end with bounded memory.
* **Client → pod**: :meth:`ExecStream.send_stdin` is synchronous (called from
  asyncssh's ``data_received``). Frames are queued; a writer task sends them
  (aiohttp's ``send_bytes`` drains the transport), joining stdin frames that
  queued up meanwhile into one message of up to ``MAX_FRAME`` bytes (one TCP
  read carries several 32 KiB SSH packets: fewer, larger WebSocket messages
  cost less on both ends). Above ``HIGH_WATER``
  queued bytes the source is told to pause (``pause_reading`` on the SSH
  channel) and below ``LOW_WATER`` to resume.
* **EOF**: v5 sends ``[0xFF, 0x00]``. v4 has no way to close stdin alone
  (kubernetes/kubernetes#89899): the client's EOF is dropped, stdin stays
  open, and the process sees EOF only when the SSH channel closes -- which
  ends the session (HUP, then the WebSocket is closed), so output written
  after that is lost: ``printf abc | ssh gw wc -c`` hangs until the client
  gives up. :attr:`ExecStream.can_half_close` tells which; the embedded
  cluster's ``faults.serve_v4_only()`` reproduces a v4-only server
  (``tests/test_gateway_sessions.py``).
* **Status**: ``{"status":"Success"}`` → exit 0; ``NonZeroExitCode`` → the
  code in ``details.causes``; a stream that ends without a status (cut mid-way,
  pod gone) → :class:`ExecResult` with ``exit_code=None`` and a reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import attrs

from ..errors import ExecError
from .bridge import translate

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PROTOCOLS = f"{V5},{V4}"
CLOSE_TIMEOUT = 2.0
"""Seconds the WebSocket close handshake may take before the connection is dropped."""
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_FRAME = 256 * 1024
"""Queued stdin frames are joined into WebSocket messages of up to about this size."""


class OutputSink(Protocol):
    """Where pod output goes (an SSH channel). Synchronous writes, async readiness."""

    def write_stdout(self, data: bytes) -> None: ...
    def write_stderr(self, data: bytes) -> None: ...
    async def wait_writable(self) -> None: ...


@attrs.frozen
class ExecResult:
    """How an exec ended."""

    exit_code: int | None
    """The process's exit code (0-255), or None if the stream ended without a status."""
    message: str = ""
    """The status message for failures, or why the stream ended early."""
    reason: str = ""
    """The status reason (``NonZeroExitCode``, ``InternalError``, ...)."""


def parse_status(raw: bytes) -> ExecResult:
    """Turn the channel-3 payload into an :class:`ExecResult`."""
    if not raw:
        return ExecResult(None, "the exec stream ended without an exit status", "StreamEnded")
    try:
        status = json.loads(raw)
    except ValueError:
        # channel.k8s.io (v1) writes a plain error string.
        return ExecResult(None, raw.decode(errors="replace"), "Error")
    if status.get("status") == "Success":
        return ExecResult(0)
    reason, message = str(status.get("reason", "")), str(status.get("message", ""))
    if reason == "NonZeroExitCode":
        for cause in status.get("details", {}).get("causes", []):
            if cause.get("reason") == "ExitCode":
                with contextlib.suppress(ValueError):
                    return ExecResult(int(cause["message"]), message, reason)
    return ExecResult(None, message, reason)


class ExecStream:
    """A running exec: feed stdin, resize, and ``await run(sink)`` for the exit."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, protocol: str | None) -> None:
        self._ws = ws
        self.protocol = protocol or V4
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing_stdin = False
        self._paused = False
        self.on_pause: Callable[[], None] = lambda: None
        self.on_resume: Callable[[], None] = lambda: None

    @property
    def can_half_close(self) -> bool:
        return self.protocol == V5

    def __repr__(self) -> str:
        return f"<ExecStream {self.protocol} queued={self._queued} paused={self._paused}>"

    # -- client → pod (synchronous, from SSH callbacks) ---------------------
    def send_stdin(self, data: bytes) -> None:
        if self._closing_stdin or not data:
            return
        self._enqueue(b"\x00" + data)

    def close_stdin(self) -> None:
        """Half-close stdin (v5). On v4 there is no such frame: nothing is sent."""
        if not self._closing_stdin:
            self._closing_stdin = True
            if self.can_half_close:
                self._enqueue(b"\xff\x00")

    def resize(self, width: int, height: int) -> None:
        self._enqueue(b"\x04" + json.dumps({"Width": width, "Height": height}).encode())

    def _enqueue(self, frame: bytes) -> None:
        self._frames.append(frame)
        self._queued += len(frame)
        self._wakeup.set()
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = True
            self.on_pause()

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._frames:
                frame = self._take_frame()
                await self._ws.send_bytes(frame)
                if self._paused and self._queued < LOW_WATER:
                    self._paused = False
                    self.on_resume()

    def _take_frame(self) -> bytes:
        """The next frame; consecutive stdin frames are joined (up to ``MAX_FRAME``)."""
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if frame[0] != 0 or not self._frames or self._frames[0][0] != 0:
            return frame
        parts: list[bytes | memoryview] = [frame]
        size = len(frame)
        while self._frames and self._frames[0][0] == 0 and size < MAX_FRAME:
            part = self._frames.popleft()
            self._queued -= len(part)
            parts.append(memoryview(part)[1:])
            size += len(part) - 1
        return b"".join(parts)

    # -- pod → client -------------------------------------------------------
    async def run(self, sink: OutputSink) -> ExecResult:
        """Pump until the exec ends; returns how it ended. Closes the WebSocket.

        The frames are read in a child task, so that a cancellation (the session or
        connection is ending) never lands inside aiohttp's ``receive()``: there it
        would mark the socket abnormally closed and ``close()`` would drop TCP without
        the close handshake. Instead the reader is stopped cleanly (``close()`` breaks
        a pending ``receive()``; a reader held by flow control is cancelled there) and
        the Close handshake completes -- so the API server has seen the stream closed
        before the caller goes on to delete the pod.
        """
        return parse_status(bytes(await self._pump(sink)))

    async def _pump(self, sink: OutputSink) -> bytearray:
        """:meth:`run` without the status parsing: the bytes :meth:`_read` collected."""
        writer = asyncio.ensure_future(self._writer())
        status = bytearray()
        reader = asyncio.ensure_future(self._read(sink, status))
        try:
            await asyncio.shield(reader)
            failed = writer.done() and not writer.cancelled() and writer.exception() is not None
            if failed and not status:  # with the exit status in hand, a write that raced the
                # server's close (stdin EOF just as the process ended) lost nothing
                raise ExecError("writing to the exec stream failed") from writer.exception()
            return status
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            await asyncio.shield(self._close(reader))

    async def _read(self, sink: OutputSink, status: bytearray) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                return
            data: bytes = msg.data
            if len(data) <= 1:
                continue  # the ready frame, or an empty write
            channel = data[0]
            if channel == 1:
                sink.write_stdout(data[1:])
                await sink.wait_writable()
            elif channel == 2:
                sink.write_stderr(data[1:])
                await sink.wait_writable()
            elif channel == 3:
                status += data[1:]

    async def _close(self, reader: asyncio.Future[None]) -> None:
        if not reader.done() and not self._ws._waiting:  # held by flow control, not receiving
            reader.cancel()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            # close() breaks a pending receive() in the reader, sends Close, and drains
            # until the server's Close (bounded: a server busy writing may take a while).
            await asyncio.wait_for(self._ws.close(), CLOSE_TIMEOUT)
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def open_exec(
    ws_client: Any,
    namespace: str,
    pod: str,
    container: str,
    argv: Sequence[str],
    *,
    tty: bool,
    stdin: bool = True,
    throttle: Callable[[], Awaitable[None]] | None = None,
    open_within: float | None = None,
) -> ExecStream:
    """Open an exec WebSocket. Asyncio-flavoured; raises :class:`ExecError` on refusal,
    and when the API server has not opened the stream within ``open_within`` seconds
    (``kubernetes.timeouts.commandStart``; the wait for a rate-limiter token is not
    counted).

    ``throttle`` (asyncio-flavoured) is awaited first: the API client's rate limiter
    (:meth:`kuberun_trio.aio.kube.KubeClient.exec_throttle`), so exec opens count against
    ``qps``/``burst`` like every other request.
    """
    from kubernetes_asyncio.client import CoreV1Api

    if throttle is not None:
        await throttle()

    v1: Any = CoreV1Api(ws_client)
    deadline = asyncio.timeout(open_within)
    try:
        async with deadline:
            cm = await v1.connect_get_namespaced_pod_exec(
                pod, namespace, container=container, command=list(argv), stdin=stdin,
                stdout=True, stderr=not tty, tty=tty, _preload_content=False,
                _headers={"sec-websocket-protocol": PROTOCOLS})
            ws = await cm.__aenter__()
    except Exception as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():
            raise ExecError(f"the API server did not open the exec stream within "
                            f"{open_within:g} s") from None
        ours = translate(exc)
        if ours is None:
            raise
        if isinstance(ours, ExecError):
            raise ours from exc
        ours.__cause__ = exc
        raise ExecError(str(ours)) from ours
    response = getattr(ws, "_response", None)
    protocol = response.headers.get("Sec-WebSocket-Protocol") if response is not None else None
    return ExecStream(ws, protocol)
