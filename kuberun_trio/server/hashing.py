"""A fair, bounded queue for slow password hashing.

Theory of operation
-------------------
Verifying a password hash takes tens to hundreds of milliseconds of a CPU (and 64 MiB for
argon2's defaults), so it runs in worker threads -- ``threads`` at a time, through a trio
``CapacityLimiter`` whose waiters are served first come, first served. Two rules keep an
unauthenticated flood from starving everyone else:

* **one per source**: a source (the client's address key, see
  :func:`kuberun_trio.gateway.throttle.address_key`) has at most one verification queued
  or running; a second one at the same time is refused at once;
* **bounded**: at most ``threads + queue`` verifications are queued or running; beyond
  that a request is refused at once instead of queueing.

So 300 connections from one address hold at most one worker, and a login from another
address waits for at most one verification per other waiting address. A refusal raises
:class:`HashQueueFull` (the caller denies the login with its message).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class HashQueueFull(Exception):
    """The verification was refused at once (the message says why)."""


class HashQueue:
    """Runs blocking hash checks in worker threads, fairly (see the module docstring)."""

    def __init__(self, threads: int = 2, queue: int = 16) -> None:
        self.threads = threads
        self.queue = queue
        self._limiter = trio.CapacityLimiter(threads)
        self._sources: set[str] = set()
        self.refused = 0

    def __repr__(self) -> str:
        return (f"<HashQueue threads={self.threads} queue={self.queue} "
                f"pending={len(self._sources)} refused={self.refused}>")

    def statistics(self) -> dict[str, int]:
        return {"pending": len(self._sources), "running": self._limiter.borrowed_tokens,
                "refused": self.refused}

    async def run(self, source: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread; raises :class:`HashQueueFull` at once if refused.

        Not abandoned on cancellation: a cancelled caller waits for its running check,
        so no more than ``threads`` threads ever hash.
        """
        if source in self._sources:
            self.refused += 1
            raise HashQueueFull("a password check from this address is already running")
        if len(self._sources) >= self.threads + self.queue:
            self.refused += 1
            raise HashQueueFull("too many password checks waiting")
        self._sources.add(source)
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._sources.discard(source)
