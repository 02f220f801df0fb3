"""The server's :class:`~kuberun_trio.core.auth.Authenticator`: keys, passwords, webhook.

Theory of operation
-------------------
:func:`build_authenticator` turns the ``auth`` section into a :class:`ServerAuthenticator`.
It asks its sources in order and the first *yes* wins:

* public keys: the ``authorized_keys`` files (:mod:`.authkeys`), then the webhook;
* passwords: the password file (:mod:`.passwords`), then the webhook (:mod:`.authwebhook`).

Deny by default: with no source configured nobody gets in (a warning says so at start),
and a source that fails -- unreadable file, webhook down or slow -- answers *no*.

Throttling, tries per connection and the ``auth allow`` line belong to the gateway
(:mod:`kuberun_trio.gateway.login`): it asks this authenticator only once an attempt's turn
has come, and logs ``allow`` once, when the whole login is proven. Here every *refusal* is
logged, at INFO, through :func:`~kuberun_trio.core.refusals.refuse` with
``extra={"event": "auth", "connection_id", "username", "method", "result": "deny",
"reason", "remote_address"}`` plus ``fingerprint`` for keys (never a password, never
metadata values); a password check refused by the full hashing queue logs
``event="auth-busy"``. A webhook answer about a public key is kept for a minute per
connection, so the signed request that follows an accepted query does not ask again.

Password checks go through one :class:`~.hashing.HashQueue` (``auth.passwordHashing``):
one check per client address at a time, bounded, refused at once when full.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import OrderedDict
from typing import Any

import trio

from ..core.auth import AuthResult
from ..core.refusals import refuse
from ..gateway.throttle import address_key
from ..observe.metrics import GatewayMetrics
from .authconfig import AuthConfig
from .authkeys import AuthorizedKeysFiles, KeyLineError, client_ip, offered_key
from .authwebhook import AuthWebhook, WebhookVerdict
from .hashing import HashQueue, HashQueueFull
from .passwords import PasswordFile

_CACHE_TTL = 60.0
_CACHE_ENTRIES = 4096


def key_fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class ServerAuthenticator:
    """Authorized keys, a password file and a webhook. Trio-flavoured."""

    def __init__(self, config: AuthConfig, *, logger: logging.Logger,
                 hashing: HashQueue | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self._log = logger
        self.hashing = hashing or HashQueue(config.password_hashing.threads,
                                            config.password_hashing.queue)
        self.keys = AuthorizedKeysFiles(config.authorized_keys, logger,
                                        home=config.home_directory) \
            if config.authorized_keys else None
        self.passwords = PasswordFile(config.password_file, logger, hashing=self.hashing) \
            if config.password_file is not None else None
        self.webhook = (AuthWebhook(config.webhook, metrics) if config.webhook is not None
                        else None)
        self._recent: OrderedDict[tuple[str, str, str], tuple[AuthResult, float]] = OrderedDict()
        if self.keys is None and self.passwords is None and self.webhook is None:
            logger.warning("no authentication configured (auth.authorizedKeys, "
                           "auth.passwordFile, auth.webhook): every login will be refused",
                           extra={"event": "auth-config"})
        if self.webhook is not None and self.webhook.plain_http_remote:
            logger.warning("auth.webhook.url %s uses plain http:// to a host that is not "
                           "loopback: passwords travel unencrypted (use https://)",
                           self.webhook.url, extra={"event": "auth-config"})

    def __repr__(self) -> str:
        return (f"<ServerAuthenticator keys={self.keys!r} passwords={self.passwords!r} "
                f"webhook={self.webhook!r}>")

    def methods(self) -> frozenset[str]:
        offered = set()
        if self.keys is not None or self.webhook is not None:
            offered.add("publickey")
        if self.passwords is not None or self.webhook is not None:
            offered.add("password")
        # Nothing configured: still offer publickey, so that each attempt is refused and logged.
        return frozenset(offered or {"publickey"})

    def reload(self) -> None:
        """Re-read the authorized keys and password files (SIGHUP)."""
        if self.keys is not None:
            self.keys.reload()
        if self.passwords is not None:
            self.passwords.reload()
        self._recent.clear()
        self._log.info("authentication files reloaded: %d authorized keys",
                       len(self.keys.keys) if self.keys is not None else 0,
                       extra={"event": "auth-config"})

    # -- the checks ---------------------------------------------------------------------
    async def check_public_key(self, connection_id: str, username: str, key: str, *,
                               remote_address: str = "") -> AuthResult | None:
        try:
            key_type, blob = offered_key(key)
        except KeyLineError as exc:
            self._deny(connection_id, username, "publickey", remote_address, str(exc))
            return None
        line = f"{key_type} {base64.b64encode(blob).decode()}"
        fingerprint = key_fingerprint(blob)
        cache_key = (connection_id, username, line)
        cached = self._recent.get(cache_key)
        if cached is not None and trio.current_time() - cached[1] < _CACHE_TTL:
            return cached[0]
        reasons = []
        if self.keys is not None:
            decision = self.keys.decide(line, remote_address, username=username)
            if decision.key is not None:
                options = decision.key.options
                return AuthResult(environment=dict(options.environment),
                                  method="publickey", reason=decision.reason,
                                  agent_forwarding=not options.no_agent_forwarding)
            reasons.append(decision.reason)
        if self.webhook is not None:
            verdict = await self.webhook.check_public_key(connection_id, username,
                                                          remote_address, line)
            if verdict.success:
                result = self._from_webhook(verdict, "publickey", connection_id)
                self._remember(cache_key, result)
                return result
            reasons.append(verdict.reason)
        self._deny(connection_id, username, "publickey", remote_address,
                   "; ".join(reasons) or "no public key source configured",
                   fingerprint=fingerprint)
        return None

    async def check_password(self, connection_id: str, username: str, password: str, *,
                             remote_address: str = "") -> AuthResult | None:
        reasons = []
        if self.passwords is not None:
            try:
                check = await self.passwords.verify(
                    username, password, source=address_key(client_ip(remote_address)))
            except HashQueueFull as exc:
                refuse(self._log, "auth-busy", "auth busy: user %r from %s by password: %s",
                       username, remote_address or "?", exc, reason=str(exc),
                       connection_id=connection_id, username=username, method="password",
                       result="deny", remote_address=remote_address)
                return None
            if check.ok:
                return AuthResult(method="password", reason=f"password file: {check.reason}")
            reasons.append(f"password file: {check.reason}")
        if self.webhook is not None:
            verdict = await self.webhook.check_password(connection_id, username,
                                                        remote_address, password)
            if verdict.success:
                return self._from_webhook(verdict, "password", connection_id)
            reasons.append(verdict.reason)
        self._deny(connection_id, username, "password", remote_address,
                   "; ".join(reasons) or "no password source configured")
        return None

    # -- helpers -----------------------------------------------------------------------
    def _from_webhook(self, verdict: WebhookVerdict, method: str,
                      connection_id: str) -> AuthResult:
        for warning in verdict.warnings:
            self._log.warning("auth webhook: %s", warning,
                              extra={"event": "auth", "connection_id": connection_id})
        return AuthResult(metadata=verdict.metadata, environment=verdict.environment,
                          method=method, reason=verdict.reason,
                          username=verdict.authenticated_username,
                          sensitive_metadata=_names(verdict.sensitive, "metadata."),
                          sensitive_environment=_names(verdict.sensitive, "environment."))

    def _remember(self, cache_key: tuple[str, str, str], result: AuthResult) -> None:
        self._recent[cache_key] = (result, trio.current_time())
        while len(self._recent) > _CACHE_ENTRIES:
            self._recent.popitem(last=False)

    def _deny(self, connection_id: str, username: str, method: str, remote_address: str,
              reason: str, **more: Any) -> None:
        how = f"{method} {more['fingerprint']}" if "fingerprint" in more else method
        refuse(self._log, "auth", "auth deny: user %r from %s by %s: %s", username,
               remote_address or "?", how, reason, reason=reason,
               connection_id=connection_id, username=username, method=method,
               result="deny", remote_address=remote_address, **more)


def _names(entries: frozenset[str], prefix: str) -> frozenset[str]:
    return frozenset(e[len(prefix):] for e in entries if e.startswith(prefix))


def build_authenticator(config: AuthConfig, *, logger: logging.Logger,
                        metrics: GatewayMetrics | None = None) -> ServerAuthenticator:
    """The authenticator for the ``auth`` section (files are read now; see ``reload``)."""
    return ServerAuthenticator(config, logger=logger, metrics=metrics)
