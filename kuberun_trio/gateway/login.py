"""The login gate: every authentication attempt of every connection goes through it.

Theory of operation
-------------------
One :class:`LoginGate` per gateway wraps the :class:`~.auth.Authenticator` with the
process-wide :class:`~.throttle.LoginLimiter` and the per-connection try count. The
asyncssh side (:mod:`kuberun_trio.aio.sshserver`) keeps one :class:`LoginState` per
connection and calls the gate, trio-flavoured, for each request:

* **password** -- :meth:`LoginGate.password`: count a try, wait for the limiter's turn
  (:meth:`LoginGate.turn`), *then* ask the authenticator;
* **public key with a signature** -- :meth:`LoginGate.turn` first; then asyncssh asks
  the authenticator (:meth:`LoginGate.check_key`) and verifies the signature;
* **public key query** (unsigned "would you accept this key?") -- :meth:`LoginGate.check_key`
  only: no wait, it proves nothing, so it neither resets a count nor logs ``allow``; a
  refused one counts as a try (offered keys count, as with OpenSSH's MaxAuthTries).

The turn is booked before anything is checked, and asyncssh cancelling the attempt (a
client that pipelines its next request) refunds nothing: the next attempt's turn comes
after the cancelled one's (see :mod:`.throttle`). After ``max_tries`` failed tries the
connection is disconnected with "too many authentication failures".

Only a proven login counts: a correct password, or a key whose signature asyncssh has
verified. :meth:`LoginGate.completed` (asyncssh's ``auth_completed``) then resets the
limiter for that address and username and writes the one ``auth allow`` line, with the
method and, for keys, the SHA256 fingerprint.

**Penalty box.** A new connection from an address whose login attempts are being refused
at once (:meth:`~.throttle.LoginLimiter.penalized`) is refused by
:meth:`LoginGate.admit_connection` right after the TCP accept; the SSH side holds it
unread for a moment and closes it, before the key exchange -- the costly part of a
connection an attacker can make the gateway do for free.

Log lines (logger ``kuberun_trio.gateway.login``, each with ``event``, ``connection_id``,
``username``, ``remote_address``): ``auth`` (``result`` ``allow``), ``auth-delayed``
(``wait``), and through :func:`~.refusals.refuse`: ``auth-throttled``, ``auth-max-tries``,
``auth-throttled-connection`` (one INFO line per address per 10 s, the rest at DEBUG).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import attrs
import trio

from ..core.auth import Authenticator, AuthResult
from ..core.refusals import Refusal, refuse
from .throttle import LoginLimiter, LoginPolicy, address_key, login_keys

log = logging.getLogger(__name__)

TOO_MANY_FAILURES = "too many authentication failures"
QUIET_LOG = 10.0
"""Seconds between INFO lines about connections dropped from one penalized address."""


@attrs.frozen
class Proof:
    """What proved a login."""

    method: str
    result: AuthResult
    fingerprint: str | None = None


@attrs.define(eq=False)
class LoginState:
    """One connection's login: where from, tries so far, and what proved it."""

    connection_id: str
    ip: str
    remote_address: str
    """``IP:port`` (``[v6]:port``), as ContainerSSH's webhook has it."""
    tries: int = 0
    proof: Proof | None = None


