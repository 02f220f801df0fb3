"""The server's :class:`~kuberun_trio.gateway.auth.Authenticator`: files, webhook, throttling.

Theory of operation
-------------------
:func:`build_authenticator` turns the ``auth`` section into a :class:`ServerAuthenticator`.
It asks its sources in order and the first *yes* wins:

* public keys: the ``authorized_keys`` files (:mod:`.authkeys`), then the webhook;
* passwords: the password file (:mod:`.passwords`), then the webhook (:mod:`.authwebhook`).

Deny by default: with no source configured nobody gets in (a warning says so at start),
and a source that fails -- unreadable file, webhook down or slow -- answers *no*.

Every decision is logged once, at INFO, with ``extra={"event": "auth", "connection_id",
"username", "method", "result": "allow"|"deny", "reason", "remote_address"}`` (never a
password, never metadata values). asyncssh asks about an accepted public key twice (once
before and once with the signature); the second answer comes from a short per-connection
cache, neither logged nor sent to the webhook again.

Throttling (:class:`FailureThrottle`) slows repeated failures down without blocking anyone
else: a refusal counts one failure for the client address and one for the username, and
then *sleeps* (a trio sleep inside this check only) for ``base * 2**(n-2)`` seconds, capped,
where ``n`` is the larger of the two counts -- so a single typo costs nothing. A success
clears both counts; counts are forgotten ``forget_after`` seconds after their last failure.
Public key refusals count once per connection: clients offer every key they hold, and a
public key cannot be guessed anyway.
"""

from __future__ import annotations

import base64
import logging
from collections import OrderedDict
from typing import Any

import attrs
import trio

from ..gateway.auth import AuthResult
from ..observe.metrics import GatewayMetrics
from .authkeys import AuthorizedKeysFiles, KeyLineError, client_ip, offered_key
from .authwebhook import AuthWebhook, WebhookVerdict
from .config import AuthConfig
from .passwords import PasswordFile

_CACHE_TTL = 60.0
_CACHE_ENTRIES = 4096


@attrs.frozen
class ThrottlePolicy:
    """How refusals are slowed down."""

    base: float = 0.5
    """Delay after the second failure; it doubles with each further one."""
    cap: float = 8.0
    """The longest delay."""
    forget_after: float = 900.0
    """Seconds without a failure after which a count starts again from zero."""
    max_entries: int = 10_000
    """Counts kept at most (the oldest are forgotten first)."""

    def delay(self, failures: int) -> float:
        if failures < 2:
            return 0.0
        return float(min(self.cap, self.base * 2.0 ** min(failures - 2, 64)))


class FailureThrottle:
    """Failure counts by key (``addr:IP``, ``user:NAME``) on trio's clock."""

    def __init__(self, policy: ThrottlePolicy) -> None:
        self.policy = policy
        self._counts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __repr__(self) -> str:
        return f"<FailureThrottle entries={len(self._counts)}>"

    def count(self, key: str) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        if trio.current_time() - entry[1] > self.policy.forget_after:
            del self._counts[key]
            return 0
        return entry[0]

    def delay(self, *keys: str) -> float:
        """The delay a refusal for ``keys`` gets now (without counting one)."""
        return self.policy.delay(max((self.count(k) for k in keys), default=0))

    def failed(self, *keys: str) -> float:
        """Count a failure for each key; the delay this refusal gets."""
        now = trio.current_time()
        for key in keys:
            self._counts[key] = (self.count(key) + 1, now)
            self._counts.move_to_end(key)
        while len(self._counts) > self.policy.max_entries:
            self._counts.popitem(last=False)
        return self.delay(*keys)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._counts.pop(key, None)


