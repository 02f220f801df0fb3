"""No pod left behind: the instance-wide reaper and the periodic orphan sweeps.

Theory of operation
-------------------
A connection deletes its own pod on the way out (:mod:`.pod`), bounded by
``timeouts.podStop``. Three things can still leave a pod behind while the gateway runs:
the delete fails or times out (API server down); the create answer arrives after the
connection gave up, so nobody knows the pod; a sibling replica dies with pods open.
:class:`Reaper` is one task tree per gateway instance that covers all three:

* **Retries.** :meth:`Reaper.submit` (synchronous, never blocks) hands over a pod whose
  delete failed -- by name, or by connection id when the create's answer never came.
  The retry loop deletes it again with exponential back-off (``retry_base`` doubling up
  to ``retry_max``, with jitter) until the DELETE is accepted or the pod is gone.
* **Own sweep.** Every ``sweep_interval`` seconds (each pause drawn from 80-100 % of
  it) the pods of this instance made by *this process* (annotation
  ``kuberun.trio/holder``) that no live connection owns (label
  ``kuberun.trio/connection-id``) are deleted. Pods of the instance made by another
  process are the start-up sweep's (:func:`collect_instance_pods`), never the periodic
  one's: a namesake gateway run without a Lease keeps its sessions.
* **Cross-replica sweep** (only while this gateway holds its own Lease -- a gateway that
  cannot renew does not judge others). Pods made by a gateway that held a Lease carry
  its reference (annotation ``kuberun.trio/lease: <namespace>/<name>``). A pod of
  another instance whose Lease is missing, free, or expired for more than ``margin``
  seconds, and that is itself older than ``margin``, is deleted; a pod whose Lease is
  live, or that names no Lease, is never touched. Expired Leases of the gateway's own
  namespace that no pod names any more are deleted too, so a Deployment's churn leaves
  no Leases behind.

* **Persistent pods** (``kubernetes.pod.mode: persistent``) belong to users, not to
  connections: every sweep above skips a pod labelled ``kuberun.trio/mode: persistent``
  (they carry no instance label either). Each periodic sweep instead deletes the persistent
  pods of the namespace that no live connection of any replica claims and that have been
  idle beyond their ``persistentIdleTimeout`` (:func:`.persistent.sweep_idle`).

Every sweep deletion is logged (``orphan-pod-deleted``, with the dead instance) and
counted in :attr:`Reaper.orphan_pods_deleted` (exported as
``kuberun_orphan_pods_deleted_total`` where metrics exist); every retry success in
:attr:`Reaper.pods_reaped`.
"""

from __future__ import annotations

import datetime
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ..aio.kube import KubeClient
from ..core.podtemplate import (
    LABEL_CONNECTION_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_MODE,
    MANAGED_BY,
    label_selector_for_instance,
    sanitize_label_value,
)
from ..errors import KuberunError, NotFoundError
from . import persistent
from .lease import ANNOTATION_HOLDER, ANNOTATION_LEASE, LeaseKeeper, LeaseView, parse_time, view

log = logging.getLogger(__name__)

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


@attrs.frozen
class GcOptions:
    """When the gateway looks for pods nobody owns (``gc`` in the server's config)."""

    sweep_interval: float = 60.0
    """Seconds between sweeps (each pause is 80-100 % of it)."""
    margin: float = 15.0
    """Cross-replica sweep: a Lease must have expired this long ago, and a pod be this
    old, before the pod is deleted (covers clock skew between replicas)."""
    cross_instance: bool = True
    """Sweep other instances' pods whose Lease is gone (needs a Lease of our own)."""
    startup_sweep: bool = False
    """At start (after the Lease is taken), delete every pod of this instance: what a
    previous run left. The server turns this on; a library user may not want it."""
    retry_base: float = 1.0
    """First back-off of the reaper's delete retries (doubling)."""
    retry_max: float = 60.0
    """Longest back-off between two delete retries."""


@attrs.frozen
class ReaperStatistics:
    """Counters of a :class:`Reaper` (what a metrics exporter reads)."""

    orphan_pods_deleted: int
    """Pods the sweeps deleted (``kuberun_orphan_pods_deleted_total``)."""
    pods_reaped: int
    """Failed deletes the retry loop completed."""
    pending: int
    """Deletes waiting for a retry now."""
    sweeps: int
    """Sweeps completed."""


@attrs.define
class _Pending:
    namespace: str
    name: str | None
    connection_id: str
    attempts: int = 0
    due: float = 0.0


def _persistent(meta: dict[str, Any]) -> bool:
    """A user's persistent pod: never an orphan of a connection."""
    return (meta.get("labels") or {}).get(LABEL_MODE) == "persistent"


def _age(obj: dict[str, Any], now: datetime.datetime) -> float:
    created = parse_time(str((obj.get("metadata") or {}).get("creationTimestamp") or ""))
    return (now - created).total_seconds() if created else 0.0


