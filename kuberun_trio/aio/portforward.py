"""One ``pods/portforward`` WebSocket for one port, pumped on the asyncio side.

Theory of operation
-------------------
An ``ssh -L`` / ``ssh -D`` channel to the pod itself becomes exactly one WebSocket
(``v4.channel.k8s.io``) with one port: channel 0 carries data both ways, channel 1
the server's errors. Right after the upgrade the server writes, on each of the two,
the port number as 2 bytes little-endian (``shared/k8s-api-notes.md`` §2.2);
:func:`open_portforward` returns only once both are through, and checks them.

The stream is an :class:`~.execstream.ExecStream` whose reader knows these channels:
data frames on channel 0 are written to the :class:`~.execstream.OutputSink` (the SSH
channel) and the reader waits on ``sink.wait_writable()`` before the next frame, and
client bytes are queued as channel-0 frames with the exec writer's high/low water
marks -- the same flow control as exec streams, and the same clean close (the Close
handshake completes before :meth:`PortForwardStream.run` returns).

The server never confirms that it reached the port. When the dial fails it writes the
reason on channel 1 (``... dial tcp4 127.0.0.1:8080: connect: connection refused``)
and closes; :meth:`PortForwardStream.run` returns that text (None when the stream
simply ended). There is no half-close on this protocol: the client's EOF cannot be
passed on, so the stream lives until either side closes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..errors import ExecError
from .bridge import translate
from .execstream import V4, ExecStream, OutputSink

ANNOUNCE_TIMEOUT = 10.0
"""Seconds the server may take to announce the port after the upgrade."""


class ForwardOpenError(ExecError):
    """The port-forward stream could not be opened (the message says why)."""


class PortForwardStream(ExecStream):
    """One forwarded port: ``send_stdin`` sends to it, :meth:`run` pumps it to the end."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, port: int) -> None:
        super().__init__(ws, V4)
        self.port = port

    def __repr__(self) -> str:
        return f"<PortForwardStream port={self.port} queued={self._queued}>"

    async def run(self, sink: OutputSink) -> str | None:  # type: ignore[override]
        """Pump until either side closes; the server's error text, or None."""
        try:
            error = await self._pump(sink)
        except ExecError:  # a write raced the server's close: those bytes had no port left
            return None
        return error.decode(errors="replace").strip() or None

    async def _read(self, sink: OutputSink, status: bytearray) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                return
            data: bytes = msg.data
            if len(data) <= 1:
                continue
            if data[0] == 0:
                sink.write_stdout(data[1:])
                await sink.wait_writable()
            elif data[0] == 1:
                status += data[1:]
                return  # the dial or the copy failed: the server closes the port


def _announced(msg: aiohttp.WSMessage, channel: int, port: int) -> str | None:
    """What is wrong with the first frame of ``channel`` (None: it announces ``port``)."""
    if msg.type is not aiohttp.WSMsgType.BINARY:
        return f"the API server closed the port-forward stream ({msg.type.name})"
    data: bytes = msg.data
    if len(data) != 3 or data[0] != channel or int.from_bytes(data[1:], "little") != port:
        return f"unexpected first frame on port-forward channel {channel}: {data[:16]!r}"
    return None


async def open_portforward(ws_client: Any, namespace: str, pod: str, port: int, *,
                           throttle: Callable[[], Awaitable[None]] | None = None,
                           ) -> PortForwardStream:
    """Open a port-forward WebSocket to ``port`` and read both port frames.

    Asyncio-flavoured; raises :class:`ForwardOpenError` (refused upgrade, unexpected
    frames). ``throttle`` is the API client's rate limiter, as for exec opens.
    """
    from kubernetes_asyncio.client import CoreV1Api

    if throttle is not None:
        await throttle()
    v1: Any = CoreV1Api(ws_client)
    try:
        cm = await v1.connect_get_namespaced_pod_portforward(
            pod, namespace, ports=str(port), _preload_content=False,
            _headers={"sec-websocket-protocol": V4})
        ws: aiohttp.ClientWebSocketResponse = await cm.__aenter__()
    except Exception as exc:
        ours = translate(exc)
        if ours is None:
            raise
        raise ForwardOpenError(str(ours)) from exc
    try:
        for channel in (0, 1):
            problem = _announced(await ws.receive(timeout=ANNOUNCE_TIMEOUT), channel, port)
            if problem is not None:
                raise ForwardOpenError(problem)
    except BaseException as exc:
        await ws.close()
        if isinstance(exc, TimeoutError):
            raise ForwardOpenError("the API server did not announce the port in time") from exc
        raise
    return PortForwardStream(ws, port)
