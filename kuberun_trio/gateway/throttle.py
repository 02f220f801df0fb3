"""Login throttling: one limiter per gateway, keyed by source address and by username.

Theory of operation
-------------------
:class:`LoginLimiter` is sans-IO: every method takes ``now`` (trio's clock in the gateway,
a plain number in tests) and nothing here sleeps. The gateway asks it *before* a credential
is checked (:mod:`.login`), then sleeps until the admitted time.

Each key (``addr:198.51.100.7``, ``user:alice``) holds two numbers:

* ``charged`` -- attempts since the last proven login (or since it was forgotten);
* ``next_at`` -- the earliest time the next attempt may start.

:meth:`LoginLimiter.admit` books a turn for an attempt on all of its keys at once: the
attempt starts at ``at = max(now, next_at of every key)``; each key counts one more attempt
and its ``next_at`` moves to ``at + penalty(charged)``. The attempt is *charged on
admission*, as if it failed: a success clears the keys (:meth:`LoginLimiter.succeeded`),
nothing else does. So

* parallel connections from one address book consecutive turns of the same key and
  share its penalty;
* a cancelled attempt (an SSH client that pipelines its next request makes asyncssh cancel
  the one in progress) keeps its booking: cancelling refunds nothing, and the next attempt
  starts after it;
* ``penalty(n)`` is 0 for the first ``free_failures`` attempts, then ``delay``, doubling
  with each further attempt, capped at ``max_delay``.

A booking further than ``max_delay`` ahead is refused at once (:attr:`Admission.refused`)
without charging: such an attempt is answered "no" before its credential is looked at,
so waiting tasks stay bounded (about one per key) and an attacker learns nothing from it.
Under a steady attack each key lets one credential be checked per ``max_delay``.

An address key whose attempts are being refused is *in the penalty box*
(:meth:`LoginLimiter.penalized`): the gateway then drops its new connections before the
key exchange. Each refusal, and each dropped connection, keeps it there for
``max_delay / 2`` more.

A key is forgotten ``forget_after`` seconds after its last attempt; at most
``max_entries`` keys are kept (least recently used go first).

Trade-off: the username key also slows a legitimate user whose name is being guessed from
elsewhere (a turn at most ``max_delay`` away, or "try again later"). It is what makes a
guessing attack spread over many addresses no faster than one from a single address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

import attrs


@attrs.frozen
class LoginPolicy:
    """How logins are limited (``auth.maxTries`` and ``auth.throttle.*`` in the server)."""

    max_tries: int = 6
    """Failed attempts per connection (offered keys count) before it is disconnected."""
    free_failures: int = 3
    """Attempts since the last proven login that cost no waiting."""
    delay: float = 1.0
    """The wait after the first attempt beyond ``free_failures``; it doubles with each."""
    max_delay: float = 10.0
    """The longest wait; an attempt whose turn is further away is refused at once."""
    forget_after: float = 900.0
    """Seconds after a key's last attempt when its count starts again from zero."""
    max_entries: int = 100_000
    """Keys kept at most (the least recently used are forgotten first)."""

    def penalty(self, charged: int) -> float:
        """The gap after the ``charged``-th attempt before the next one may start."""
        if charged <= self.free_failures:
            return 0.0
        return float(min(self.max_delay, self.delay * 2.0 ** min(charged - self.free_failures - 1,
                                                                  64)))


@attrs.frozen
class Admission:
    """The limiter's answer for one attempt."""

    wait: float
    """Seconds to wait before checking the credential (0 when the turn is now)."""
    refused: bool = False
    """The turn is more than ``max_delay`` away: refuse without checking (not charged)."""
    key: str = ""
    """The key that decided the wait (for the log line)."""


@attrs.define
class _Entry:
    charged: int = 0
    next_at: float = 0.0
    last: float = 0.0
    refused_at: float = float("-inf")
    """When an attempt was last refused at once because of this key."""
    failures: int = 0
    """Attempts known to have failed (the rest of ``charged`` may still be in flight)."""


