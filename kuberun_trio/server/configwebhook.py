"""ContainerSSH's configuration webhook (``configserver``): each connection's own settings.

Theory of operation
-------------------
The server's ``GatewayOptions.configure`` (see :mod:`kuberun_trio.core.connsettings`):
once a login is proven, :meth:`ConfigWebhook.configure` POSTs JSON to ``configserver.url``
as given (no path is added)::

    {"username": "alice", "authenticatedUsername": "alice", "remoteAddress": "ip:port",
     "connectionId": "...", "clientVersion": "SSH-2.0-...",
     "metadata": {"NAME": {"value": "...", "sensitive": false}}, "environment": {...},
     "files": {}}

``metadata`` and ``environment`` are the login's (from the auth webhook or
``authorized_keys`` ``environment=``); entries marked sensitive are left out unless
``configserver.transmitSensitiveMetadata``. The answer::

    {"config": {"kubernetes": {...}, "security": {...}},
     "metadata": {...}, "environment": {"NAME": {"value": "..."}},
     "files": {"/abs/path": {"value": "<base64>"}}}

(a bare string is accepted for a ``{value}`` entry). The ``kubernetes`` and ``security``
sections of ``config`` are deep-merged over the configuration file's (mappings merge
key by key, ``null`` changes nothing, lists and scalars replace) for this connection
only, and the result is checked with the same validator as ``check-config``
(:func:`~kuberun_trio.server.config.parse_server_config`). ``kubernetes.connection``
cannot be set (every pod goes to the gateway's cluster), nor can the gateway-wide
``security.maxConnectionsPerUser`` / ``security.fdReserve``; other sections of ``config``
are ignored with a warning, once per section. ``environment`` reaches every session
(it wins over the login's and the client's); ``metadata`` is added to the login's
(pod labels/annotations per ``exposeAuthMetadataAs*``); ``files`` are written into the
pod before the first session (:mod:`kuberun_trio.aio.podfiles`).

Failures. A request that fails (no connection, TLS, HTTP status other than 200, an
answer that is not a JSON object, over 1 MiB) is retried every second until
``configserver.timeout`` (default 2 s) has passed since the first; then the login is
refused with "Cannot get configuration at this time" (the client's disconnect message)
and the detail in the log. A well-formed answer whose merged configuration does not
validate refuses the login at once: the client is told its configuration is invalid,
the log names every bad key. Metrics: ``containerssh_config_server_requests_total{retry}``
and ``containerssh_config_server_failures_total{type,retry,reason}`` (``type`` ``soft``:
retried, ``hard``: given up; ``reason`` ``connection``, ``status``, ``invalid-response``,
``timeout``, ``invalid-config``).

Like the auth webhook's, the URL may carry credentials: they are sent, never logged
(:func:`~kuberun_trio.aio.webhook.redact_url`); plain ``http://`` to a host that is not
loopback is allowed with a warning at start (:attr:`ConfigWebhook.plain_http_remote`).
:func:`config_request`, :func:`parse_reply` and :func:`merged_settings` are pure.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ..aio.bridge import run_aio
from ..aio.webhook import post_json, redact, redact_url
from ..configtools import key_path
from ..core import shellwrap
from ..core.connsettings import (
    CANNOT_CONFIGURE,
    MAX_FILE_BYTES,
    MAX_FILES,
    ConfigRefused,
    ConnectionSettings,
    LoginInfo,
    file_problem,
)
from ..errors import AuthError, ConfigError, ConfigErrors
from ..observe.metrics import GatewayMetrics, unobserved
from .authwebhook import is_loopback_host
from .config import ConfigServerConfig, parse_server_config

log = logging.getLogger(__name__)

MERGED_SECTIONS = ("kubernetes", "security")
"""The sections of a reply's ``config`` that apply to the connection."""
GATEWAY_WIDE = {"kubernetes": ("connection",),
                "security": ("maxConnectionsPerUser", "fdReserve")}
"""Keys of those sections that cannot differ per connection (a reply setting them is refused)."""
RETRY_INTERVAL = 1.0
INVALID_CONFIG = "the configuration server's answer for this connection is invalid"
"""What the client reads when the merged configuration does not validate."""


