"""kubectl's port-forward protocol: SPDY/3.1 streams, plain or tunnelled in a WebSocket.

Theory of operation
-------------------
kubectl ≥ 1.31 opens a WebSocket offering ``SPDY/3.1+portforward.k8s.io`` and then
speaks SPDY inside it: binary messages carry the SPDY byte stream cut anywhere
(client-go ``tools/portforward/tunneling_connection.go``; the API server's
``pkg/util/proxy/streamtunnel.go`` relays it unchanged to the kubelet). kubectl ≤ 1.30
upgrades the HTTP connection to ``SPDY/3.1`` directly. :class:`SpdyPortForward` serves
both over a :class:`ByteTransport` (:class:`TunnelTransport` or :class:`RawTransport`),
as the kubelet's ``pkg/cri/streaming/portforward/httpstream.go`` does:

* Each client connection creates two streams, ``streamtype: error`` then ``data``, with
  headers ``port`` and ``requestid`` (a pair). A stream with a missing or bad ``port``
  or ``streamtype`` is reset (RST_STREAM CANCEL); a good one gets an empty SYN_REPLY.
  A pair that is not complete within 30 s gets ``timed out waiting for streams`` on its
  error stream; a second stream of one type gets ``error processing stream``.
* A complete pair dials the pod (:func:`~.portforward.dial_pod`) and copies both ways
  (the pod's output in DATA frames of up to 256 KiB).
  When one direction ends the other gets at most 1 s, then the TCP connection closes and
  the data stream is half-closed (FIN) -- containerd's ``portForward``. Any error is
  written on the error stream in the kubelet's words, which then gets its FIN. A client
  RST on the data stream ends its copy as EOF and nothing more is sent on it.
* PING frames from the client are echoed; GOAWAY stops new streams; SETTINGS and
  WINDOW_UPDATE are ignored, as spdystream does (it has no flow control): back-pressure
  is the transport's. Every header block is inflated, even of an ignored frame.
* When the pod's sandbox stops (finished, evicted or deleted) every forward ends with
  a FIN; later streams get the runtime's error (``failed to find sandbox``). The
  connection itself stays until the client closes it or 4 h pass without traffic.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from . import spdy
from .portforward import dial_pod, forward_error, go_errno
from .streamsession import IdleTimer
from .websocket import WebSocket

log = logging.getLogger(__name__)

STREAM_CREATION_TIMEOUT = 30.0
"""The kubelet's ``DefaultStreamCreationTimeout``."""
COPY_GRACE = 1.0
"""containerd waits this long for the second direction once the first has ended."""
READ_SIZE = 256 * 1024
"""Pod output read at once (one DATA frame): 8x Go's copy buffer, for Python's per-frame cost."""
_INBOX = 16
"""Data frames queued per stream before the reader waits (head-of-line, as spdystream)."""


