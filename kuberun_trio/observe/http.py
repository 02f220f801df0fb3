"""A tiny trio HTTP/1.1 server (h11) for the metrics and health endpoints.

Theory of operation
-------------------
:func:`serve_http` serves one request per TCP connection (``Connection: close``) with a
synchronous-decision, asynchronous-answer :data:`Handler`: ``(method, path) →``
:class:`Response`. Only ``GET`` and ``HEAD`` are answered (405 otherwise). Anyone who can
reach the port can talk to it, so every resource is bounded: at most
:data:`MAX_CONNECTIONS` connections at once (more are closed at once), a request head of at
most :data:`MAX_REQUEST_BYTES`, and :data:`REQUEST_TIMEOUT` seconds for the whole exchange.

:func:`open_listeners` binds ``host:port``; with ``next_free`` it tries the following
ports when the port is taken (the demo's "9100 or the next free port").
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT = 10.0


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str], Awaitable[Response]]
"""``(method, path without the query) → Response``; trio-flavoured."""


async def open_listeners(host: str, port: int, *,
                         next_free: int = 0) -> list[trio.SocketListener]:
    """Bind ``host:port``; if taken and ``next_free`` > 0, try up to that many next ports."""
    for candidate in range(port, port + next_free + 1):
        try:
            return await trio.open_tcp_listeners(candidate, host=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or candidate >= min(port + next_free, 65535):
                raise
    raise AssertionError("unreachable")


def bound_address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    name = listeners[0].socket.getsockname()
    return str(name[0]), int(name[1])


async def serve_http(listeners: list[trio.SocketListener], handler: Handler) -> None:
    """Serve until cancelled (closes the listeners then). Trio-flavoured."""
    limit = trio.Semaphore(MAX_CONNECTIONS)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                limit.acquire_nowait()
            except trio.WouldBlock:
                return  # too many at once: close
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _exchange(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                pass
            finally:
                limit.release()

    await trio.serve_listeners(one, listeners)


async def _exchange(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    request: h11.Request | None = None
    while request is None:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:  # malformed or oversized: say so, then close
            status = HTTPStatus(exc.error_status_hint)
            await stream.send_all(f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                                  "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            return
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_REQUEST_BYTES)
            conn.receive_data(data)
            if not data:
                return
        elif isinstance(event, h11.Request):
            request = event
        else:
            return
    method = request.method.decode("ascii", "replace")
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        response = Response(405, b"method not allowed\n")
    else:
        try:
            response = await handler(method, path)
        except Exception:
            log.exception("HTTP handler failed for %s", path[:100])
            response = Response(500, b"internal error\n")
    headers = [("Content-Type", response.content_type),
               ("Content-Length", str(len(response.body))), ("Connection", "close"),
               ("Cache-Control", "no-store")]
    await stream.send_all(conn.send(h11.Response(status_code=response.status,
                                                 headers=headers)) or b"")
    if method != "HEAD":
        await stream.send_all(conn.send(h11.Data(data=response.body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
