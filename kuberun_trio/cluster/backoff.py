"""Restart and image-pull back-off, and Go-style durations for the messages about it.

Theory of operation
-------------------
:class:`Backoff` is client-go's ``flowcontrol.Backoff`` for one key: the
first failure is retried at once; after that each wait doubles from ``base``
up to ``cap``, and a quiet spell of twice the cap since the last failure
resets it. Times are trio times (so tests run it under ``autojump_clock``).
:func:`go_duration` renders seconds as Go's ``time.Duration.String()``, the
form the kubelet's ``back-off 20s restarting failed container`` and ``pulled
in 1.2s`` messages use.
"""

from __future__ import annotations

import attrs
import trio


def go_duration(seconds: float) -> str:
    """``time.Duration.String()``: ``10s``, ``1m20s``, ``5m0s``, ``200ms``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        for unit, scale in (("ms", 1e3), ("µs", 1e6), ("ns", 1e9)):
            if seconds * scale >= 1:
                return f"{round(seconds * scale, 3):g}{unit}"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 9):g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


@attrs.define
class Backoff:
    """client-go ``flowcontrol.Backoff`` for one key."""

    base: float
    cap: float
    current: float = 0.0
    last: float | None = None

    def _expired(self, at: float) -> bool:
        return self.last is None or at - self.last > 2 * self.cap

    def remaining(self, event_time: float) -> float:
        """How long to wait after an event at ``event_time`` (0: not in back-off)."""
        if self._expired(event_time):
            return 0.0
        return max(0.0, self.current - (trio.current_time() - event_time))

    def next(self, event_time: float) -> None:
        self.current = self.base if self._expired(event_time) else min(self.current * 2, self.cap)
        self.last = event_time
