"""The embedded cluster's HTTP/1.1 server (h11 over trio TCP or TLS).

Theory of operation
-------------------
:func:`serve_api` accepts connections and runs :func:`_serve_connection` for
each in the server's nursery. A connection is a keep-alive loop: h11 parses one
request (head and body), the request is authenticated (bearer token, the real
401 Status otherwise), held while the fault injector stalls the server, checked
against the fault injector (an armed failure
answers 500 ``InternalError`` or 429 ``TooManyRequests`` with ``Retry-After``),
then routed: ``.../pods/{name}/{exec,attach,portforward}`` to the streaming
handler, everything else to the REST handler. What the handler returns decides
the rest:

* :class:`Response` -- sent with ``Content-Length``; the loop continues.
* :class:`StreamResponse` -- sent chunked until the chunk iterator ends; a
  reader watches the socket meanwhile so a client that goes away ends the
  stream at once (watches and ``logs -f`` would otherwise linger until their
  next write).
* :class:`Upgrade` -- h11 is done; the raw stream (with any bytes h11 had
  already buffered) belongs to the upgrade handler until it returns.

Every request lands in the :class:`RequestLog` with the time it was received
and the time its outcome was known. Only HTTP/1.1 is spoken (ALPN offers
``http/1.1`` only, as kubectl then does not try HTTP/2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable

import attrs
import h11
import trio

from .faults import Faults, RequestFailure
from .httptypes import Reply, Request, Response, StreamResponse, Upgrade
from .requestlog import RequestLog
from .status import ApiStatusError, status_dict

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
"""The real API server limits request bodies to 3 MiB."""
_READ = 65536

_POD_PATH = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_NS_PATH = re.compile(r"^/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<res>[^/]+))?)?$")
_GROUP_PATH = re.compile(
    r"^/apis/[^/]+/[^/]+/(?:namespaces/(?P<ns>[^/]+)/)?(?P<res>[^/]+)(?:/(?P<name>[^/]+))?$")
STREAMING_SUBRESOURCES = frozenset({"exec", "attach", "portforward"})


@attrs.frozen
class Routes:
    """Where requests go."""

    rest: Callable[[Request], Awaitable[Reply]]
    """Every request that is not a streaming subresource."""
    streaming: Callable[[Request, str], Awaitable[Reply]]
    """``exec``/``attach``/``portforward``; the second argument is the subresource."""


def classify(req: Request) -> tuple[str, str, str | None, str | None]:
    """``(verb, resource, namespace, name)`` of a request, as RBAC would see it."""
    m = _POD_PATH.match(req.path)
    if m:
        ns, name, sub = m["ns"], m["name"], m["sub"]
        resource = f"pods/{sub}" if sub else "pods"
    elif (g := _GROUP_PATH.match(req.path)) is not None:
        ns, name, sub, resource = g["ns"], g["name"], None, g["res"]
    else:
        m = _NS_PATH.match(req.path)
        ns, name, sub = None, None, None
        resource = "nonresource"
        if m:
            if m["res"]:
                ns, resource = m["name"], m["res"]
            else:
                name, resource = m["name"], "namespaces"
    watch = req.param("watch")
    watching = watch is not None and watch.lower() not in ("0", "false")
    verb = {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(req.method, "get" if name else ("watch" if watching else "list"))
    if resource.startswith("pods/") and sub in STREAMING_SUBRESOURCES:
        verb = "create" if req.method == "POST" else "get"
    return verb, resource, ns, name


def _failure_response(failure: RequestFailure) -> Response:
    if failure.code == 429:
        body = status_dict(429, "TooManyRequests", "the server has received too many requests "
                           "and has asked us to try again later",
                           details={"retryAfterSeconds": failure.retry_after or 1})
        headers: tuple[tuple[str, str], ...] = (("Retry-After", str(failure.retry_after or 1)),)
    else:
        reason = "InternalError" if failure.code == 500 else "ServiceUnavailable"
        body = status_dict(failure.code, reason,
                           "Internal error occurred: injected fault" if failure.code == 500
                           else "injected fault")
        headers = ()
    return Response(failure.code, _json(body), headers=headers)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


UNAUTHORIZED = _json(status_dict(401, "Unauthorized", "Unauthorized"))


class _PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes h11 had already read past the request head."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream, self._prefix = stream, prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        send_eof = getattr(self._stream, "send_eof", None)
        if send_eof is not None:
            await send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


@attrs.define
class ApiServer:
    """The HTTP side of the embedded cluster."""

    routes: Routes
    request_log: RequestLog
    faults: Faults
    token: str | None
    """Bearer token every request must carry; None disables authentication."""

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                req = await self._read_request(conn, stream)
                if req is None:
                    return
                received = trio.current_time()
                reply = await self._dispatch(req)
                _, _, ns, name = classify(req)
                status = await self._send(conn, stream, req, reply)
                self.request_log.add("http", req.method, req.path, status,
                                     namespace=ns, pod=name if "/pods" in req.path else None,
                                     received=received)
                if isinstance(reply, Upgrade):
                    prefix = conn.trailing_data[0]
                    await reply.run(_PrefixedStream(stream, prefix) if prefix else stream, req)
                    return
                if isinstance(reply, StreamResponse):
                    return  # its hang-up watcher may have read past the request: close
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                ssl.SSLError) as exc:
            log.debug("connection ended: %r", exc)
        except Exception:  # one connection's bug must not take the API server down
            log.exception("API connection failed")
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _read_request(self, conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ)
                conn.receive_data(bytes(data))
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.ProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _to_request(head, bytes(body))

    async def _dispatch(self, req: Request) -> Reply:
        if self.token is not None and req.headers.get("authorization") != f"Bearer {self.token}":
            return Response(401, UNAUTHORIZED)
        await self.faults.pass_stall()
        verb, resource, _, name = classify(req)
        query = urllib.parse.urlencode(req.query, doseq=True)
        failure = self.faults.take_request_failure(
            verb, resource, target=f"{req.method} {req.path}{'?' if query else ''}{query}",
            pod=name if resource.startswith("pods") else None)
        if failure is not None:
            return _failure_response(failure)
        try:
            sub = classify_streaming(req.path)
            if sub is not None:
                return await self.routes.streaming(req, sub)
            return await self.routes.rest(req)
        except ApiStatusError as exc:
            return Response(exc.code, exc.body, content_type=exc.content_type)

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, req: Request,
                    reply: Reply) -> int:
        if isinstance(reply, Upgrade):
            return 101
        if isinstance(reply, Response):
            headers = [("Content-Type", reply.content_type),
                       ("Content-Length", str(len(reply.body))),
                       ("Cache-Control", "no-cache, private"), *reply.headers]
            data = conn.send(h11.Response(status_code=reply.status, headers=headers))
            data += conn.send(h11.Data(data=reply.body)) if reply.body else b""
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data or b"")
            return reply.status
        await self._send_stream(conn, stream, reply)
        return reply.status

    async def _send_stream(self, conn: h11.Connection, stream: trio.abc.Stream,
                           reply: StreamResponse) -> None:
        head = h11.Response(status_code=reply.status, headers=[
            ("Content-Type", reply.content_type), ("Transfer-Encoding", "chunked"),
            ("Cache-Control", "no-cache, private")])
        await stream.send_all(conn.send(head) or b"")

        async def watch_for_hangup(cancel: trio.CancelScope) -> None:
            # The client sends nothing more on this connection; EOF (or a reset) means
            # it left.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(_READ):
                    pass
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_for_hangup, nursery.cancel_scope)
                chunks = reply.chunks()
                try:
                    async for chunk in chunks:
                        if chunk:
                            await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                finally:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        with trio.CancelScope(shield=True):
                            await aclose()
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as group:
            # One client that went away mid-stream must not take the server down.
            raise trio.BrokenResourceError("the client went away") from group


def classify_streaming(path: str) -> str | None:
    """``exec``/``attach``/``portforward`` if ``path`` is such a pod subresource."""
    m = _POD_PATH.match(path)
    if m and m["sub"] in STREAMING_SUBRESOURCES:
        return str(m["sub"])
    return None


def _to_request(head: h11.Request, body: bytes) -> Request:
    target = head.target.decode("latin-1")
    raw_path, _, raw_query = target.partition("?")
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key, val = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {val}" if key in headers else val
    return Request(
        method=head.method.decode("ascii").upper(),
        path=urllib.parse.unquote(raw_path),
        query=urllib.parse.parse_qs(raw_query, keep_blank_values=True),
        headers=headers,
        body=body,
    )


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context for the API server (HTTP/1.1 only)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve_api(
    server: ApiServer,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound ``(host, port)`` through ``task_status``."""
    tcp = await trio.open_tcp_listeners(port, host=host)
    bound = tcp[0].socket.getsockname()
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in tcp]
    async with trio.open_nursery() as nursery:
        for lst in listeners:
            nursery.start_soon(trio.serve_listeners, server.serve_connection, [lst])
        task_status.started((bound[0], bound[1]))