class ServerAuthenticator:
    """Authorized keys, a password file and a webhook, behind one throttle. Trio-flavoured."""

    def __init__(self, config: AuthConfig, *, logger: logging.Logger,
                 throttle: ThrottlePolicy | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self._log = logger
        self.keys = AuthorizedKeysFiles(config.authorized_keys, logger) \
            if config.authorized_keys else None
        self.passwords = PasswordFile(config.password_file, logger) \
            if config.password_file is not None else None
        self.webhook = (AuthWebhook(config.webhook, metrics) if config.webhook is not None
                        else None)
        self.throttle = FailureThrottle(throttle or ThrottlePolicy())
        self._recent: OrderedDict[tuple[str, str, str], tuple[AuthResult, float]] = OrderedDict()
        self._counted: OrderedDict[str, None] = OrderedDict()
        if self.keys is None and self.passwords is None and self.webhook is None:
            logger.warning("no authentication configured (auth.authorizedKeys, "
                           "auth.passwordFile, auth.webhook): every login will be refused",
                           extra={"event": "auth-config"})

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
            await self._deny(connection_id, username, "publickey", remote_address, str(exc))
            return None
        line = f"{key_type} {base64.b64encode(blob).decode()}"
        cache_key = (connection_id, username, line)
        cached = self._recent.get(cache_key)
        if cached is not None and trio.current_time() - cached[1] < _CACHE_TTL:
            return cached[0]
        reasons = []
        if self.keys is not None:
            decision = self.keys.decide(line, remote_address)
            if decision.key is not None:
                result = AuthResult(environment=dict(decision.key.options.environment),
                                    method="publickey")
                self._remember(cache_key, result)
                return self._allow(connection_id, username, "publickey", remote_address,
                                   decision.reason, result)
            reasons.append(decision.reason)
        if self.webhook is not None:
            verdict = await self.webhook.check_public_key(connection_id, username,
                                                          remote_address, line)
            if verdict.success:
                result = self._from_webhook(verdict, "publickey", connection_id)
                self._remember(cache_key, result)
                return self._allow(connection_id, username, "publickey", remote_address,
                                   verdict.reason, result)
            reasons.append(verdict.reason)
        await self._deny(connection_id, username, "publickey", remote_address,
                         "; ".join(reasons) or "no public key source configured")
        return None

    async def check_password(self, connection_id: str, username: str, password: str, *,
                             remote_address: str = "") -> AuthResult | None:
        reasons = []
        if self.passwords is not None:
            check = await self.passwords.verify(username, password)
            if check.ok:
                return self._allow(connection_id, username, "password", remote_address,
                                   f"password file: {check.reason}",
                                   AuthResult(method="password"))
            reasons.append(f"password file: {check.reason}")
        if self.webhook is not None:
            verdict = await self.webhook.check_password(connection_id, username,
                                                        remote_address, password)
            if verdict.success:
                return self._allow(connection_id, username, "password", remote_address,
                                   verdict.reason,
                                   self._from_webhook(verdict, "password", connection_id))
            reasons.append(verdict.reason)
        await self._deny(connection_id, username, "password", remote_address,
                         "; ".join(reasons) or "no password source configured")
        return None

    # -- helpers -----------------------------------------------------------------------
    def _from_webhook(self, verdict: WebhookVerdict, method: str,
                      connection_id: str) -> AuthResult:
        for warning in verdict.warnings:
            self._log.warning("auth webhook: %s", warning,
                              extra={"event": "auth", "connection_id": connection_id})
        return AuthResult(metadata=verdict.metadata, environment=verdict.environment,
                          method=method)

    def _remember(self, cache_key: tuple[str, str, str], result: AuthResult) -> None:
        self._recent[cache_key] = (result, trio.current_time())
        while len(self._recent) > _CACHE_ENTRIES:
            self._recent.popitem(last=False)

    def _throttle_keys(self, username: str, remote_address: str) -> tuple[str, str]:
        return f"addr:{client_ip(remote_address)}", f"user:{username}"

    def _allow(self, connection_id: str, username: str, method: str, remote_address: str,
               reason: str, result: AuthResult) -> AuthResult:
        self.throttle.succeeded(*self._throttle_keys(username, remote_address))
        self._decision(connection_id, username, method, remote_address, "allow", reason)
        return result

    async def _deny(self, connection_id: str, username: str, method: str,
                    remote_address: str, reason: str) -> None:
        keys = self._throttle_keys(username, remote_address)
        if method == "publickey" and connection_id in self._counted:
            delay = self.throttle.delay(*keys)
        else:
            delay = self.throttle.failed(*keys)
            if method == "publickey":
                self._counted[connection_id] = None
                while len(self._counted) > _CACHE_ENTRIES:
                    self._counted.popitem(last=False)
        self._decision(connection_id, username, method, remote_address, "deny", reason,
                       delay=delay)
        await trio.sleep(delay)

    def _decision(self, connection_id: str, username: str, method: str, remote_address: str,
                  result: str, reason: str, **more: Any) -> None:
        self._log.info("auth %s: user %r from %s by %s: %s", result, username,
                       remote_address or "?", method, reason,
                       extra={"event": "auth", "connection_id": connection_id,
                              "username": username, "method": method, "result": result,
                              "reason": reason, "remote_address": remote_address, **more})


def build_authenticator(config: AuthConfig, *, logger: logging.Logger,
                        throttle: ThrottlePolicy | None = None,
                        metrics: GatewayMetrics | None = None) -> ServerAuthenticator:
    """The authenticator for the ``auth`` section (files are read now; see ``reload``)."""
    return ServerAuthenticator(config, logger=logger, throttle=throttle, metrics=metrics)
