"""The ContainerSSH authentication webhook protocol (client side, trio-flavoured).

Theory of operation
-------------------
ContainerSSH asks an external server about every credential (its "auth webhook"):

* ``POST {url}/password`` with ``{"username", "remoteAddress", "connectionId",
  "passwordBase64"}``;
* ``POST {url}/pubkey`` with ``{"username", "remoteAddress", "connectionId",
  "publicKey"}`` (the key in authorized_keys form, ``ssh-ed25519 AAAA...``).

``remoteAddress`` is ``IP:port`` (``[v6]:port``). The answer is a JSON object with
``success`` (required) and optionally ``authenticatedUsername``, ``metadata``,
``environment`` and ``files``; each entry of the last three is ``{"value": ...,
"sensitive": bool}`` (a bare string is accepted too). ``metadata`` and ``environment``
become the :class:`~kuberun_trio.core.auth.AuthResult`'s; ``files`` are not supported
and are dropped with a warning.

Only an HTTP 200 with a well-formed body and ``"success": true`` lets a client in;
every error, non-200 status or timeout refuses it, with the reason for the log.
``authenticatedUsername``, as in ContainerSSH, becomes the connection's username (pod
labels, logs); one that is not a printable string of 1..255 characters refuses the login.

The URL may carry credentials (``https://user:secret@host/...``, a token in the query):
they are sent, but every reason and log line shows the URL with them masked
(:func:`~kuberun_trio.aio.webhook.redact_url`). A plain ``http://`` URL to a host that
is not loopback is allowed, with a warning at start (:attr:`AuthWebhook.plain_http_remote`):
the webhook receives passwords.
:func:`parse_response` is pure; :class:`AuthWebhook` adds the call (through
:func:`kuberun_trio.aio.bridge.run_aio`) under a trio deadline.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from ..aio.bridge import run_aio
from ..aio.webhook import post_json, redact, redact_url
from ..errors import AuthError
from ..observe.metrics import GatewayMetrics, unobserved
from .authconfig import WebhookConfig

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@attrs.frozen
class WebhookVerdict:
    """What the webhook said, or why its answer could not be used."""

    success: bool
    reason: str
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    environment: Mapping[str, str] = attrs.field(factory=dict)
    authenticated_username: str | None = None
    warnings: tuple[str, ...] = ()
    """Parts of a successful answer that were dropped (files, bad names)."""
    sensitive: frozenset[str] = frozenset()
    """``metadata.NAME`` / ``environment.NAME`` of the entries marked sensitive."""


def _values(data: object, field: str) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{field} must be an object")
    out: dict[str, str] = {}
    for name, entry in data.items():
        value = entry.get("value") if isinstance(entry, Mapping) else entry
        if not isinstance(value, str):
            raise ValueError(f"{field}.{name}: expected a string value")
        out[str(name)] = value
    return out


def parse_response(status: int, body: bytes) -> WebhookVerdict:
    """Judge a webhook answer (pure)."""
    if status != 200:
        return WebhookVerdict(False, f"webhook answered HTTP {status}")
    try:
        data = json.loads(body)
    except ValueError:
        return WebhookVerdict(False, "webhook answer is not JSON")
    if not isinstance(data, Mapping) or not isinstance(data.get("success"), bool):
        return WebhookVerdict(False, "webhook answer has no boolean 'success'")
    if not data["success"]:
        return WebhookVerdict(False, "webhook refused")
    warnings: list[str] = []
    try:
        metadata = _values(data.get("metadata"), "metadata")
        environment = _values(data.get("environment"), "environment")
    except ValueError as exc:
        return WebhookVerdict(False, f"webhook answer invalid: {exc}")
    for name in [n for n in environment if not _ENV_NAME.fullmatch(n)]:
        warnings.append(f"environment variable name {name!r} is invalid; dropped")
        del environment[name]
    if data.get("files"):
        warnings.append("files from the webhook are not supported; dropped")
    user = data.get("authenticatedUsername")
    if user is not None and user != "" and not _valid_username(user):
        return WebhookVerdict(False, "webhook answer invalid: authenticatedUsername must be "
                                     "a printable string of 1..255 characters")
    sensitive = frozenset(f"{field}.{name}" for field in ("metadata", "environment")
                          if isinstance(data.get(field), Mapping)
                          for name, entry in data[field].items()
                          if isinstance(entry, Mapping) and entry.get("sensitive") is True)
    return WebhookVerdict(True, "webhook accepted", metadata, environment,
                          user if isinstance(user, str) and user else None, tuple(warnings),
                          sensitive)


def _valid_username(user: object) -> bool:
    return isinstance(user, str) and 0 < len(user) <= 255 and user.isprintable()


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP (no DNS lookup: any other name is not loopback)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def password_request(connection_id: str, username: str, remote_address: str,
                     password: str) -> dict[str, str]:
    return {"username": username, "remoteAddress": remote_address,
            "connectionId": connection_id,
            "passwordBase64": base64.b64encode(password.encode("utf-8")).decode()}


def pubkey_request(connection_id: str, username: str, remote_address: str,
                   key_line: str) -> dict[str, str]:
    return {"username": username, "remoteAddress": remote_address,
            "connectionId": connection_id, "publicKey": key_line}


class AuthWebhook:
    """Calls one ContainerSSH-compatible webhook. Trio-flavoured; needs a trio-asyncio loop."""

    def __init__(self, config: WebhookConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self._base = config.url.rstrip("/")
        self.url = redact_url(config.url)
        """The URL fit for logs (credentials masked)."""
        self.metrics = metrics or unobserved()

    def __repr__(self) -> str:
        return f"<AuthWebhook {self.url} timeout={self.config.timeout:g}s>"

    @property
    def plain_http_remote(self) -> bool:
        """Plain ``http://`` to a host that is not loopback (passwords travel in clear)."""
        parts = urlsplit(self.config.url)
        return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")

    def _endpoint(self, endpoint: str) -> str:
        parts = urlsplit(self._base)  # the endpoint goes before a query string
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{endpoint}"))

    async def _ask(self, endpoint: str, payload: Mapping[str, Any]) -> WebhookVerdict:
        url = self._endpoint(endpoint)
        self.metrics.auth_server_request(endpoint)
        with trio.move_on_after(self.config.timeout):
            try:
                response = await run_aio(post_json, url, payload, cafile=self.config.cacert)
            except AuthError as exc:
                self.metrics.auth_server_failure(endpoint, "connection")
                return WebhookVerdict(False, redact(str(exc), url))
            verdict = parse_response(response.status, response.body)
            if response.status != 200:
                self.metrics.auth_server_failure(endpoint, "status")
            elif not verdict.success and verdict.reason != "webhook refused":
                self.metrics.auth_server_failure(endpoint, "invalid-response")
            return verdict
        self.metrics.auth_server_failure(endpoint, "timeout")
        return WebhookVerdict(False, f"webhook {redact_url(url)}: no answer within "
                                     f"{self.config.timeout:g} s")

    async def check_password(self, connection_id: str, username: str, remote_address: str,
                             password: str) -> WebhookVerdict:
        return await self._ask("password", password_request(
            connection_id, username, remote_address, password))

    async def check_public_key(self, connection_id: str, username: str, remote_address: str,
                               key_line: str) -> WebhookVerdict:
        return await self._ask("pubkey", pubkey_request(
            connection_id, username, remote_address, key_line))
