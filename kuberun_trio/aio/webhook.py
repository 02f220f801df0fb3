"""One JSON POST to a webhook (asyncio side, aiohttp).

Theory of operation
-------------------
:func:`post_json` is asyncio-flavoured; the trio side calls it through
:func:`kuberun_trio.aio.bridge.run_aio` inside its own cancel scope, so a trio deadline
cancels the request. Each call opens its own ``aiohttp.ClientSession`` -- an auth
webhook is called a few times per connection, and a session per call leaves nothing to
close at shutdown. The session ignores proxy variables (``trust_env=False``: a webhook is
an internal service and must not be reached through whatever proxy the environment names),
follows no redirects (unless the caller allows them: at most 3), and reads the whole
answer -- chunked, or a fixed length arriving in pieces -- up to
:data:`MAX_RESPONSE_BYTES`; a larger one is refused as too large (by its
``Content-Length`` before reading, or once the bytes read pass the cap).

Every failure -- connection refused, TLS, an oversized body -- becomes a
:class:`~kuberun_trio.errors.AuthError` with the original chained; an HTTP error status
is *not* a failure here, the caller judges the status. Error messages name the URL
without its credentials (:func:`redact_url`; user and password in the URL are sent as
HTTP basic auth, a query string is not shown).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import aiohttp
import attrs

from ..errors import AuthError

MAX_RESPONSE_BYTES = 1024 * 1024


@attrs.frozen
class WebhookResponse:
    """What the webhook answered."""

    status: int
    body: bytes


def redact_url(url: str) -> str:
    """``url`` fit for logs: user info and query replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact(text: str, url: str) -> str:
    """``text`` with every secret part of ``url`` (user info, query) masked."""
    parts = urlsplit(url)
    secrets = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        secrets += [userinfo, *userinfo.split(":", 1), unquote(userinfo)]
        secrets += unquote(userinfo).split(":", 1)
    if parts.query:
        secrets += [parts.query, unquote(parts.query)]
        secrets += [v for pair in parse_qsl(parts.query) for v in pair[1:] if v]
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


async def _read_body(response: aiohttp.ClientResponse, url: str) -> bytes:
    declared = response.content_length
    if declared is not None and declared > MAX_RESPONSE_BYTES:
        raise AuthError(f"webhook {redact_url(url)}: response too large ({declared} bytes, "
                        f"at most {MAX_RESPONSE_BYTES})")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise AuthError(f"webhook {redact_url(url)}: response too large (more than "
                            f"{MAX_RESPONSE_BYTES} bytes)")
    return bytes(body)


async def post_json(url: str, payload: Mapping[str, Any], *,
                    cafile: str | None = None, certfile: str | None = None,
                    keyfile: str | None = None,
                    allow_redirects: bool = False) -> WebhookResponse:
    """POST ``payload`` as JSON to ``url``. Asyncio-flavoured; raises AuthError on failure.

    ``certfile``/``keyfile``: a client certificate (PEM files) for mutual TLS.
    ``allow_redirects``: follow 307/308 redirects (aiohttp keeps the method and body).
    No timeout parameter: the caller bounds the call with a (trio) cancel scope.
    """
    try:
        tls: ssl.SSLContext | bool = True
        if cafile or certfile:
            context = ssl.create_default_context(cafile=cafile)
            if certfile:
                context.load_cert_chain(certfile, keyfile)
            tls = context
        async with aiohttp.ClientSession(trust_env=False) as session, session.post(
                url, data=json.dumps(payload).encode(), ssl=tls,
                allow_redirects=allow_redirects, max_redirects=3,
                headers={"Content-Type": "application/json",
                         "Accept": "application/json"}) as response:
            return WebhookResponse(response.status, await _read_body(response, url))
    except (aiohttp.ClientError, ssl.SSLError, OSError, asyncio.IncompleteReadError,
            ValueError) as exc:
        raise AuthError(redact(f"webhook {redact_url(url)}: {type(exc).__name__}: {exc}",
                               url)) from exc
