"""The embedded cluster's request log.

Every HTTP request is appended once its outcome is known (``kind="http"``), and
every exec/attach/port-forward WebSocket stream adds an ``exec-open`` entry after
the upgrade and an ``exec-close`` entry once the stream is fully closed. Tests
use it to check ordering, e.g. "every exec stream of this pod closed before its
DELETE was received". Times are ``trio.current_time()``; the ``seq`` number
orders entries that share a timestamp.

The log keeps the newest ``max_entries`` (100 000 by default, some 30 MB): a
demo server that runs for months must not grow without bound. ``seq`` keeps
counting across trims; :meth:`RequestLog.since` reads by ``seq``.
"""

from __future__ import annotations

import itertools

import attrs
import trio


@attrs.frozen
class LogEntry:
    """One thing that happened at the API server."""

    seq: int
    """Position in the log (strictly increasing)."""
    time: float
    """``trio.current_time()`` when it was recorded."""
    kind: str
    """``"http"``, ``"exec-open"`` or ``"exec-close"``."""
    method: str
    path: str
    status: int
    """HTTP status (101 for upgraded streams); 0 if the client vanished first."""
    namespace: str | None = None
    pod: str | None = None
    """The pod the request was about, if any."""
    received: float = 0.0
    """For ``http`` entries: when the request arrived (``time`` is when it finished)."""


class RequestLog:
    """Append-only list of :class:`LogEntry`."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.entries: list[LogEntry] = []
        """The newest entries, oldest first (``entries[i].seq == dropped + i``)."""
        self.max_entries = max_entries
        self.dropped = 0
        """How many of the oldest entries were trimmed away."""
        self._seq = itertools.count()

    def add(
        self,
        kind: str,
        method: str,
        path: str,
        status: int,
        *,
        namespace: str | None = None,
        pod: str | None = None,
        received: float | None = None,
    ) -> LogEntry:
        now = trio.current_time()
        entry = LogEntry(
            seq=next(self._seq),
            time=now,
            kind=kind,
            method=method,
            path=path,
            status=status,
            namespace=namespace,
            pod=pod,
            received=now if received is None else received,
        )
        self.entries.append(entry)
        excess = len(self.entries) - self.max_entries
        if excess > self.max_entries // 10:  # trim in batches: amortised O(1) per entry
            del self.entries[:excess]
            self.dropped += excess
        return entry

    def since(self, seq: int) -> list[LogEntry]:
        """Entries with ``seq`` >= ``seq`` that are still kept."""
        return self.entries[max(0, seq - self.dropped):]

    def for_pod(self, namespace: str, name: str) -> list[LogEntry]:
        """Entries about one pod, in order."""
        return [e for e in self.entries if e.namespace == namespace and e.pod == name]

    def __repr__(self) -> str:
        return f"<RequestLog entries={len(self.entries)}>"
