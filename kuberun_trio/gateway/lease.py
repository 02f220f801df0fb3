"""The gateway instance's Lease: one live gateway per instance name, and liveness for siblings.

Theory of operation
-------------------
Every gateway that runs with a Lease holds a ``coordination.k8s.io/v1`` Lease named
``kuberun-<instance>`` (:func:`lease_name`) in its own namespace. ``holderIdentity``
is unique per process (:func:`holder_identity`: the instance and the pod's UID in a
cluster -- a restarted container of the same pod may take its own Lease back at once --
else a random suffix). The Lease carries the gateway's labels
(``app.kubernetes.io/managed-by``, ``kuberun.trio/instance``), so siblings can list them.

:class:`LeaseKeeper` is the I/O half:

* :meth:`LeaseKeeper.acquire` runs before anything else the gateway does (before the
  start-up orphan sweep, which would otherwise kill a live namesake's sessions): it
  creates the Lease, or takes over one that is free (empty holder) or expired, with a
  PUT at the resourceVersion it read (a concurrent taker gets the 409 and loses). A
  Lease that another holder renewed within its duration raises :class:`LeaseHeldError`.
* :meth:`LeaseKeeper.run` renews every ``renew_interval`` seconds (PUT with the last
  resourceVersion). Failures are logged; once no renewal has succeeded for longer than
  the lease duration -- counted on this process's monotonic clock from the moment the
  last successful renewal was *sent* -- the Lease is lost: ``on_lost`` is called (the
  gateway stops accepting connections), the keeper keeps trying to get it back as
  :meth:`acquire` would, and calls ``on_regained`` when it does. A renewal answered by
  a 409 whose Lease now names another holder means someone took the Lease over: lost.
* :meth:`LeaseKeeper.release` deletes the Lease on a clean shutdown (with the last
  resourceVersion as precondition, so a Lease someone else took over stays).

The judgement of a Lease read from the API (:func:`view` / :class:`LeaseView`) is pure:
expired when ``renewTime`` (else ``acquireTime``) plus ``leaseDurationSeconds`` lies in
the past, or when it has no holder. Siblings compare against their own clock, so the
sweep (:mod:`.reaper`) adds a margin for clock skew.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from ..aio.kube import KubeClient
from ..core.podtemplate import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    pod_name_for_connection,
    sanitize_label_value,
)
from ..errors import KubernetesError, KuberunError, NotFoundError

log = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
ANNOTATION_LEASE = "kuberun.trio/lease"
"""Pod annotation ``<namespace>/<name>`` of the Lease of the gateway that made the pod."""
ANNOTATION_HOLDER = "kuberun.trio/holder"
"""Pod annotation: the ``holderIdentity`` of the gateway process that made the pod."""


def default_instance(environ: Mapping[str, str] | None = None) -> str:
    """``POD_NAME`` inside a cluster (``KUBERNETES_SERVICE_HOST`` set), else the host name."""
    env = os.environ if environ is None else environ
    if env.get("KUBERNETES_SERVICE_HOST") and env.get("POD_NAME"):
        return str(env["POD_NAME"])
    return socket.gethostname()


def holder_identity(instance: str, environ: Mapping[str, str] | None = None) -> str:
    """``<instance>_<POD_UID>`` in a cluster, else ``<instance>_<8 random hex digits>``."""
    env = os.environ if environ is None else environ
    uid = env.get("POD_UID") if env.get("KUBERNETES_SERVICE_HOST") else None
    return f"{instance}_{uid or secrets.token_hex(4)}"


def lease_name(instance: str) -> str:
    """``kuberun-<instance>``, made a valid object name (hashed when it had to change)."""
    return pod_name_for_connection("kuberun", instance)


def format_micro_time(at: datetime.datetime) -> str:
    """``metav1.MicroTime``: ``2024-05-01T12:00:00.123456Z``."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime.datetime | None:
    """A MicroTime (or Time) as an aware datetime; None if it cannot be read."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.frozen
class LeaseView:
    """What a Lease read from the API says."""

    namespace: str
    name: str
    holder: str
    """``spec.holderIdentity`` (empty: free)."""
    renewed: datetime.datetime | None
    """``spec.renewTime``, else ``spec.acquireTime``."""
    duration: float
    """``spec.leaseDurationSeconds`` (0 if unset)."""
    resource_version: str
    instance: str
    """The ``kuberun.trio/instance`` label (empty for Leases we did not write)."""

    def expires(self) -> datetime.datetime | None:
        """When it expires; None if it never held a time (treated as expired)."""
        if self.renewed is None:
            return None
        return self.renewed + datetime.timedelta(seconds=self.duration)

    def expired(self, now: datetime.datetime, margin: float = 0.0) -> bool:
        """Free, or not renewed within its duration (plus ``margin`` seconds) at ``now``."""
        expires = self.expires()
        if not self.holder or expires is None:
            return True
        return now > expires + datetime.timedelta(seconds=margin)

    def describe(self, now: datetime.datetime) -> str:
        """``holder gw_1 renewed 3s ago, expires in 27s``."""
        if self.renewed is None:
            return f"holder {self.holder or '(none)'}, never renewed"
        ago = (now - self.renewed).total_seconds()
        left = self.duration - ago
        return f"holder {self.holder or '(none)'}, renewed {ago:.0f}s ago, expires in {left:.0f}s"


def view(obj: Mapping[str, Any]) -> LeaseView:
    """The :class:`LeaseView` of a Lease dict."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    when = spec.get("renewTime") or spec.get("acquireTime")
    return LeaseView(
        namespace=str(meta.get("namespace") or ""), name=str(meta.get("name") or ""),
        holder=str(spec.get("holderIdentity") or ""),
        renewed=parse_time(str(when)) if when else None,
        duration=float(spec.get("leaseDurationSeconds") or 0),
        resource_version=str(meta.get("resourceVersion") or ""),
        instance=str((meta.get("labels") or {}).get(LABEL_INSTANCE) or ""))