class Reaper:
    """The instance-wide delete retrier and sweeper. Trio-flavoured; run :meth:`run`."""

    def __init__(self, kube: KubeClient, *, namespace: str, instance: str, holder: str,
                 options: GcOptions, live_connections: Callable[[], Iterable[str]],
                 keeper: LeaseKeeper | None = None, delete_timeout: float = 60.0) -> None:
        self.kube = kube
        self.namespace = namespace
        """The guest pods' namespace."""
        self.instance = instance
        self.holder = holder
        self.options = options
        self.live_connections = live_connections
        self.keeper = keeper
        self.delete_timeout = delete_timeout
        self.orphan_pods_deleted = 0
        """Pods the sweeps deleted (``kuberun_orphan_pods_deleted_total``)."""
        self.on_orphan_deleted: Callable[[], None] = lambda: None
        """Called once per orphan pod deleted (the gateway counts it in its metrics)."""
        self.pods_reaped = 0
        """Failed deletes the retry loop completed."""
        self.sweeps = 0
        """Sweeps completed."""
        self.persistent_idle_timeout = 8 * 3600.0
        """Idle timeout of persistent pods that do not record their own (0: never)."""
        self.persistent_pods_deleted = 0
        """Idle persistent pods the sweeps deleted (``kuberun_persistent_pods_deleted_total``)."""
        self.on_persistent_deleted: Callable[[int], None] = lambda count: None
        """Called with the number of idle persistent pods each sweep deleted (metrics)."""
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._wake = trio.Event()

    def __repr__(self) -> str:
        return (f"<Reaper {self.instance} pending={len(self._pending)} "
                f"orphans_deleted={self.orphan_pods_deleted}>")

    @property
    def pending(self) -> int:
        """Deletes waiting for a retry."""
        return len(self._pending)

    def statistics(self) -> ReaperStatistics:
        return ReaperStatistics(orphan_pods_deleted=self.orphan_pods_deleted,
                                pods_reaped=self.pods_reaped, pending=self.pending,
                                sweeps=self.sweeps)

    # -- retries -----------------------------------------------------------------------
    def submit(self, namespace: str, name: str | None, connection_id: str) -> None:
        """Retry the delete of a pod (by name, or by connection id if the name is unknown)."""
        key = (namespace, name or f"connection-id={connection_id}")
        if key not in self._pending:
            self._pending[key] = _Pending(namespace, name, connection_id,
                                          due=trio.current_time() + self.options.retry_base)
            self._wake.set()

    async def _delete_pending(self, item: _Pending) -> None:
        if item.name is not None:
            await self.kube.delete_pod(item.namespace, item.name)
            return
        selector = f"{LABEL_CONNECTION_ID}={sanitize_label_value(item.connection_id)}"
        for pod in await self.kube.list_pods(item.namespace, selector):
            await self.kube.delete_pod(item.namespace, str(pod["metadata"]["name"]))

    async def _retry_loop(self) -> None:
        while True:
            now = trio.current_time()
            due = [(k, p) for k, p in self._pending.items() if p.due <= now]
            for key, item in due:
                with trio.move_on_after(self.delete_timeout):
                    try:
                        await self._delete_pending(item)
                    except KuberunError as exc:
                        log.info("pod %s: delete retry %d failed: %s", key[1], item.attempts + 1,
                                 exc, extra={"event": "pod-delete-retry-failed", "pod": key[1],
                                             "connection_id": item.connection_id})
                    else:
                        del self._pending[key]
                        self.pods_reaped += 1
                        log.info("pod %s deleted after %d retries", key[1], item.attempts + 1,
                                 extra={"event": "pod-reaped", "pod": key[1],
                                        "connection_id": item.connection_id})
                        continue
                item.attempts += 1
                backoff = min(self.options.retry_max, self.options.retry_base * 2**item.attempts)
                item.due = trio.current_time() + backoff * random.uniform(0.75, 1.0)
            self._wake = trio.Event()
            wake = min((p.due for p in self._pending.values()), default=None)
            with trio.move_on_at(wake if wake is not None else float("inf")):
                await self._wake.wait()

    # -- sweeps ------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.options.sweep_interval * random.uniform(0.8, 1.0))
            with trio.move_on_after(max(self.options.sweep_interval, self.delete_timeout)):
                try:
                    await self.sweep()
                except KuberunError as exc:
                    log.warning("orphan sweep failed: %s", exc,
                                extra={"event": "sweep-failed", "reason": str(exc)})

    async def sweep_at_start(self) -> int:
        """Delete every pod of this instance (any process's): what an earlier run left.

        Run it only while holding the instance's Lease (or knowing no namesake runs)."""
        pods = await self.kube.list_pods(self.namespace,
                                         label_selector_for_instance(self.instance))
        deleted = 0
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp") and not _persistent(pod["metadata"]):
                deleted += await self._delete_orphan(pod["metadata"], self.instance,
                                                     "left by an earlier run of this instance")
        return deleted

    async def sweep(self) -> int:
        """One sweep (own pods, then other replicas'); the number of pods deleted."""
        deleted = await self.sweep_own()
        if self.options.cross_instance and self.keeper is not None and self.keeper.held:
            deleted += await self.sweep_replicas()
        deleted += await self.sweep_persistent()
        self.sweeps += 1
        return deleted

    async def sweep_persistent(self) -> int:
        """Delete the namespace's persistent pods that are idle and claimed by no live
        connection of any replica (see :mod:`.persistent`)."""
        judge = persistent.ClaimJudge(self.kube, self.holder, self.live_connections(),
                                      self.options.margin)
        deleted = await persistent.sweep_idle(self.kube, self.namespace, judge,
                                              self.persistent_idle_timeout)
        self.persistent_pods_deleted += deleted
        self.on_persistent_deleted(deleted)
        return deleted

    async def sweep_own(self) -> int:
        """Delete this process's pods that no live connection owns."""
        live = {sanitize_label_value(c) for c in self.live_connections()}
        pods = await self.kube.list_pods(self.namespace,
                                         label_selector_for_instance(self.instance))
        deleted = 0
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp") or _persistent(meta):
                continue
            if (meta.get("annotations") or {}).get(ANNOTATION_HOLDER) != self.holder:
                continue
            if (meta.get("labels") or {}).get(LABEL_CONNECTION_ID) in live:
                continue
            deleted += await self._delete_orphan(meta, self.instance, "no live connection owns it")
        return deleted

    async def sweep_replicas(self) -> int:
        """Delete other instances' pods whose Lease is missing or expired (see above)."""
        pods = await self.kube.list_pods(self.namespace, MANAGED_SELECTOR)
        own = sanitize_label_value(self.instance)
        now = datetime.datetime.now(datetime.UTC)
        by_lease: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            meta = pod["metadata"]
            ref = (meta.get("annotations") or {}).get(ANNOTATION_LEASE)
            if not ref or "/" not in ref or meta.get("deletionTimestamp") or _persistent(meta):
                continue
            if (meta.get("labels") or {}).get(LABEL_INSTANCE) == own:
                continue
            by_lease.setdefault(ref, []).append(pod)
        deleted = 0
        for ref, group in by_lease.items():
            verdict = await self._lease_verdict(ref, now)
            if verdict is None:
                continue
            for pod in group:
                if _age(pod, now) < self.options.margin:
                    continue
                meta = pod["metadata"]
                dead = str((meta.get("labels") or {}).get(LABEL_INSTANCE) or "?")
                deleted += await self._delete_orphan(meta, dead, verdict)
        await self._forget_dead_leases({ref for ref in by_lease}, now)
        return deleted

    async def _lease_verdict(self, ref: str, now: datetime.datetime) -> str | None:
        """Why the pods naming Lease ``ref`` are orphans, or None if they are not."""
        namespace, name = ref.split("/", 1)
        try:
            lease = view(await self.kube.get_lease(namespace, name))
        except NotFoundError:
            return f"its gateway's Lease {ref} is gone"
        except KuberunError as exc:
            log.warning("cannot read Lease %s: %s; its pods are left alone", ref, exc,
                        extra={"event": "sweep-lease-unreadable", "lease": ref})
            return None
        if lease.expired(now, self.options.margin):
            return f"its gateway's Lease {ref} expired ({lease.describe(now)})"
        return None

    async def _forget_dead_leases(self, named: set[str], now: datetime.datetime) -> None:
        """Delete expired kuberun Leases of our namespace that no live pod names."""
        if self.keeper is None:
            return
        for obj in await self.kube.list_leases(self.keeper.namespace, MANAGED_SELECTOR):
            lease: LeaseView = view(obj)
            ref = f"{lease.namespace}/{lease.name}"
            mine_or_named = ref == self.keeper.ref or ref in named
            if mine_or_named or not lease.expired(now, self.options.margin):
                continue
            try:
                await self.kube.delete_lease(lease.namespace, lease.name,
                                             resource_version=lease.resource_version)
            except KuberunError as exc:
                log.info("expired Lease %s not deleted: %s", ref, exc,
                         extra={"event": "lease-delete-failed", "lease": ref})
            else:
                log.info("deleted expired Lease %s of instance %s", ref, lease.instance or "?",
                         extra={"event": "lease-deleted", "lease": ref,
                                "instance": lease.instance})

    async def _delete_orphan(self, meta: dict[str, Any], instance: str, why: str) -> int:
        namespace, name = str(meta.get("namespace") or self.namespace), str(meta["name"])
        try:
            await self.kube.delete_pod(namespace, name)
        except KuberunError as exc:
            log.warning("cannot delete orphan pod %s/%s of instance %s: %s", namespace, name,
                        instance, exc, extra={"event": "orphan-delete-failed", "pod": name,
                                              "namespace": namespace, "instance": instance})
            return 0
        self.orphan_pods_deleted += 1
        self.on_orphan_deleted()
        log.info("deleted orphan pod %s/%s of instance %s: %s", namespace, name, instance, why,
                 extra={"event": "orphan-pod-deleted", "pod": name, "namespace": namespace,
                        "instance": instance, "reason": why})
        return 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The retry loop and the sweep loop, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._retry_loop)
            nursery.start_soon(self._sweep_loop)
            task_status.started()