class ByteTransport(Protocol):
    async def receive_some(self) -> bytes:
        """The next bytes; ``b""`` once the peer is gone."""
        ...

    async def send_all(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@attrs.define
class TunnelTransport:
    """SPDY inside WebSocket binary messages (``SPDY/3.1+portforward.k8s.io``)."""

    ws: WebSocket

    async def receive_some(self) -> bytes:
        # client-go writes each field as its own message, an empty FIN frame's data too
        while (message := await self.ws.receive()) is not None:
            if message:
                return message
        return b""

    async def send_all(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self) -> None:
        await self.ws.close(1000)


@attrs.define
class RawTransport:
    """SPDY directly on the upgraded HTTP connection (``Upgrade: SPDY/3.1``)."""

    stream: trio.abc.Stream

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


@attrs.frozen
class PodSandboxView:
    """What a forward needs of the pod: its sandbox id and state."""

    uid: str
    state: Callable[[], str]
    """``ready``, ``stopped`` or ``missing`` (:meth:`~.kubelet.Kubelet.sandbox_state`)."""
    stopped: Callable[[], Awaitable[None]]
    """Returns once the sandbox is no longer ready."""


@attrs.define
class _Stream:
    id: int
    kind: str
    """``data`` or ``error``."""
    port: int
    inbox: trio.MemorySendChannel[bytes]
    outbox: trio.MemoryReceiveChannel[bytes]
    finished: bool = False
    """We sent FIN (or RST): nothing more goes out on it."""


@attrs.define
class _Pair:
    request: str
    data: _Stream | None = None
    error: _Stream | None = None
    complete: trio.Event = attrs.Factory(trio.Event)


class SpdyPortForward:
    """One SPDY port-forward connection of the kubelet's streaming server."""

    def __init__(self, transport: ByteTransport, pod: PodSandboxView, idle_timeout: float,
                 creation_timeout: float | None = None) -> None:
        self.transport, self.pod = transport, pod
        self.idle_timeout = idle_timeout
        self.creation_timeout = (STREAM_CREATION_TIMEOUT if creation_timeout is None
                                 else creation_timeout)
        self.codec = spdy.HeaderCodec()
        self.streams: dict[int, _Stream] = {}
        self.pairs: dict[str, _Pair] = {}
        self.last_stream = 0
        self.gone_away = False
        self._send_lock = trio.Lock()
        self._idle: IdleTimer | None = None
        self._nursery: trio.Nursery | None = None
        self._forwards: trio.Nursery | None = None
        self._active: set[trio.CancelScope] = set()
        self.ended: str | None = None
        """Why the connection ended: ``eof``, ``gone`` (send failed), ``protocol``, ``idle``."""

    async def run(self) -> None:
        self._idle = IdleTimer(self.idle_timeout)
        try:
            with self._idle.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._watch_sandbox)
                    async with trio.open_nursery() as forwards:
                        self._forwards = forwards
                        await self._read_loop()
                        forwards.cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
            if self._idle.scope.cancelled_caught:
                self.ended = "idle"
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.transport.close()

    # -- reading ------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reader = spdy.FrameReader()
        while True:
            data = await self.transport.receive_some()
            if not data:
                self.ended = self.ended or "eof"
                return
            assert self._idle is not None
            self._idle.touch()
            try:
                for frame in reader.feed(data):
                    await self._on_frame(frame)
            except spdy.SpdyError as exc:
                log.info("port-forward: SPDY protocol error, closing: %s", exc)
                self.ended = "protocol"
                return

    async def _on_frame(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.DataFrame):
            await self._on_data(frame)
            return
        kind = frame.type
        if kind == spdy.SYN_STREAM:
            await self._on_syn_stream(frame)
        elif kind == spdy.RST_STREAM:
            self._on_reset(frame.stream_id())
        elif kind == spdy.PING:
            if frame.word(0) % 2:  # the client's; even ids would answer our own pings
                await self._send(spdy.ping_frame(frame.word(0)))
        elif kind == spdy.GOAWAY:
            self.gone_away = True
        elif kind in (spdy.SYN_REPLY, spdy.HEADERS):
            self.codec.decode(frame.payload[4:])  # keep the zlib context in step
        elif kind not in (spdy.SETTINGS, spdy.WINDOW_UPDATE, 5):  # 5: SPDY/2 NOOP
            raise spdy.SpdyError(f"invalid control frame type {kind}")

    async def _on_data(self, frame: spdy.DataFrame) -> None:
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return  # gone already (spdystream drops these too)
        if frame.data and stream.kind == "data":  # nobody reads what comes on an error stream
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.inbox.send(frame.data)
        if frame.fin:
            stream.inbox.close()

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.finished = True
            stream.inbox.close()

    async def _on_syn_stream(self, frame: spdy.ControlFrame) -> None:
        stream_id, headers = spdy.parse_syn_stream(self.codec, frame)
        if self.gone_away:
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            await self._send(spdy.rst_stream_frame(stream_id, spdy.PROTOCOL_ERROR))
            return
        self.last_stream = stream_id
        problem = _stream_problem(headers)
        if problem is not None:
            log.info("port-forward: stream %d rejected: %s", stream_id, problem)
            await self._send(spdy.rst_stream_frame(stream_id, spdy.CANCEL))
            return
        send, receive = trio.open_memory_channel[bytes](_INBOX)
        kind = headers["streamtype"][0]
        stream = _Stream(stream_id, kind, int(headers["port"][0]), send, receive)
        if frame.fin:
            send.close()
        self.streams[stream_id] = stream
        await self._send(spdy.syn_reply_frame(self.codec, stream_id))
        request = _request_id(headers, stream_id, kind)
        pair = self.pairs.get(request)
        if pair is None:
            pair = self.pairs[request] = _Pair(request)
            assert self._nursery is not None
            self._nursery.start_soon(self._monitor, pair)
        if (pair.error if kind == "error" else pair.data) is not None:
            msg = f"error processing stream for request {request}: {kind} stream already assigned"
            log.info("port-forward: %s", msg)
            receive.close()  # nothing will read it: its data is dropped
            await self._print(pair.error, msg)
            return
        if kind == "error":
            pair.error = stream
        else:
            pair.data = stream
        if pair.error is not None and pair.data is not None:
            pair.complete.set()
            assert self._forwards is not None
            self._forwards.start_soon(self._forward, pair.data, pair.error)

    async def _monitor(self, pair: _Pair) -> None:
        with trio.move_on_after(self.creation_timeout):
            await pair.complete.wait()
        if not pair.complete.is_set():
            await self._print(pair.error, f"(conn=spdy, request={pair.request}) timed out "
                                          "waiting for streams")
            for stream in (pair.data, pair.error):  # no forward will read them
                if stream is not None:
                    stream.outbox.close()
                    await self._finish(stream)
        if self.pairs.get(pair.request) is pair:
            del self.pairs[pair.request]

    async def _watch_sandbox(self) -> None:
        await self.pod.stopped()
        for scope in self._active:  # every forward ends: the pod network is gone
            scope.cancel()

    # -- one forwarded connection ----------------------------------------------------
    async def _forward(self, data: _Stream, error: _Stream) -> None:
        problem: str | None = None
        scope = trio.CancelScope()
        try:
            state = self.pod.state()
            if state != "ready":
                problem = forward_error(data.port, self.pod.uid, (
                    f'failed to find sandbox "{self.pod.uid}" in store: not found'
                    if state == "missing" else
                    f'network namespace for sandbox "{self.pod.uid}" is closed'), in_netns=False)
                return
            with trio.CancelScope() as scope:
                self._active.add(scope)
                conn, dial_problem = await dial_pod(data.port, self.pod.uid)
                if conn is None:
                    problem = forward_error(data.port, self.pod.uid, dial_problem)
                    return
                async with conn:
                    failure = await self._copy(conn, data)
                if failure is not None:
                    problem = forward_error(data.port, self.pod.uid, failure)
        finally:
            self._active.discard(scope)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._finish(data)
                if problem is not None:
                    log.info("port-forward: %s", problem)
                    await self._print(error, problem)
                await self._finish(error)
            data.outbox.close()
            error.outbox.close()
            for stream in (data, error):
                if self.streams.get(stream.id) is stream:
                    del self.streams[stream.id]

    async def _copy(self, conn: trio.SocketStream, data: _Stream) -> str | None:
        """Copy both ways; the first error (Go's wording) or None."""
        errors: list[str] = []
        first_done = trio.Event()

        async def pod_to_client() -> None:
            try:
                while chunk := await conn.receive_some(READ_SIZE):
                    if data.finished:  # the client reset it: drop the rest quietly
                        break
                    await self._send(spdy.data_frame(data.id, bytes(chunk)))
            except (trio.BrokenResourceError, OSError) as exc:
                errors.append(f"read {_tcp_pair(conn)}: read: {go_errno(exc)}")
            first_done.set()

        async def client_to_pod() -> None:
            try:
                async for chunk in data.outbox:
                    await conn.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                errors.append(f"write {_tcp_pair(conn)}: write: {go_errno(exc)}")
            first_done.set()

        async with trio.open_nursery() as copies:
            copies.start_soon(pod_to_client)
            copies.start_soon(client_to_pod)
            await first_done.wait()
            copies.cancel_scope.deadline = trio.current_time() + COPY_GRACE
        return errors[0] if errors else None

    # -- sending ---------------------------------------------------------------------
    async def _send(self, frame: bytes) -> None:
        """Send one frame; if the client is gone, the whole connection is cancelled."""
        async with self._send_lock:
            try:
                await self.transport.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.ended = self.ended or "gone"
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
        await trio.lowlevel.checkpoint()
        if self._idle is not None:
            self._idle.touch()

    async def _print(self, stream: _Stream | None, text: str) -> None:
        if stream is not None and not stream.finished:
            await self._send(spdy.data_frame(stream.id, text.encode()))

    async def _finish(self, stream: _Stream) -> None:
        if not stream.finished:
            stream.finished = True
            await self._send(spdy.data_frame(stream.id, b"", fin=True))


