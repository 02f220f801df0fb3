"""Persistent pods: one pod per user, shared by every connection of that user.

Theory of operation
-------------------
In ``kubernetes.pod.mode: persistent`` the pod belongs to the user, not to a connection.
Everything that must hold across connections and gateway replicas lives on the pod
itself, in the API server -- never in one process's memory:

* **One pod, whoever comes first.** :func:`claim` GETs the pod by its fixed name
  (:func:`~.podtemplate.persistent_pod_name`, or ``metadata.name``) and creates it when
  it is missing (``createMissingPods``). Two connections that create at the same moment
  -- in one process or in two replicas -- get one ``201`` and one ``409 AlreadyExists``
  from the API server; the loser simply goes round again and uses the winner's pod.
* **In use.** Each connection claims the pod with its own annotation
  ``kuberun.trio/in-use.<connection id>`` (merge-patch: no read-modify-write, so claims of
  concurrent connections never overwrite each other) holding the gateway process's holder
  identity and Lease. :func:`release` removes it on disconnect and records the time in
  ``kuberun.trio/last-disconnect`` (and the connection's ``persistentIdleTimeout`` in
  ``kuberun.trio/idle-timeout``, so the sweep of any replica applies the right one).
* **Idle reaping** (:func:`sweep_idle`, run by every replica's
  :class:`~.reaper.Reaper`). A claim is live when its holder is this process and the
  connection is one of ours, or when its holder still holds the Lease it names (a crashed
  replica's claims die with its Lease); a claim naming no Lease is taken as live (it
  cannot be judged). Dead claims are removed. A pod with no live claim whose last
  disconnect is older than its idle timeout is deleted *with its resourceVersion as a
  precondition*: a connection that claimed it in between changed the version, so the
  delete fails with ``409`` and the pod stays.
* **Being deleted.** A claim whose answer shows a ``deletionTimestamp`` lost the race
  with a sweep: the connection waits until the pod is gone, then creates a new one.

Log events: ``persistent-pod-created``, ``persistent-pod-exists`` (409 on create),
``persistent-pod-terminating`` (waiting for a deletion), ``persistent-pod-claimed``,
``persistent-pod-released``, ``persistent-claim-stale`` and ``persistent-pod-reaped``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from ..aio.kube import KubeClient
from ..core.podstate import Pod
from ..core.podtemplate import LABEL_MANAGED_BY, LABEL_MODE, MANAGED_BY
from ..errors import KubernetesError, KuberunError, NotFoundError, PodStartError
from .lease import ANNOTATION_HOLDER, ANNOTATION_LEASE, format_micro_time, parse_time, utcnow, view

log = logging.getLogger(__name__)

ANNOTATION_LAST_DISCONNECT = "kuberun.trio/last-disconnect"
"""When the last connection of the pod ended (MicroTime); the idle clock starts here."""
ANNOTATION_IDLE_TIMEOUT = "kuberun.trio/idle-timeout"
"""Seconds of idleness after which a sweep deletes the pod (``0``: never)."""
CLAIM_PREFIX = "kuberun.trio/in-use."
"""One annotation per connection using the pod: ``kuberun.trio/in-use.<connection id>``."""
PERSISTENT_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_MODE}=persistent"
"""Every persistent pod (of any gateway)."""
GONE_POLL = (0.1, 1.0)
"""First and longest pause between GETs while waiting for a pod's deletion to finish."""

_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?")


def claim_key(connection_id: str) -> str:
    """The annotation key of one connection's claim (a valid qualified name)."""
    if _ID.fullmatch(connection_id):
        return CLAIM_PREFIX + connection_id
    return CLAIM_PREFIX + hashlib.sha256(connection_id.encode("utf-8", "replace")).hexdigest()[:32]


def _claim_value(holder: str, lease: str) -> str:
    return json.dumps({"holder": holder, "lease": lease, "since": format_micro_time(utcnow())},
                      separators=(",", ":"))