class ReplyError(Exception):
    """A reply that cannot be used; ``reason`` is the metric's label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@attrs.frozen
class ConfigReply:
    """A well-formed answer, not yet merged."""

    config: Mapping[str, Any]
    """The ``kubernetes``/``security`` parts of ``config``."""
    ignored: tuple[str, ...]
    """Other sections of ``config``, ignored."""
    metadata: Mapping[str, str]
    environment: Mapping[str, str]
    files: Mapping[str, str]
    """Path → base64 text (checked in :func:`merged_settings`)."""


def config_request(login: LoginInfo, *, transmit_sensitive: bool = False) -> dict[str, Any]:
    """The JSON body for ``login``."""
    auth = login.auth

    def entries(values: Mapping[str, str], sensitive: frozenset[str]) -> dict[str, Any]:
        return {name: {"value": value, "sensitive": name in sensitive}
                for name, value in values.items()
                if transmit_sensitive or name not in sensitive}

    return {"username": login.username, "authenticatedUsername": login.authenticated_username,
            "remoteAddress": login.remote_address, "connectionId": login.connection_id,
            "clientVersion": login.client_version,
            "metadata": entries(auth.metadata, auth.sensitive_metadata),
            "environment": entries(auth.environment, auth.sensitive_environment),
            "files": {}}


def _values(data: object, field: str) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ReplyError("invalid-response", f"{field} must be an object")
    out: dict[str, str] = {}
    for name, entry in data.items():
        value = entry.get("value") if isinstance(entry, Mapping) else entry
        if not isinstance(value, str):
            raise ReplyError("invalid-response",
                             f"{key_path(field, name)}: expected a string value")
        out[str(name)] = value
    return out


def parse_reply(status: int, body: bytes) -> ConfigReply:
    """Judge an answer (pure); raises :class:`ReplyError` when it cannot be used."""
    if status != 200:
        raise ReplyError("status", f"answered HTTP {status}")
    try:
        data = json.loads(body)
    except ValueError:
        raise ReplyError("invalid-response", "the answer is not JSON") from None
    if not isinstance(data, Mapping):
        raise ReplyError("invalid-response", "the answer is not a JSON object")
    config = data.get("config") or {}
    if not isinstance(config, Mapping):
        raise ReplyError("invalid-response", "config must be an object")
    return ConfigReply(
        config={k: v for k, v in config.items() if k in MERGED_SECTIONS},
        ignored=tuple(sorted(str(k) for k in config if k not in MERGED_SECTIONS)),
        metadata=_values(data.get("metadata"), "metadata"),
        environment=_values(data.get("environment"), "environment"),
        files=_values(data.get("files"), "files"))


def deep_merge(base: object, overlay: object) -> object:
    """``overlay`` over ``base``: mappings merge key by key, ``null`` changes nothing (as
    in ContainerSSH, whose Go structs keep a field a JSON ``null`` names), anything else
    replaces."""
    if overlay is None:
        return base
    if isinstance(base, Mapping) and isinstance(overlay, Mapping):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return overlay


def merged_settings(reply: ConfigReply, base: Mapping[str, Any]) -> ConnectionSettings:
    """The connection's settings: ``reply`` over the configuration mapping ``base``.

    Raises :class:`~kuberun_trio.errors.ConfigError` / ``ConfigErrors`` naming every
    bad key (of the merged configuration, of ``environment`` or ``files``).
    """
    problems: list[ConfigError] = []
    data = dict(base)
    for section, value in reply.config.items():
        if isinstance(value, Mapping):
            for key in GATEWAY_WIDE[section]:
                if key in value:
                    problems.append(ConfigError(f"{section}.{key}",
                                                "cannot be set per connection"))
        data[section] = deep_merge(base.get(section), value)
    try:
        config = parse_server_config(data, instance="configserver")
    except ConfigErrors as exc:
        problems.extend(exc.errors)
    except ConfigError as exc:
        problems.append(exc)
    for name, value in reply.environment.items():
        if not shellwrap.valid_env_name(name):
            problems.append(ConfigError(key_path("environment", name), "invalid variable name"))
        elif not shellwrap.argv_safe(value):
            problems.append(ConfigError(key_path("environment", name),
                                        "value holds a NUL or invalid text"))
    files = _files(reply.files, problems)
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)
    return ConnectionSettings(kubernetes=config.kubernetes, environment=reply.environment,
                              metadata=reply.metadata, files=files,
                              max_sessions=config.security.max_sessions,
                              max_signals_per_second=config.security.max_signals_per_second,
                              forwarding=config.security.forwarding.policy(),
                              agent=config.security.forwarding.agent)


def _files(raw: Mapping[str, str], problems: list[ConfigError]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if len(raw) > MAX_FILES:
        problems.append(ConfigError("files", f"more than {MAX_FILES} files"))
        return files
    for path, text in raw.items():
        where = key_path("files", path)
        problem = file_problem(path)
        if problem is not None:
            problems.append(ConfigError(where, problem))
            continue
        try:
            files[path] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            problems.append(ConfigError(where, "value is not base64"))
    total = sum(len(content) for content in files.values())
    if total > MAX_FILE_BYTES:
        problems.append(ConfigError("files", f"{total} bytes in all, over {MAX_FILE_BYTES}"))
    return files


class ConfigWebhook:
    """Calls one ContainerSSH-compatible configuration webhook. Trio-flavoured."""

    def __init__(self, config: ConfigServerConfig, base: Mapping[str, Any], *,
                 metrics: GatewayMetrics | None = None,
                 logger: logging.Logger | None = None) -> None:
        assert config.url, "configserver.url is not set"
        self.config = config
        self._url = config.url
        self.url = redact_url(config.url)
        """The URL fit for logs (credentials masked)."""
        self.base = base
        """The configuration mapping the answers are merged over."""
        self.metrics = metrics or unobserved()
        self._log = logger or log
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"<ConfigWebhook {self.url} timeout={self.config.timeout:g}s>"

    @property
    def plain_http_remote(self) -> bool:
        """Plain ``http://`` to a host that is not loopback."""
        parts = urlsplit(self._url)
        return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")

    async def _post(self, payload: Mapping[str, Any]) -> ConfigReply:
        try:
            response = await run_aio(post_json, self._url, payload, cafile=self.config.cacert,
                                     certfile=self.config.cert, keyfile=self.config.key,
                                     allow_redirects=self.config.allow_redirects)
        except AuthError as exc:
            raise ReplyError("connection", redact(str(exc), self._url)) from exc
        return parse_reply(response.status, response.body)

    async def ask(self, login: LoginInfo) -> ConfigReply:
        """The answer for ``login``, retried every second until the timeout.

        Raises :class:`ReplyError` (reason, and the last failure) when there is none.
        """
        payload = config_request(login,
                                 transmit_sensitive=self.config.transmit_sensitive_metadata)
        deadline = trio.current_time() + self.config.timeout
        attempt, last = 0, ""
        while True:
            self.metrics.config_server_request(attempt)
            failure: ReplyError | None = None
            with trio.move_on_at(deadline):
                try:
                    return await self._post(payload)
                except ReplyError as exc:
                    failure = exc
            within = (f"no usable answer within {self.config.timeout:g} s ({attempt + 1} "
                      f"attempt{'s' if attempt else ''}")
            if failure is None:  # the deadline struck during the request
                self.metrics.config_server_failure("timeout", retry=attempt)
                raise ReplyError("timeout", f"{within}; the last one got no answer in time"
                                 + (f", the one before: {last})" if last else ")"))
            last = str(failure)
            retry = trio.current_time() + RETRY_INTERVAL < deadline
            self.metrics.config_server_failure(failure.reason, retry=attempt, hard=not retry)
            if not retry:
                raise ReplyError(failure.reason, f"{within}; last: {last})")
            await trio.sleep(RETRY_INTERVAL)
            attempt += 1

    async def configure(self, login: LoginInfo) -> ConnectionSettings:
        """``GatewayOptions.configure``: ask, merge, check; ConfigRefused when that fails."""
        started = time.monotonic()
        fields = {"connection_id": login.connection_id, "username": login.authenticated_username,
                  "remote_address": login.remote_address}
        try:
            reply = await self.ask(login)
        except ReplyError as exc:
            raise ConfigRefused(CANNOT_CONFIGURE,
                                f"configuration webhook {self.url}: {exc}") from exc
        for section in reply.ignored:
            if section not in self._warned:
                self._warned.add(section)
                self._log.warning("configuration webhook %s: config.%s is ignored (only %s "
                                  "apply per connection); said once", self.url, section,
                                  " and ".join(MERGED_SECTIONS),
                                  extra={"event": "config-ignored", "section": section,
                                         **fields})
        try:
            settings = merged_settings(reply, self.base)
        except ConfigError as exc:
            errors = exc.errors if isinstance(exc, ConfigErrors) else (exc,)
            self.metrics.config_server_failure("invalid-config")
            raise ConfigRefused(INVALID_CONFIG, "configuration webhook answer invalid: "
                                + "; ".join(str(e) for e in errors)) from exc
        self._log.info("configuration for connection %s: %s", login.connection_id,
                       ", ".join(sorted(reply.config)) or "the file's", extra={
                           "event": "config-received", "sections": sorted(reply.config),
                           "files": sorted(settings.files),
                           "duration_ms": round(1000 * (time.monotonic() - started)),
                           **fields})
        return settings
