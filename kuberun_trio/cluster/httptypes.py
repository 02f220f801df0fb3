"""Values exchanged between the HTTP server (:mod:`.http`) and its handlers.

A handler receives a :class:`Request` and returns a :class:`Response` (whole
body), a :class:`StreamResponse` (chunked body: watches, ``logs -f``) or an
:class:`Upgrade` (the raw stream is handed to a WebSocket handler). Handlers may
raise :class:`~.status.ApiStatusError`, which the server renders.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import trio


@attrs.frozen
class Request:
    """One parsed HTTP request."""

    method: str
    """Upper-case method, e.g. ``"GET"``."""
    path: str
    """Percent-decoded URL path."""
    query: dict[str, list[str]]
    """``urllib.parse.parse_qs(..., keep_blank_values=True)`` of the query string."""
    headers: dict[str, str]
    """Lower-case names; repeated headers joined with ``", "``."""
    body: bytes = b""

    def param(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default


@attrs.frozen
class Response:
    """A response with its whole body."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class StreamResponse:
    """A chunked response; ``chunks()`` yields body pieces until the stream ends."""

    status: int
    chunks: Callable[[], AsyncIterator[bytes]]
    content_type: str = "application/json"


@attrs.frozen
class Upgrade:
    """Switch protocols: ``run(stream, request)`` owns the connection from here on."""

    run: Callable[[trio.abc.Stream, Request], Awaitable[None]]


Reply = Response | StreamResponse | Upgrade
Handler = Callable[[Request], Awaitable[Reply]]