def claims(pod: Pod) -> dict[str, dict[str, str]]:
    """The pod's claims: annotation key -> ``{holder, lease, since}`` (unreadable: ``{}``)."""
    found: dict[str, dict[str, str]] = {}
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith(CLAIM_PREFIX):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = {}
            found[key] = {k: str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
    return found


def _terminating(pod: Pod) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _finished(pod: Pod) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


async def wait_gone(kube: KubeClient, namespace: str, name: str) -> None:
    """Return once the pod ``name`` does not exist (polls; bound it with a cancel scope)."""
    pause = GONE_POLL[0]
    while True:
        try:
            await kube.get_pod(namespace, name)
        except NotFoundError:
            return
        await trio.sleep(pause)
        pause = min(GONE_POLL[1], pause * 2)


def identity(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(holder, Lease reference) of the gateway process, from the configured pod metadata
    (where :mod:`.serve` puts them); empty strings where there are none."""
    annotations = metadata.get("annotations") or {}
    return (str(annotations.get(ANNOTATION_HOLDER) or ""),
            str(annotations.get(ANNOTATION_LEASE) or ""))


async def claim(kube: KubeClient, body: dict[str, Any], *, connection_id: str,
                holder: str, lease: str, create_missing: bool, idle_timeout: float,
                emit: Callable[..., None]) -> Pod:
    """Get or create the persistent pod ``body`` names and claim it for ``connection_id``
    on behalf of the gateway process ``holder`` (which holds Lease ``lease``, if any).

    Returns the pod as claimed (it may still be starting). ``emit(level, event, message,
    *args, **fields)`` writes a log line. No timeout: bound it with a cancel scope.
    Raises :class:`PodStartError` (``PodMissing``) when the pod is missing and
    ``create_missing`` is false.
    """
    meta = body["metadata"]
    namespace, name = str(meta.get("namespace") or "default"), str(meta["name"])
    annotations = meta.setdefault("annotations", {})
    annotations[ANNOTATION_IDLE_TIMEOUT] = f"{idle_timeout:g}"
    key = claim_key(connection_id)
    while True:
        try:
            pod = await kube.get_pod(namespace, name)
        except NotFoundError:
            if not create_missing:
                raise PodStartError(name, "PodMissing", (
                    f"your pod {name} does not exist, and this gateway does not create "
                    "missing pods (kubernetes.pod.createMissingPods: false)")) from None
            annotations[ANNOTATION_LAST_DISCONNECT] = format_micro_time(utcnow())
            try:
                pod = await kube.create_pod(namespace, body)
            except KubernetesError as exc:
                if exc.status != 409:
                    raise
                emit(logging.INFO, "persistent-pod-exists",
                     "pod %s/%s was created by another connection at the same time", namespace,
                     name, pod=name)
                continue
            emit(logging.INFO, "persistent-pod-created", "persistent pod %s/%s created",
                 namespace, name, pod=name)
        if _finished(pod) and not _terminating(pod) and create_missing:
            emit(logging.WARNING, "persistent-pod-terminating",
                 "persistent pod %s/%s has ended (%s); deleting it to start a new one",
                 namespace, name, (pod.get("status") or {}).get("phase"), pod=name)
            rv = (pod.get("metadata") or {}).get("resourceVersion")
            try:
                await kube.delete_pod(namespace, name, resource_version=rv)
            except KubernetesError as exc:
                if exc.status != 409:
                    raise
            continue
        if not _terminating(pod):
            try:
                pod = await kube.patch_pod(namespace, name, {"metadata": {"annotations": {
                    key: _claim_value(holder, lease)}}})
            except NotFoundError:
                continue
            if not _terminating(pod):
                emit(logging.INFO, "persistent-pod-claimed", "persistent pod %s/%s in use",
                     namespace, name, pod=name)
                return pod
        emit(logging.INFO, "persistent-pod-terminating",
             "persistent pod %s/%s is being deleted; waiting to start a new one", namespace,
             name, pod=name)
        await wait_gone(kube, namespace, name)


async def release(kube: KubeClient, namespace: str, name: str, *, connection_id: str,
                  idle_timeout: float) -> None:
    """Drop ``connection_id``'s claim and record the disconnect time (gone pod: fine)."""
    with_time = {claim_key(connection_id): None,
                 ANNOTATION_LAST_DISCONNECT: format_micro_time(utcnow()),
                 ANNOTATION_IDLE_TIMEOUT: f"{idle_timeout:g}"}
    with contextlib.suppress(NotFoundError):
        await kube.patch_pod(namespace, name, {"metadata": {"annotations": with_time}})


# -- the sweep (every replica) ------------------------------------------------------------------


class ClaimJudge:
    """Decides whether claims are live; caches Lease reads for the length of one sweep."""

    def __init__(self, kube: KubeClient, holder: str, live_connections: Iterable[str],
                 margin: float) -> None:
        self.kube = kube
        self.holder = holder
        self.ours = {claim_key(c) for c in live_connections}
        self.margin = margin
        self.now = utcnow()
        self._leases: dict[str, str | None] = {}

    async def _lease_holder(self, ref: str) -> str | None:
        """The live holder of Lease ``ref`` ("" if free, expired or missing; None: unknown)."""
        if ref not in self._leases:
            namespace, _, name = ref.partition("/")
            try:
                lease = view(await self.kube.get_lease(namespace, name))
            except NotFoundError:
                self._leases[ref] = ""
            except KuberunError:
                self._leases[ref] = None
            else:
                expired = lease.expired(self.now, self.margin)
                self._leases[ref] = "" if expired else lease.holder
        return self._leases[ref]

    async def live(self, key: str, value: Mapping[str, str]) -> bool:
        """Whether the claim ``key`` still stands for a live connection."""
        holder, lease = value.get("holder", ""), value.get("lease", "")
        if holder and holder == self.holder:
            return key in self.ours
        if not lease or "/" not in lease:
            return True  # no Lease to judge by: keep it (see the module docstring)
        current = await self._lease_holder(lease)
        return current is None or current == holder


async def sweep_idle(kube: KubeClient, namespace: str, judge: ClaimJudge,
                     default_timeout: float) -> int:
    """Delete the persistent pods of ``namespace`` idle beyond their timeout; the count."""
    deleted = 0
    for pod in await kube.list_pods(namespace, PERSISTENT_SELECTOR):
        meta = pod.get("metadata") or {}
        if _terminating(pod):
            continue
        name = str(meta.get("name"))
        in_use, stale = False, []
        for key, value in claims(pod).items():
            if await judge.live(key, value):
                in_use = True
            else:
                stale.append(key)
        if stale:
            log.info("persistent pod %s/%s: dropping %d claim(s) of ended connections",
                     namespace, name, len(stale), extra={
                         "event": "persistent-claim-stale", "pod": name, "claims": stale})
            try:
                pod = await kube.patch_pod(namespace, name, {"metadata": {"annotations": {
                    key: None for key in stale}}})
            except NotFoundError:
                continue
            meta = pod.get("metadata") or {}
        if in_use:
            continue
        annotations = meta.get("annotations") or {}
        timeout = _seconds(annotations.get(ANNOTATION_IDLE_TIMEOUT), default_timeout)
        if timeout <= 0:
            continue
        since = parse_time(str(annotations.get(ANNOTATION_LAST_DISCONNECT) or "")) or \
            parse_time(str(meta.get("creationTimestamp") or ""))
        if since is None or (judge.now - since).total_seconds() < timeout:
            continue
        try:
            await kube.delete_pod(namespace, name,
                                  resource_version=str(meta.get("resourceVersion") or "") or None)
        except KubernetesError as exc:
            if exc.status != 409:
                raise
            continue  # claimed (or changed) since we looked: not idle after all
        deleted += 1
        idle = (judge.now - since).total_seconds()
        log.info("deleted persistent pod %s/%s: idle for %.0fs (idle timeout %gs)", namespace,
                 name, idle, timeout, extra={"event": "persistent-pod-reaped", "pod": name,
                                            "namespace": namespace, "idle_s": round(idle)})
    return deleted


def _seconds(text: object, default: float) -> float:
    try:
        return float(str(text))
    except ValueError:
        return default


def disconnect_time(pod: Pod) -> datetime.datetime | None:
    """When the pod's last connection ended (None: never recorded)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return parse_time(str(annotations.get(ANNOTATION_LAST_DISCONNECT) or ""))
