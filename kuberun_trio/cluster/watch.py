"""Watches on the store: history replay, filtered fan-out, bookmarks and timeouts.

Theory of operation
-------------------
Every store write becomes a :class:`Change` (rv, resource, type, object,
previous object), kept in the store's bounded history and offered to each
open :class:`Watch` of that resource. A watch sees a change through its
:class:`Filter` (namespace, label and field selectors): :func:`event_for`
turns selector transitions into ``ADDED``/``DELETED`` exactly as
``convertToWatchEvent`` in ``cache_watcher.go`` does.

A watch starts with pending events (the synthetic ``ADDED`` snapshot, or the
history after the requested RV, or a 410 ``ERROR``), then takes live events
from a bounded memory channel. Offering never blocks the writer: a watcher
whose buffer is full is ended (after draining what it has), like the real
cacher ends slow watchers; the client resumes from its last RV. ``BOOKMARK``
events carry the current RV when enabled; ``timeoutSeconds`` and the stop
event (fault ``drop_watches``) end a watch. The store holds watches weakly:
one its consumer abandoned just goes away.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import attrs
import trio

from .objects import KINDS, Obj, with_kind, with_rv
from .selectors import FieldSelector, LabelSelector

if TYPE_CHECKING:
    from .store import Store


@attrs.frozen
class Change:
    """One write to the store, as kept in its history."""

    rv: int
    """The resourceVersion the write took."""
    resource: str
    """``pods``, ``events`` or ``namespaces``."""
    type: str
    """``ADDED``, ``MODIFIED`` or ``DELETED``."""
    obj: Obj
    """The object after the write (for DELETED: as it was last stored)."""
    prev: Obj | None
    """The object before the write (None for ADDED)."""


@attrs.frozen
class Filter:
    """What a list or watch selects: one resource, a namespace, selectors."""

    resource: str
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if not self.labels.matches(meta.get("labels")):
            return False
        return self.fields.empty or self.fields.matches(KINDS[self.resource].fields(obj))


def event_for(flt: Filter, change: Change) -> tuple[str, Obj] | None:
    """The watch event ``change`` means to a filtered watcher (``convertToWatchEvent``)."""
    new_ok = flt.matches(change.obj)
    if change.type == "DELETED":
        return ("DELETED", change.obj) if new_ok else None
    old_ok = change.prev is not None and flt.matches(change.prev)
    if new_ok and old_ok:
        return "MODIFIED", change.obj
    if new_ok:
        return "ADDED", change.obj
    if old_ok and change.prev is not None:
        return "DELETED", with_rv(change.prev, change.rv)
    return None


class Watch:
    """One watch stream: ``async for event in watch`` yields ``{"type", "object"}`` dicts."""

    def __init__(
        self,
        store: Store,
        flt: Filter,
        *,
        initial: list[Obj],
        bookmarks: bool,
        deadline: float,
        stop: trio.Event | None,
        buffer: int,
    ) -> None:
        self._store, self._filter = store, flt
        self._pending: deque[Obj] = deque(initial)
        self._bookmarks, self._deadline, self._stop = bookmarks, deadline, stop
        self._send, self._receive = trio.open_memory_channel[tuple[str, Obj]](buffer)
        self._done = False

    # -- fed by the store (synchronous) --
    def offer(self, change: Change) -> None:
        """Queue what ``change`` means to this watcher; never blocks."""
        event = event_for(self._filter, change)
        if event is None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            # Too far behind: end it, like the cacher does; the client resumes.
            self.end()
            self._store._watchers.discard(self)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._store._watchers.discard(self)

    def end(self) -> None:
        """No more live events: the consumer drains what it has, then the iterator ends."""
        self._send.close()

    @property
    def resource(self) -> str:
        return self._filter.resource

    def close(self) -> None:
        """Stop the watch; the iterator ends (idempotent, synchronous)."""
        self._done = True
        self._send.close()
        self._receive.close()
        self._store._watchers.discard(self)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Obj:
        if self._done:
            raise StopAsyncIteration
        if self._pending:
            return self._pending.popleft()
        while True:
            if self._stop is not None and self._stop.is_set():
                break
            now = trio.current_time()
            if now >= self._deadline:
                break
            wake = self._deadline
            if self._bookmarks:
                wake = min(wake, now + self._store.bookmark_interval)
            outcome = await self._next_event(wake)
            if outcome == "end":
                break
            if isinstance(outcome, tuple):
                type_, obj = outcome
                return {"type": type_, "object": with_kind(self.resource, obj)}
            if self._bookmarks and trio.current_time() < self._deadline:
                return self._store.bookmark(self.resource)
        self.close()
        raise StopAsyncIteration

    async def _next_event(self, wake: float) -> tuple[str, Obj] | str | None:
        """An event, ``"end"`` (channel closed or stopped), or None at ``wake``."""
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            pass
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return "end"
        result: tuple[str, Obj] | str | None = None
        with trio.move_on_at(wake):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    nonlocal result
                    try:
                        result = await self._receive.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        result = "end"
                    nursery.cancel_scope.cancel()

                async def stopped(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(receive)
                if self._stop is not None:
                    nursery.start_soon(stopped, self._stop)
        if result is None and self._stop is not None and self._stop.is_set():
            return "end"
        return result

    def __repr__(self) -> str:
        return f"<Watch {self.resource} ns={self._filter.namespace} done={self._done}>"
