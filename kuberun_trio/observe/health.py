"""Readiness: should this gateway get new connections? And liveness: does it answer?

Theory of operation
-------------------
:class:`Readiness` is a plain state holder that the gateway and anyone embedding it
update, and that the health endpoint and :attr:`Gateway.ready
<kuberun_trio.gateway.serve.Gateway.ready>` read. The gateway is ready when all hold:

* the SSH listener is up (:meth:`Readiness.listening`), and it is not draining for
  shutdown (:meth:`Readiness.draining`);
* the Kubernetes API has answered within the last ``api_grace`` seconds
  (twice ``timeouts.http``): :func:`probe_api` asks it (``GET /version``, one attempt)
  whenever no other request has been answered for half a ``timeouts.http``; every
  answered request of the gateway counts (:attr:`KubeClient.last_answer
  <kuberun_trio.aio.kube.KubeClient.last_answer>`);
* no *condition* is failing: :meth:`Readiness.set_unready` is the hook for other parts
  (a Lease that cannot be renewed: ``readiness.set_unready("lease", "cannot renew")``,
  then ``readiness.set_ready("lease")``).

Liveness (``/healthz``) is answered by the health server itself: the trio loop answers,
and a round trip through the trio-asyncio loop completes within :data:`LIVENESS_WAIT`.

Changes of readiness are logged once each (``event`` ``ready`` / ``not-ready`` with
``reasons``) by :func:`probe_api`, which re-evaluates after every probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import trio

log = logging.getLogger(__name__)

LIVENESS_WAIT = 2.0
"""Seconds the asyncio round trip of a liveness check may take."""


class Readiness:
    """The readiness state of one gateway (see the module docstring). Synchronous."""

    def __init__(self) -> None:
        self._listening = False
        self._draining = False
        self._conditions: dict[str, str] = {}
        self._answered_at: Callable[[], float | None] | None = None
        self._api_grace = 0.0
        self._logged: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"<Readiness {'ready' if self.ready else 'not ready: ' + '; '.join(self.reasons())}>"

    # -- the gateway's own transitions ------------------------------------------
    def starting(self) -> None:
        """A (new) run of the gateway starts: not listening, not draining; conditions set
        by other parts stay."""
        self._listening = self._draining = False
        self._logged = None

    def listening(self, up: bool = True) -> None:
        """The SSH listener is up (or closed)."""
        self._listening = up

    def draining(self) -> None:
        """Shutdown began: not ready from now on."""
        self._draining = True

    def watch_api(self, answered_at: Callable[[], float | None], grace: float) -> None:
        """Not ready while ``answered_at()`` (``time.monotonic()`` of the newest answer of
        the Kubernetes API, None: never) is older than ``grace`` seconds."""
        self._answered_at, self._api_grace = answered_at, grace

    # -- the hook for other parts -------------------------------------------------
    def set_unready(self, name: str, reason: str) -> None:
        """Condition ``name`` fails (e.g. ``"lease"``): not ready until :meth:`set_ready`."""
        self._conditions[name] = reason

    def set_ready(self, name: str) -> None:
        """Condition ``name`` holds again."""
        self._conditions.pop(name, None)

    # -- reading ------------------------------------------------------------------
    def reasons(self) -> list[str]:
        """Why the gateway is not ready (empty: it is)."""
        out = []
        if self._draining:
            out.append("draining for shutdown")
        elif not self._listening:
            out.append("the SSH listener is not up")
        if self._answered_at is not None:
            answered = self._answered_at()
            if answered is None:
                out.append("the Kubernetes API has not answered yet")
            elif time.monotonic() - answered > self._api_grace:
                out.append(f"the Kubernetes API has not answered for "
                           f"{time.monotonic() - answered:.0f}s")
        out.extend(f"{name}: {reason}" for name, reason in sorted(self._conditions.items()))
        return out

    @property
    def ready(self) -> bool:
        return not self.reasons()

    def log_change(self) -> None:
        """Log readiness if it changed since the last call (reasons, not ages, count)."""
        if not self._listening and not self._draining and self._logged is None:
            return  # still starting
        reasons = self.reasons()
        key = tuple(r.split(" for ")[0] for r in reasons)
        if key == self._logged:
            return
        self._logged = key
        if reasons:
            log.log(logging.INFO if self._draining else logging.WARNING, "not ready: %s",
                    "; ".join(reasons), extra={"event": "not-ready", "reasons": reasons})
        else:
            log.info("ready", extra={"event": "ready"})


class Pingable(Protocol):
    """What :func:`probe_api` needs of a :class:`~kuberun_trio.aio.kube.KubeClient`."""

    @property
    def last_answer(self) -> float | None: ...

    async def ping(self) -> bool: ...


async def probe_api(kube: Pingable, readiness: Readiness, interval: float) -> None:
    """Keep :attr:`kube.last_answer` fresh: ping the API whenever nothing else was answered
    for ``interval`` s; log readiness changes. Runs until cancelled. Trio-flavoured."""
    while True:
        answered = kube.last_answer
        if answered is None or time.monotonic() - answered >= interval:
            await kube.ping()
        readiness.log_change()
        await trio.sleep(interval)