class LeaseHeldError(KuberunError):
    """Another live gateway holds this instance's Lease."""


@attrs.frozen
class LeaseOptions:
    """Where the Lease lives and how long it lasts."""

    namespace: str
    """The gateway's own namespace (``POD_NAMESPACE`` in a cluster)."""
    duration: float = 30.0
    """``leaseDurationSeconds``: siblings consider the gateway dead this long after the
    last renewal (rounded up to whole seconds)."""
    renew_interval: float = 10.0
    """Seconds between renewals."""
    holder: str = ""
    """``holderIdentity``; empty: :func:`holder_identity` of the instance."""


class LeaseKeeper:
    """Acquires, renews and releases one gateway instance's Lease. Trio-flavoured."""

    def __init__(self, kube: KubeClient, options: LeaseOptions, instance: str, *,
                 on_lost: Callable[[str], Any] | None = None,
                 on_regained: Callable[[], Any] | None = None) -> None:
        self.kube = kube
        self.options = options
        self.instance = instance
        self.holder = options.holder or holder_identity(instance)
        self.name = lease_name(instance)
        self.namespace = options.namespace
        self.held = False
        """True while the Lease is ours and was renewed within its duration."""
        self.on_lost = on_lost
        self.on_regained = on_regained
        self._lease: dict[str, Any] | None = None
        self._renewed_at = 0.0
        """trio time at which the last successful renewal was sent."""

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<LeaseKeeper {self.namespace}/{self.name} {self.holder} {state}>"

    @property
    def duration_seconds(self) -> int:
        return max(1, int(-(-self.options.duration // 1)))

    @property
    def ref(self) -> str:
        """``<namespace>/<name>`` (the pod annotation :data:`ANNOTATION_LEASE`)."""
        return f"{self.namespace}/{self.name}"

    def _body(self, previous: dict[str, Any] | None, now: datetime.datetime) -> dict[str, Any]:
        stamp = format_micro_time(now)
        labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: sanitize_label_value(self.instance)}
        spec: dict[str, Any] = {"holderIdentity": self.holder,
                                "leaseDurationSeconds": self.duration_seconds,
                                "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "labels": labels}
        if previous is not None:
            old_meta, old_spec = previous.get("metadata") or {}, previous.get("spec") or {}
            meta = {**old_meta, "labels": {**(old_meta.get("labels") or {}), **labels}}
            meta.pop("managedFields", None)
            transitions = int(old_spec.get("leaseTransitions") or 0)
            if old_spec.get("holderIdentity") == self.holder:
                spec["acquireTime"] = old_spec.get("acquireTime") or stamp
                spec["leaseTransitions"] = transitions
            else:
                spec["leaseTransitions"] = transitions + 1
        return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": meta, "spec": spec}

    async def acquire(self) -> None:
        """Take the Lease or raise :class:`LeaseHeldError` (see the module docstring).

        Other API errors propagate (:class:`~kuberun_trio.errors.KubernetesError`).
        """
        for _ in range(3):  # lost races (409) are retried from a fresh read
            sent = trio.current_time()
            try:
                try:
                    current = await self.kube.get_lease(self.namespace, self.name)
                except NotFoundError:
                    lease = await self.kube.create_lease(self.namespace, self._body(None, utcnow()))
                else:
                    seen = view(current)
                    now = utcnow()
                    if seen.holder != self.holder and not seen.expired(now):
                        raise LeaseHeldError(
                            f"another gateway holds instance {self.instance!r}: Lease "
                            f"{self.ref} ({seen.describe(now)}); stop that gateway, wait for "
                            f"its Lease to expire, or give this one another --instance")
                    lease = await self.kube.replace_lease(self.namespace, self.name,
                                                          self._body(current, now))
            except KubernetesError as exc:
                if exc.status == 409:
                    continue
                if isinstance(exc, NotFoundError):  # the namespace itself is missing
                    raise KuberunError(f"cannot create Lease {self.ref}: {exc}; create the "
                                       f"namespace or set lease.namespace") from exc
                if exc.status in (401, 403):
                    raise KuberunError(
                        f"cannot take Lease {self.ref}: {exc}; grant get, list, create, update "
                        f"and delete on leases (coordination.k8s.io) in namespace "
                        f"{self.namespace}, or set lease.enabled: false") from exc
                raise
            self._took(lease, sent)
            return
        raise LeaseHeldError(f"lost the race for Lease {self.ref} three times; another "
                             f"gateway with instance {self.instance!r} is starting")

    def _took(self, lease: dict[str, Any], sent: float) -> None:
        self._lease, self._renewed_at = lease, sent
        if not self.held:
            self.held = True
            log.info("holding Lease %s as %s", self.ref, self.holder,
                     extra={"event": "lease-acquired", "lease": self.ref, "holder": self.holder})

    async def renew(self) -> None:
        """One renewal (PUT at the last resourceVersion). Raises on failure."""
        assert self._lease is not None, "acquire() first"
        sent = trio.current_time()
        try:
            lease = await self.kube.replace_lease(self.namespace, self.name,
                                                  self._body(self._lease, utcnow()))
        except KubernetesError as exc:
            if exc.status not in (404, 409):
                raise
            # Someone wrote it, or deleted it: read it again and judge.
            try:
                current = await self.kube.get_lease(self.namespace, self.name)
            except NotFoundError:
                lease = await self.kube.create_lease(self.namespace, self._body(None, utcnow()))
            else:
                if view(current).holder != self.holder:
                    self._lost(f"taken over by {view(current).holder or '(nobody)'}")
                    raise
                lease = await self.kube.replace_lease(self.namespace, self.name,
                                                      self._body(current, utcnow()))
        self._took(lease, sent)

    def _lost(self, why: str) -> None:
        if self.held:
            self.held = False
            log.error("lost Lease %s: %s; not accepting connections until it is back",
                      self.ref, why, extra={"event": "lease-lost", "lease": self.ref,
                                            "holder": self.holder, "reason": why})
            if self.on_lost is not None:
                self.on_lost(why)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew until cancelled; lose and regain the Lease as described above."""
        task_status.started()
        while True:
            await trio.sleep(self.options.renew_interval)
            if self.held:
                deadline = self._renewed_at + self.options.duration
                with trio.move_on_at(deadline):
                    try:
                        await self.renew()
                    except KuberunError as exc:
                        log.warning("cannot renew Lease %s: %s", self.ref, exc, extra={
                            "event": "lease-renew-failed", "lease": self.ref,
                            "reason": str(exc)})
                if trio.current_time() >= deadline:
                    self._lost(f"not renewed for {self.options.duration:g}s")
            else:
                await self._regain()

    async def _regain(self) -> None:
        with trio.move_on_after(self.options.duration):
            try:
                await self.acquire()
            except KuberunError as exc:
                log.warning("Lease %s not regained: %s", self.ref, exc, extra={
                    "event": "lease-regain-failed", "lease": self.ref, "reason": str(exc)})
                return
        if self.held:
            log.info("Lease %s regained", self.ref, extra={"event": "lease-regained",
                                                           "lease": self.ref})
            if self.on_regained is not None:
                self.on_regained()

    async def release(self) -> None:
        """Delete the Lease if it is still ours (clean shutdown); bounded, shielded."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        self.held = False
        rv = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        with trio.move_on_after(5, shield=True):
            try:
                await self.kube.delete_lease(self.namespace, self.name, resource_version=rv)
            except KuberunError as exc:
                log.warning("Lease %s not released: %s", self.ref, exc,
                            extra={"event": "lease-release-failed", "lease": self.ref})
                return
            log.info("released Lease %s", self.ref, extra={"event": "lease-released",
                                                            "lease": self.ref})
