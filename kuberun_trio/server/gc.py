"""The ``gc`` command: delete the pods an earlier run of this gateway instance left behind.

Theory of operation
-------------------
Every pod the gateway creates carries ``app.kubernetes.io/managed-by=kuberun-trio`` and
``kuberun.trio/instance=<instance>`` (:mod:`kuberun_trio.core.podtemplate`). A gateway that
died without cleaning up (SIGKILL, OOM, node loss) leaves such pods running.
``python -m kuberun_trio gc`` lists the pods matching
:func:`~kuberun_trio.core.podtemplate.label_selector_for_instance` in its namespace and
deletes them (``--dry-run`` only lists); it refuses while a live gateway holds the
instance's Lease, unless ``--force``. The server itself does the same at start, after taking
its Lease (:meth:`kuberun_trio.gateway.reaper.Reaper.sweep_at_start`), and its sweeps
collect orphans while it runs (:mod:`kuberun_trio.gateway.reaper`).

Inside a cluster, pods additionally get an ownerReference to the gateway's own pod, so
Kubernetes' garbage collector removes them even if the gateway never starts again.
"""

from __future__ import annotations

import logging

import attrs
import trio

from ..aio.kube import KubeClient
from ..core.podtemplate import LABEL_MODE, label_selector_for_instance
from ..errors import KuberunError

log = logging.getLogger(__name__)


@attrs.frozen
class Orphan:
    """A pod of this instance found by the sweep."""

    namespace: str
    name: str
    phase: str
    """``status.phase`` when listed (``Terminating`` if a deletion is already under way)."""


async def find_orphans(kube: KubeClient, namespace: str, instance: str) -> list[Orphan]:
    """The pods of ``instance`` in ``namespace``, oldest first. Trio-flavoured."""
    pods = await kube.list_pods(namespace, label_selector_for_instance(instance))
    pods.sort(key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
    found = []
    for pod in pods:
        meta = pod["metadata"]
        if (meta.get("labels") or {}).get(LABEL_MODE) == "persistent":
            continue  # a user's pod (kubernetes.pod.mode: persistent), not a connection's
        phase = "Terminating" if meta.get("deletionTimestamp") else str(
            (pod.get("status") or {}).get("phase") or "Unknown")
        found.append(Orphan(str(meta.get("namespace") or namespace), str(meta["name"]), phase))
    return found


async def collect_orphans(kube: KubeClient, namespace: str, instance: str, *,
                          dry_run: bool = False) -> list[Orphan]:
    """Delete (unless ``dry_run``) every pod of ``instance``; return what was found.

    A pod that cannot be deleted is logged and skipped; the others are still deleted.
    """
    orphans = await find_orphans(kube, namespace, instance)
    for orphan in orphans:
        extra = {"event": "orphan-found" if dry_run else "orphan-deleted",
                 "pod": orphan.name, "namespace": orphan.namespace, "instance": instance}
        if dry_run:
            log.info("orphan pod %s/%s", orphan.namespace, orphan.name, extra=extra)
            continue
        try:
            await kube.delete_pod(orphan.namespace, orphan.name)
        except KuberunError as exc:
            log.error("cannot delete orphan pod %s/%s: %s", orphan.namespace, orphan.name, exc,
                      extra={**extra, "event": "orphan-delete-failed"})
        else:
            log.info("deleted orphan pod %s/%s", orphan.namespace, orphan.name, extra=extra)
        await trio.lowlevel.checkpoint()
    return orphans