class LoginGate:
    """Authenticator + limiter + try counts (see the module docstring). Trio-flavoured."""

    def __init__(self, authenticator: Authenticator, policy: LoginPolicy | None = None, *,
                 limiter: LoginLimiter | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.authenticator = authenticator
        self.limiter = limiter or LoginLimiter(policy)
        self.policy = self.limiter.policy
        self._log = logger or log
        self._dropped_logged: OrderedDict[str, float] = OrderedDict()
        self._reset = trio.Event()
        """Set (and replaced) whenever a proven login resets its keys (see :meth:`turn`)."""

    def __repr__(self) -> str:
        return f"<LoginGate {self.authenticator!r} {self.limiter!r}>"

    def methods(self) -> frozenset[str]:
        return self.authenticator.methods()

    def connection(self, connection_id: str, host: str, port: int) -> LoginState:
        remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return LoginState(connection_id, host, remote)

    def _fields(self, state: LoginState, username: str, **more: Any) -> dict[str, Any]:
        return {"connection_id": state.connection_id, "username": username,
                "remote_address": state.remote_address, **more}

    def admit_connection(self, state: LoginState) -> bool:
        """A new connection: False (and a log line) when its address is penalized, i.e.
        every login attempt from it would be refused at once for now."""
        key, now = address_key(state.ip), trio.current_time()
        wait = self.limiter.penalized(key, now)
        if wait <= 0:
            return True
        # One INFO line per address per QUIET_LOG seconds; the rest at DEBUG (a dropped
        # connection costs the attacker nothing, its log line should cost us little).
        quiet = now - self._dropped_logged.get(key, -QUIET_LOG) < QUIET_LOG
        if not quiet:
            self._dropped_logged[key] = now
            self._dropped_logged.move_to_end(key)
            while len(self._dropped_logged) > 10_000:
                self._dropped_logged.popitem(last=False)
        refuse(self._log, "auth-throttled-connection",
               "connection refused: %s: too many failed logins, for %.0f s more",
               state.remote_address, wait, reason=f"{key}: penalized for {wait:.1f} s",
               level=logging.DEBUG if quiet else logging.INFO,
               connection_id=state.connection_id, remote_address=state.remote_address)
        return False

    # -- the attempts --------------------------------------------------------------------
    async def turn(self, state: LoginState, username: str, method: str) -> Refusal | None:
        """Count a try and wait for this attempt's turn; a Refusal if it must not proceed."""
        state.proof = None  # only the attempt that asyncssh answers with success proves
        if state.tries >= self.policy.max_tries:  # pipelined past the limit
            return self._too_many(state, username, method)
        state.tries += 1
        keys = login_keys(state.ip, username)
        while True:
            now = trio.current_time()
            admission = self.limiter.admit(keys, now)
            charged = [self.limiter.charged(key, now) for key in keys]
            if admission.refused:
                # With no failure known yet, the turns ahead were booked by attempts still
                # in flight: maybe a burst of good logins from one address (a NAT, a CI
                # runner). Wait for one of them to prove itself and reset the keys (then
                # book afresh), or to fail (then refuse). An attacker's first failures are
                # known within moments, and from then on it is refused at once.
                if not self._failures_known(keys) and \
                        await self._reset_within(keys, charged, self.policy.max_delay):
                    continue
                self.limiter.refused_now(admission.key, trio.current_time())
                later = f"too many failed logins; try again in {admission.wait:.0f} s"
                refuse(self._log, "auth-throttled", "auth throttled: user %r from %s by %s: %s",
                       username, state.remote_address, method, later,
                       reason=f"{admission.key}: next turn in {admission.wait:.1f} s",
                       **self._fields(state, username, method=method))
                return self.failed(state, username, method, banner=f"kuberun: {later}\r\n")
            if admission.wait > 0:
                self._log.info("auth delayed: user %r from %s by %s waits %.1f s (%s)", username,
                               state.remote_address, method, admission.wait, admission.key,
                               extra={"event": "auth-delayed", "wait": round(admission.wait, 3),
                                      "key": admission.key,
                                      **self._fields(state, username, method=method)})
                if await self._reset_within(keys, charged, admission.wait):
                    continue  # a proven login cleared what this turn waited for
            return None

    def _failures_known(self, keys: tuple[str, ...]) -> bool:
        return any(self.limiter.failures(key) for key in keys)

    def _wake(self) -> None:
        """Wake every turn waiting in :meth:`_reset_within` to look again."""
        self._reset.set()
        self._reset = trio.Event()

    async def _reset_within(self, keys: tuple[str, ...], charged: list[int],
                            seconds: float) -> bool:
        """Wait ``seconds``; True as soon as a proven login has reset one of
        ``keys`` (its charge dropped below ``charged``), so that the attempt may book again.

        Cancellation refunds nothing: the booking made before the wait stays.
        """
        with trio.move_on_after(seconds):
            while True:
                reset = self._reset
                await reset.wait()
                now = trio.current_time()
                if any(self.limiter.charged(key, now) < before
                       for key, before in zip(keys, charged, strict=True)):
                    return True
                if seconds >= self.policy.max_delay and self._failures_known(keys):
                    return False  # a deferred refusal: a failure is known now
        return False

    async def password(self, state: LoginState, username: str,
                       password: str) -> AuthResult | Refusal:
        refusal = await self.turn(state, username, "password")
        if refusal is not None:
            return refusal
        result = await self.authenticator.check_password(
            state.connection_id, username, password, remote_address=state.remote_address)
        if result is None:
            return self.failed(state, username, "password")
        state.proof = Proof("password", attrs.evolve(result, method="password"))
        return result

    async def check_key(self, state: LoginState, username: str, key_line: str, *,
                        signed: bool) -> AuthResult | Refusal:
        """Ask the authenticator about a key (after :meth:`turn` when ``signed``)."""
        result = await self.authenticator.check_public_key(
            state.connection_id, username, key_line, remote_address=state.remote_address)
        if result is not None:
            return result
        if not signed:  # a signed attempt counted its try in turn()
            return self.offer_failed(state, username)
        return self.failed(state, username, "publickey")

    def offer_failed(self, state: LoginState, username: str) -> Refusal:
        """A refused key offer (query) counts as a try, as with OpenSSH's MaxAuthTries."""
        state.tries += 1
        return self.failed(state, username, "publickey")

    def bad_signature(self, state: LoginState, username: str, fingerprint: str) -> Refusal:
        """An accepted key whose signature did not verify."""
        refuse(self._log, "auth", "auth deny: user %r from %s by publickey %s: %s", username,
               state.remote_address, fingerprint, "bad signature", reason="bad signature",
               **self._fields(state, username, method="publickey", result="deny",
                              fingerprint=fingerprint))
        return self.failed(state, username, "publickey")

    def failed(self, state: LoginState, username: str, method: str,
               banner: str | None = None) -> Refusal:
        """An attempt failed: disconnect once ``max_tries`` tries failed."""
        self.limiter.failed(login_keys(state.ip, username))
        self._wake()  # deferred refusals behind these keys wait no longer
        if state.tries >= self.policy.max_tries:
            return self._too_many(state, username, method)
        return Refusal(banner=banner)

    def proven_key(self, state: LoginState, result: AuthResult, fingerprint: str) -> None:
        """asyncssh verified the signature of an accepted key."""
        state.proof = Proof("publickey", attrs.evolve(result, method="publickey"), fingerprint)

    def proven(self, state: LoginState, username: str) -> None:
        """The credential is proven but the login is not complete yet (the connection's
        settings are being decided): reset the limiter's keys now, so the turns waiting
        behind them wait no longer. :meth:`completed` still writes the ``allow`` line."""
        if state.proof is not None:
            self.limiter.succeeded(login_keys(state.ip, username))
            self._wake()

    def completed(self, state: LoginState, username: str) -> AuthResult | None:
        """The whole login succeeded: reset the limiter's keys, log ``allow`` once.

        None if nothing proved it (the connection must then be closed).
        """
        proof = state.proof
        if proof is None:
            return None
        self.limiter.succeeded(login_keys(state.ip, username))
        self._wake()  # the turns that waited behind these keys may book afresh
        more: dict[str, Any] = {"method": proof.method, "result": "allow",
                                "reason": proof.result.reason or "accepted"}
        how = proof.method
        if proof.fingerprint is not None:
            more["fingerprint"] = proof.fingerprint
            how = f"{how} {proof.fingerprint}"
        if proof.result.username is not None and proof.result.username != username:
            more["authenticated_username"] = proof.result.username
            how = f"{how} as {proof.result.username!r}"
        self._log.info("auth allow: user %r from %s by %s", username, state.remote_address,
                       how, extra={"event": "auth", **self._fields(state, username, **more)})
        return proof.result

    def _too_many(self, state: LoginState, username: str, method: str) -> Refusal:
        refuse(self._log, "auth-max-tries", "auth disconnect: user %r from %s: %s after %d tries",
               username, state.remote_address, TOO_MANY_FAILURES, state.tries,
               reason=TOO_MANY_FAILURES, tries=state.tries,
               **self._fields(state, username, method=method))
        return Refusal(disconnect=TOO_MANY_FAILURES)