def _tcp_pair(conn: trio.SocketStream) -> str:
    """Go's ``tcp4 127.0.0.1:LOCAL->127.0.0.1:PORT`` for a connection's errors."""
    try:
        local, peer = conn.socket.getsockname(), conn.socket.getpeername()
    except OSError:
        return "tcp"
    if conn.socket.family == trio.socket.AF_INET6:
        return f"tcp6 [{local[0]}]:{local[1]}->[{peer[0]}]:{peer[1]}"
    return f"tcp4 {local[0]}:{local[1]}->{peer[0]}:{peer[1]}"


def _stream_problem(headers: spdy.Headers) -> str | None:
    """``httpStreamReceived``: why a new stream is rejected, or None."""
    port = (headers.get("port") or [""])[0]
    if not port:
        return '"port" header is required'
    if not port.isdigit() or int(port) > 0xFFFF:
        return f'unable to parse "{port}" as a port'
    if int(port) < 1:
        return f'port "{port}" must be > 0'
    kind = (headers.get("streamtype") or [""])[0]
    if not kind:
        return '"streamType" header is required'
    if kind not in ("error", "data"):
        return f'invalid stream type "{kind}"'
    return None


def _request_id(headers: spdy.Headers, stream_id: int, kind: str) -> str:
    """The ``requestID`` header, or the kubelet's guess for clients that send none."""
    request = (headers.get("requestid") or [""])[0]
    if request:
        return request
    return str(stream_id if kind == "error" else stream_id - 2)
