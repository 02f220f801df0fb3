"""One JSON POST to a webhook (asyncio side, aiohttp).

Theory of operation
-------------------
:func:`post_json` is asyncio-flavoured; the trio side calls it through
:func:`kuberun_trio.aio.bridge.run_aio` inside its own cancel scope, so a trio deadline
cancels the request. Each call opens its own ``aiohttp.ClientSession`` -- an auth
webhook is called a few times per connection, and a session per call leaves nothing to
close at shutdown. The session ignores proxy variables (``trust_env=False``: a webhook is
an internal service and must not be reached through whatever proxy the environment names),
follows no redirects, and reads at most :data:`MAX_RESPONSE_BYTES` of the answer.

Every failure -- connection refused, TLS, an oversized body -- becomes a
:class:`~kuberun_trio.errors.AuthError` with the original chained; an HTTP error status
is *not* a failure here, the caller judges the status.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs

from ..errors import AuthError

MAX_RESPONSE_BYTES = 1024 * 1024


@attrs.frozen
class WebhookResponse:
    """What the webhook answered."""

    status: int
    body: bytes


async def post_json(url: str, payload: Mapping[str, Any], *,
                    cafile: str | None = None) -> WebhookResponse:
    """POST ``payload`` as JSON to ``url``. Asyncio-flavoured; raises AuthError on failure.

    No timeout parameter: the caller bounds the call with a (trio) cancel scope.
    """
    try:
        tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
        async with aiohttp.ClientSession(trust_env=False) as session, session.post(
                url, data=json.dumps(payload).encode(), ssl=tls, allow_redirects=False,
                headers={"Content-Type": "application/json",
                         "Accept": "application/json"}) as response:
            body = await response.content.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise AuthError(f"webhook {url}: response larger than "
                                f"{MAX_RESPONSE_BYTES} bytes")
            return WebhookResponse(response.status, body)
    except (aiohttp.ClientError, ssl.SSLError, OSError, asyncio.IncompleteReadError) as exc:
        raise AuthError(f"webhook {url}: {type(exc).__name__}: {exc}") from exc
