"""Session time limits: ``ssh.idleTimeout`` and ``ssh.maxSessionDuration``.

Theory of operation
-------------------
One :class:`TimeLimitWatch` per authenticated connection, run by the connection as a
task in its session nursery (only when a limit is set). It never touches the data path:
activity is read from the byte counters the SSH layer already keeps on the connection's
:class:`~.audit.ConnectionAudit` (one integer addition per chunk, in both directions;
keepalives and other SSH-level packets are not channel data and do not count). The
watch samples them every :attr:`SessionTimeLimits.tick` seconds; a change moves the
"last activity" mark.

Two deadlines: ``start + maxSessionDuration`` (``start`` is the login) and
``last activity + idleTimeout``. Whichever is nearer decides:

1. ``timeoutWarning`` seconds before it (at most half the limit, so a warning longer
   than the limit does not greet every session), :meth:`TimeLimitTarget.warn` writes a warning
   once to every open session (the terminal on a pty, else stderr). Those bytes are
   the gateway's own and do not count as activity. An idle warning is re-armed by new
   activity.
2. At the deadline, :meth:`TimeLimitTarget.limit_reached` (SIGTERM to every session's
   process, ``kuberun: session time limit reached`` / ``... idle ...`` on each, no new
   sessions) and, after ``timeoutGracePeriod`` seconds, :meth:`TimeLimitTarget.close`:
   the channels close (exit status 255), then the connection; the pod is deleted as
   for any other end. The watch returns.

With ``maxSessionDuration`` the pod also gets ``activeDeadlineSeconds`` =
duration + grace + ``timeouts.podStop`` (:meth:`SessionTimeLimits.active_deadline`), so
the cluster ends it even if the gateway is gone.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import attrs
import trio

from ..core.audit import ConnectionAudit, ConnectionEnd

IDLE_MESSAGE = "session idle time limit reached"
MAX_DURATION_MESSAGE = "session time limit reached"


@attrs.frozen
class SessionTimeLimits:
    """``ssh.idleTimeout``, ``ssh.maxSessionDuration``, ``ssh.timeoutWarning``,
    ``ssh.timeoutGracePeriod`` (seconds; None means off)."""

    idle_timeout: float | None = None
    """No channel data in either direction for this long ends the connection."""
    max_session_duration: float | None = None
    """Time from login after which the connection is ended."""
    timeout_warning: float = 60.0
    """The warning is written this many seconds before a limit (0: no warning)."""
    timeout_grace_period: float = 10.0
    """Time between SIGTERM at the limit and closing the channels and the connection."""

    def __attrs_post_init__(self) -> None:
        for name in ("idle_timeout", "max_session_duration"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for off), got {value}")
        if self.timeout_warning < 0 or self.timeout_grace_period < 0:
            raise ValueError("timeout_warning and timeout_grace_period must not be negative")

    @property
    def enabled(self) -> bool:
        return self.idle_timeout is not None or self.max_session_duration is not None

    @property
    def tick(self) -> float:
        """Seconds between two looks at the counters (0.1 .. 1)."""
        spans = [s for s in (self.idle_timeout, self.timeout_warning or None) if s]
        return max(0.1, min([1.0, *(s / 4 for s in spans)]))

    def active_deadline(self, pod_stop: float) -> int | None:
        """The pod's ``activeDeadlineSeconds`` (None without ``max_session_duration``)."""
        if self.max_session_duration is None:
            return None
        return math.ceil(self.max_session_duration + self.timeout_grace_period + pod_stop)


class TimeLimitTarget(Protocol):
    """What the watch acts on (the connection runtime)."""

    def warn(self, message: str) -> None:
        """Write ``message`` once to every open session."""

    def limit_reached(self, message: str, kind: ConnectionEnd) -> None:
        """SIGTERM every session's process, write ``message``, refuse new sessions."""

    def close(self, message: str, kind: ConnectionEnd) -> None:
        """Close every channel (exit status 255), then the connection."""


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:g} s"
    return f"{value / 60:g} min" if value < 7200 else f"{value / 3600:g} h"


class TimeLimitWatch:
    """The per-connection watch (see the module docstring)."""

    def __init__(self, limits: SessionTimeLimits, audit: ConnectionAudit,
                 target: TimeLimitTarget) -> None:
        self.limits = limits
        self.audit = audit
        self.target = target
        self.started = trio.current_time()
        """The login (the watch is made when the connection authenticated)."""
        self.last_activity = self.started
        self._seen = self._counters()

    def __repr__(self) -> str:
        return f"<TimeLimitWatch {self.limits} idle since {self.last_activity:.1f}>"

    def _counters(self) -> tuple[int, int]:
        return (self.audit.bytes_from_client, self.audit.bytes_to_client)

    def _next(self) -> tuple[float, ConnectionEnd] | None:
        """The nearest deadline and its kind."""
        found: list[tuple[float, ConnectionEnd]] = []
        if self.limits.max_session_duration is not None:
            found.append((self.started + self.limits.max_session_duration,
                          ConnectionEnd.MAX_DURATION))
        if self.limits.idle_timeout is not None:
            found.append((self.last_activity + self.limits.idle_timeout, ConnectionEnd.IDLE))
        return min(found, key=lambda item: item[0]) if found else None

    def _observe(self, now: float) -> bool:
        """Move the activity mark if data flowed since the last look; True if it did."""
        counters = self._counters()
        if counters != self._seen:
            self._seen = counters
            self.last_activity = now
            return True
        return False

    async def run(self) -> None:
        """Watch until a limit ends the connection (then return) or until cancelled."""
        warned: ConnectionEnd | None = None
        while True:
            now = trio.current_time()
            if self._observe(now) and warned is ConnectionEnd.IDLE:
                warned = None  # active again: a later idle period gets its own warning
            nearest = self._next()
            if nearest is None:
                return
            deadline, kind = nearest
            if now >= deadline:
                await self._enforce(kind)
                return
            left = deadline - now
            wake = min(self.limits.tick, left)
            if warned is not kind and self.limits.timeout_warning:
                lead = self._warning_lead(kind)
                if left <= lead:
                    warned = kind
                    self.target.warn(self._warning(kind, left))
                    self._seen = self._counters()  # our own bytes are not activity
                else:
                    wake = min(wake, left - lead)
            await trio.sleep(max(wake, 0.01))

    def _warning_lead(self, kind: ConnectionEnd) -> float:
        limit = (self.limits.idle_timeout if kind is ConnectionEnd.IDLE
                 else self.limits.max_session_duration)
        assert limit is not None
        return min(self.limits.timeout_warning, limit / 2)

    def _warning(self, kind: ConnectionEnd, left: float) -> str:
        shown = _seconds(max(1, round(left)))
        if kind is ConnectionEnd.IDLE:
            return (f"this connection is idle; it will be closed in {shown} "
                    f"unless there is activity")
        assert self.limits.max_session_duration is not None
        return (f"this connection reaches its time limit of "
                f"{_seconds(self.limits.max_session_duration)} in {shown}")

    async def _enforce(self, kind: ConnectionEnd) -> None:
        message = IDLE_MESSAGE if kind is ConnectionEnd.IDLE else MAX_DURATION_MESSAGE
        self.audit.emit(logging.INFO, "time-limit", "connection %s: %s", self.audit.connection_id,
                        message, reason=kind.value,
                        idle_ms=round(1000 * (trio.current_time() - self.last_activity)))
        self.target.limit_reached(message, kind)
        await trio.sleep(self.limits.timeout_grace_period)
        self.target.close(message, kind)
