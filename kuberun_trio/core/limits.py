"""Connection and session limits: sans-IO decisions, one :class:`Admission` per gateway.

Theory of operation
-------------------
Every resource a client can make the gateway spend is counted here, and every
"no" is decided here; the asyncssh callbacks (:mod:`kuberun_trio.aio.sshserver`,
:mod:`kuberun_trio.aio.sshsession`) only ask and carry out the answer. Nothing in
this module does I/O or reads a clock: callers pass the time, the number of open
file descriptors and a random number, so the rules are tested synchronously
(``tests/test_limits.py``).

The life of one TCP connection, as :class:`Admission` sees it::

    accept(address, fds)  ──Refusal──▶  closed before the SSH handshake
        │ Ticket (unauthenticated: counts for maxStartups and per address)
        ├── authenticated(username) ──Refusal──▶ disconnected, "too many connections"
        │ (authenticated: counts for the user)
        ├── open_session() ──Refusal──▶ channel open failure
        ├── close_session()
        └── release()                  (idempotent: the connection is gone)

* ``maxConnections`` -- all open connections, authenticated or not.
* ``maxStartups`` (``start:rate:full``, OpenSSH's semantics) -- with ``n``
  unauthenticated connections open, a new one is refused if ``n >= full``, and
  with probability ``rate/100 + (1 - rate/100) * (n - start) / (full - start)``
  if ``n >= start`` (random early drop). ``maxStartupsPerAddress`` caps the
  unauthenticated connections of one source address.
* ``maxConnectionsPerUser`` -- counted when a login is *proven* (asyncssh's
  ``auth_completed``), so a client that merely holds a public key cannot take
  another user's slots.
* ``maxSessions`` -- session channels open at once on one connection.
* ``maxSignalsPerSecond`` -- a token bucket per session (:class:`SignalBucket`):
  the excess is refused, not queued.
* File descriptors. Each connection and each session holds about one fd (its
  socket, its exec WebSocket). New TCP connections are refused while fewer than
  ``fdReserve`` fds are free, so the gateway keeps fds for its own API calls and
  for sessions of users already logged in. And no one user -- nor the crowd of
  unauthenticated connections -- may hold more than half of the fds above the
  reserve (:meth:`Admission.fd_share`), so one user cannot lock everyone else out
  when ``RLIMIT_NOFILE`` is lower than the configured limits assume.

Every refusal is a :class:`Refusal` (a machine-readable ``reason`` and the
message the client sees) and goes through :func:`report_refusal`, the one
place that logs it (event ``limit-refused``) -- and where a metric belongs.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

log = logging.getLogger(__name__)


@attrs.frozen
class MaxStartups:
    """OpenSSH's ``MaxStartups start:rate:full``: random early drop of unauthenticated
    connections."""

    start: int = 10
    """Below this many unauthenticated connections, none is dropped."""
    rate: int = 30
    """Percent chance of a drop at ``start``, rising linearly to 100 at ``full``."""
    full: int = 100
    """At this many unauthenticated connections, every new one is dropped."""

    @classmethod
    def parse(cls, value: object) -> MaxStartups:
        """``"start:rate:full"``, ``"start"`` or an integer (``start``, as OpenSSH reads it).

        Raises ``ValueError`` with a one-line problem.
        """
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value.strip()
        else:
            raise ValueError(f'expected "start:rate:full" (e.g. "10:30:100"), got {value!r}')
        match = re.fullmatch(r"([0-9]+)(?::([0-9]+):([0-9]+))?", text)
        if match is None:
            raise ValueError(f'expected "start:rate:full" (e.g. "10:30:100"), got {value!r}')
        start = int(match[1])
        if match[2] is None:
            return cls(start, 100, start)
        rate, full = int(match[2]), int(match[3])
        if start < 1 or not 1 <= rate <= 100 or full < start:
            raise ValueError(f"need 1 <= start <= full and 1 <= rate <= 100, got {text!r}")
        return cls(start, rate, full)

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"

    def drop_probability(self, unauthenticated: int) -> float:
        """The chance that a new connection is dropped with ``unauthenticated`` already open."""
        if unauthenticated >= self.full:
            return 1.0
        if unauthenticated < self.start:
            return 0.0
        rise = (100 - self.rate) * (unauthenticated - self.start) / (self.full - self.start)
        return (self.rate + rise) / 100


@attrs.frozen
class Limits:
    """Every limit of the gateway (``ssh.*`` and ``security.*`` in the server's config).

    Values out of range raise ``ValueError`` (the server's config reports them by key first).
    """

    login_grace_time: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    """Seconds from TCP accept to a completed login; then the client is disconnected."""
    max_startups: MaxStartups = MaxStartups()
    """Random early drop of unauthenticated connections (``ssh.maxStartups``)."""
    max_startups_per_address: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    """Unauthenticated connections from one source address at once."""
    client_alive_interval: float = attrs.field(default=15.0, validator=attrs.validators.gt(0))
    """Seconds of silence before the gateway probes the client (``keepalive@openssh.com``)."""
    client_alive_count_max: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Unanswered probes before the connection is closed: a vanished client frees its pod
    within ``client_alive_interval * client_alive_count_max`` seconds."""
    max_connections: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    """Open connections at once, authenticated or not."""
    max_sessions: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    """Session channels open at once on one connection."""
    max_connections_per_user: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    """Connections of one (authenticated) username at once, in this gateway process."""
    max_signals_per_second: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """``signal`` requests one session may make per second (a burst of as many)."""
    fd_reserve: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    """File descriptors kept free: new TCP connections are refused below this."""

    def keepalive(self) -> tuple[float, int]:
        """asyncssh's ``(keepalive_interval, keepalive_count_max)`` for these limits.

        asyncssh closes the connection at the ``(count_max + 1)``-th silent interval; probing
        every ``interval * count / (count + 1)`` seconds makes that exactly
        ``interval * count`` seconds after the client fell silent, with ``count`` probes sent.
        """
        count = self.client_alive_count_max
        return self.client_alive_interval * count / (count + 1), count


@attrs.frozen
class Refusal:
    """A limit said no."""

    reason: str
    """Machine-readable: ``max-startups``, ``max-sessions``, ... (the metric's label)."""
    message: str
    """What the client is told."""
    scope: str = "connection"
    """What was refused: ``connection``, ``session`` or ``signal``."""


def report_refusal(refusal: Refusal, *, connection_id: str = "", client: str = "",
                   **fields: Any) -> None:
    """Log one refusal (event ``limit-refused``). Every limit's refusal goes through here."""
    log.warning("limit %s (%s): %s", refusal.reason, refusal.scope, refusal.message, extra={
        "event": "limit-refused", "reason": refusal.reason, "scope": refusal.scope,
        "connection_id": connection_id, "client": client, **fields})


def open_fds() -> int | None:
    """How many file descriptors this process has open (None where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def fd_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE`` (None where unknown or unlimited)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class Admission:
    """The counters of one gateway and the decisions on them (see the module docstring)."""

    def __init__(self, limits: Limits, *, fd_limit: int | None = None, fds_at_start: int = 0,
                 random: Callable[[], float] | None = None) -> None:
        import random as _random

        self.limits = limits
        self.fd_limit = fd_limit
        """The process's fd limit (None: fds are not budgeted)."""
        self.fds_at_start = fds_at_start
        """Fds the process had open before it accepted anything."""
        self._random = random or _random.random
        self.connections = 0
        self.unauthenticated = 0
        self.unauthenticated_by_address: Counter[str] = Counter()
        self.by_user: Counter[str] = Counter()
        """Authenticated connections by username."""
        self.units_by_user: Counter[str] = Counter()
        """Fds held by each user: one per connection and one per open session."""

    def __repr__(self) -> str:
        return (f"<Admission connections={self.connections} "
                f"unauthenticated={self.unauthenticated} users={len(self.by_user)}>")

    def fd_share(self) -> int | None:
        """Most fds one user (or all unauthenticated connections together) may hold."""
        if self.fd_limit is None:
            return None
        return max(1, (self.fd_limit - self.fds_at_start - self.limits.fd_reserve) // 2)

    def user_refusal(self, username: str) -> Refusal | None:
        """Why another connection of ``username`` would be refused now (None: it would not).

        A check only; :meth:`Ticket.authenticated` counts (and checks again).
        """
        limit = self.limits.max_connections_per_user
        if self.by_user[username] >= limit:
            return Refusal("max-connections-per-user",
                           f"too many connections for user {username!r} (limit {limit})")
        share = self.fd_share()
        if share is not None and self.units_by_user[username] + 1 > share:
            return Refusal("fd-share", f"user {username!r} holds too many gateway resources")
        return None

    def accept(self, address: str, fds_in_use: int | None = None) -> Ticket | Refusal:
        """A TCP connection from ``address`` arrived: admit it (a :class:`Ticket`) or not."""
        limits = self.limits
        if self.connections >= limits.max_connections:
            return Refusal("max-connections",
                           f"too many connections to the gateway (limit {limits.max_connections})")
        if self.fd_limit is not None and fds_in_use is not None and \
                self.fd_limit - fds_in_use < limits.fd_reserve:
            return Refusal("fd-reserve", "the gateway is out of capacity, try again later")
        share = self.fd_share()
        if share is not None and self.unauthenticated >= share:
            return Refusal("fd-reserve", "the gateway is out of capacity, try again later")
        if self.unauthenticated_by_address[address] >= limits.max_startups_per_address:
            return Refusal("max-startups-per-address",
                           "too many unauthenticated connections from your address "
                           f"(limit {limits.max_startups_per_address})")
        chance = limits.max_startups.drop_probability(self.unauthenticated)
        if chance > 0 and self._random() < chance:
            return Refusal("max-startups", "too many unauthenticated connections, try again later")
        self.connections += 1
        self.unauthenticated += 1
        self.unauthenticated_by_address[address] += 1
        return Ticket(self, address)


class Ticket:
    """One admitted connection's claim on the counters. Synchronous; :meth:`release` once done."""

    def __init__(self, admission: Admission, address: str) -> None:
        self._admission = admission
        self.address = address
        self.username: str | None = None
        """Set once the login was proven and admitted."""
        self.sessions = 0
        self._state = "unauthenticated"
        self.max_sessions: int | None = None
        """This connection's own ``maxSessions`` (its settings); None: the gateway's."""

    def __repr__(self) -> str:
        return (f"<Ticket {self.address} {self._state} user={self.username!r} "
                f"sessions={self.sessions}>")

    @property
    def authenticating(self) -> bool:
        return self._state == "unauthenticated"

    def _leave_unauthenticated(self) -> None:
        a = self._admission
        a.unauthenticated -= 1
        a.unauthenticated_by_address[self.address] -= 1
        if a.unauthenticated_by_address[self.address] <= 0:
            del a.unauthenticated_by_address[self.address]

    def authenticated(self, username: str) -> Refusal | None:
        """The login of ``username`` is proven: admit it for the user, or refuse."""
        if self._state != "unauthenticated":
            return None
        a = self._admission
        self._leave_unauthenticated()
        self._state = "refused"
        refusal = a.user_refusal(username)
        if refusal is not None:
            return refusal
        self._state = "authenticated"
        self.username = username
        a.by_user[username] += 1
        a.units_by_user[username] += 1
        return None

    def open_session(self) -> Refusal | None:
        """A session channel is being opened on this connection."""
        a = self._admission
        limit = self.max_sessions or a.limits.max_sessions
        if self.sessions >= limit:
            return Refusal("max-sessions",
                           f"too many sessions on this connection (limit {limit})", "session")
        share = a.fd_share()
        if self.username is not None and share is not None and \
                a.units_by_user[self.username] + 1 > share:
            return Refusal("fd-share", f"user {self.username!r} holds too many gateway "
                           "resources: close some sessions", "session")
        self.sessions += 1
        if self.username is not None:
            a.units_by_user[self.username] += 1
        return None

    def close_session(self) -> None:
        """A session channel admitted by :meth:`open_session` closed."""
        if self.sessions <= 0 or self._state == "released":
            return
        self.sessions -= 1
        if self.username is not None:
            self._admission.units_by_user[self.username] -= 1

    def release(self) -> None:
        """The connection is gone: give back everything it held. Idempotent."""
        a = self._admission
        if self._state == "released":
            return
        if self._state == "unauthenticated":
            self._leave_unauthenticated()
        if self.username is not None:
            a.by_user[self.username] -= 1
            a.units_by_user[self.username] -= 1 + self.sessions
            for counter in (a.by_user, a.units_by_user):
                if counter[self.username] <= 0:
                    del counter[self.username]
        self.sessions = 0
        a.connections -= 1
        self._state = "released"


class SignalBucket:
    """At most ``rate`` signals per second per session (a burst of ``rate``); refuse the rest."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._tokens = self.burst
        self._last: float | None = None

    def take(self, now: float) -> Refusal | None:
        """One signal at time ``now``: None if allowed, else the refusal (nothing is queued)."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return Refusal("signal-rate", f"too many signals (limit {self.rate:g} per second)",
                           "signal")
        self._tokens -= 1.0
        return None