def address_key(ip: str) -> str:
    """The limiter key of a client address: the IPv4 address, or the IPv6 /64 network.

    An IPv4-mapped IPv6 address counts as its IPv4 address. One IPv6 host usually owns a
    whole /64, so a per-address key on full IPv6 addresses would hold nobody back.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return f"addr:{ip}"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"addr:{addr.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network(f'{addr}/64', strict=False)}"
    return f"addr:{addr}"


def login_keys(ip: str, username: str) -> tuple[str, str]:
    """The two keys of an attempt: its source address and its username."""
    return address_key(ip), f"user:{username}"


class LoginLimiter:
    """Turns for login attempts, by key (see the module docstring). Sans-IO."""

    def __init__(self, policy: LoginPolicy | None = None) -> None:
        self.policy = policy or LoginPolicy()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.refused = 0
        """Attempts refused at once so far (for statistics)."""

    def __repr__(self) -> str:
        return f"<LoginLimiter keys={len(self._entries)} refused={self.refused}>"

    def _entry(self, key: str, now: float) -> _Entry:
        entry = self._entries.get(key)
        if entry is None or (now - entry.last > self.policy.forget_after
                             and entry.next_at <= now):
            entry = _Entry(last=now)
            self._entries[key] = entry
        self._entries.move_to_end(key)
        return entry

    def admit(self, keys: Iterable[str], now: float) -> Admission:
        """Book the next turn on every key; the attempt must wait ``wait`` seconds first."""
        entries = [(key, self._entry(key, now)) for key in keys]
        at, by = now, ""
        for key, entry in entries:
            if entry.next_at > at:
                at, by = entry.next_at, key
        for _, entry in entries:
            entry.last = now
        if at - now > self.policy.max_delay:
            self.refused += 1
            for key, entry in entries:
                if key == by:
                    entry.refused_at = now
            self._trim()
            return Admission(at - now, refused=True, key=by)
        for _, entry in entries:
            entry.charged += 1
            entry.next_at = max(entry.next_at, at + self.policy.penalty(entry.charged))
        self._trim()
        return Admission(at - now, key=by)

    def penalized(self, key: str, now: float) -> float:
        """Seconds ``key`` stays in the penalty box (0: not in it).

        A key is in the box while an attempt now would be refused at once, and for
        ``max_delay / 2`` after an attempt was refused because of it: the gateway drops a
        new connection from a boxed address at once, before the (costly) key exchange.
        Asking while in the box counts as a refused attempt (``refused=True``): an attacker
        that keeps retrying keeps itself in the box, until it stays quiet ``max_delay / 2``.
        """
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        wait = max(0.0, entry.next_at - now - self.policy.max_delay,
                   entry.refused_at + self.policy.max_delay / 2 - now)
        if wait > 0:
            entry.refused_at = now
            entry.last = now
            wait = max(wait, self.policy.max_delay / 2)
        return wait

    def failed(self, keys: Iterable[str]) -> None:
        """Attempts on ``keys`` are known to have failed (not merely booked)."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.failures += 1

    def failures(self, key: str) -> int:
        """Failures known for ``key`` since its last reset."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.failures

    def refused_now(self, key: str, now: float) -> None:
        """An attempt booked earlier is refused now (after waiting in vain for a proven
        login): the key stays in the penalty box from ``now``, as at a refused booking."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.refused_at = entry.last = now

    def succeeded(self, keys: Iterable[str]) -> None:
        """A proven login: its keys start again from zero."""
        for key in keys:
            self._entries.pop(key, None)

    def charged(self, key: str, now: float) -> int:
        """Attempts counted for ``key`` (0 once forgotten)."""
        entry = self._entries.get(key)
        if entry is None or (now - entry.last > self.policy.forget_after
                             and entry.next_at <= now):
            return 0
        return entry.charged

    def _trim(self) -> None:
        while len(self._entries) > self.policy.max_entries:
            self._entries.popitem(last=False)

    def statistics(self) -> dict[str, int]:
        return {"keys": len(self._entries), "refused": self.refused}
