"""How the gateway judges a pod's state: ready, failed to start, lost. Pure functions.

Theory of operation
-------------------
Every verdict about a pod is a function of one pod object (a JSON dict as the
API returns it), so per-pod watches (:class:`~kuberun_trio.aio.kube.KubeClient`)
and the shared watch (:class:`~kuberun_trio.gateway.podwatch.PodWatchHub`) judge
exactly alike, and the tests can feed states without a cluster.

* :func:`judge_start` -- the pod once Running and Ready, None while starting,
  :class:`~kuberun_trio.errors.PodStartError` when it will not start
  (:func:`pod_start_failure`: deletion, phase Failed/Succeeded, Unschedulable,
  a container waiting for one of :data:`FATAL_WAITING_REASONS`; final on first
  sight -- the kubelet retries a failed pull only after a back-off of 10 s and
  more, so a user would wait for ``podStart`` for nothing).
* :func:`pod_loss` -- why a pod that served a connection is no longer usable:
  deleted, being deleted, failed, or its container stopped. A container that
  never ran is not "stopped": a lagging watch can deliver a pod's pre-start
  state after the pod was seen Ready.
* :func:`last_warning` -- the newest informative Warning event, for error
  messages.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ..errors import PodStartError

Pod = dict[str, Any]

FATAL_WAITING_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
    "RunContainerError", "PreCreateHookError", "PostStartHookError",
})  # fmt: skip
"""Container waiting reasons that end :meth:`KubeClient.wait_for_pod` with PodStartError."""


@attrs.frozen
class PodLoss:
    """Why a pod that was serving a connection is no longer usable."""

    reason: str
    """``Deleted``, ``Terminating``, ``ContainerStopped``, or the pod's status reason
    (``Evicted``, ...) / phase when it failed."""
    message: str
    """Human-readable detail."""


def _conditions(pod: Pod) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (pod.get("status") or {}).get("conditions") or []}


def _container_statuses(pod: Pod) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def pod_ready(pod: Pod) -> bool:
    """Phase Running and condition Ready=True."""
    ready = _conditions(pod).get("Ready", {})
    return (pod.get("status") or {}).get("phase") == "Running" and ready.get("status") == "True"


def pod_start_failure(pod: Pod) -> tuple[str, str] | None:
    """``(reason, message)`` if ``pod`` will not become Running+Ready, else None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "PodDeleted", "the pod is being deleted"
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        return status.get("reason") or phase, status.get("message") or _terminated_detail(pod)
    scheduled = _conditions(pod).get("PodScheduled", {})
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return "Unschedulable", scheduled.get("message") or "the pod cannot be scheduled"
    for cs in _container_statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING_REASONS:
            return waiting["reason"], waiting.get("message") or f"container {cs.get('name')}"
    return None


def _terminated_detail(pod: Pod) -> str:
    for cs in _container_statuses(pod):
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return (f"container {cs.get('name')} terminated: {term.get('reason') or 'Error'}, "
                    f"exit code {term.get('exitCode')}"
                    + (f": {term['message']}" if term.get("message") else ""))  # fmt: skip
    return f"the pod's phase is {(pod.get('status') or {}).get('phase')}"


def pod_loss(pod: Pod | None, container: str | None = None) -> PodLoss | None:
    """Why a running pod is lost (None: still fine). ``container`` None = any container."""
    if pod is None:
        return PodLoss("Deleted", "the pod was deleted")
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return PodLoss("Terminating", "the pod is being deleted")
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        return PodLoss(status.get("reason") or phase,
                       status.get("message") or _terminated_detail(pod))  # fmt: skip
    for cs in (status.get("containerStatuses") or []):
        if container is not None and cs.get("name") != container:
            continue
        state = cs.get("state") or {}
        if "running" not in state:
            term = state.get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if not term and not cs.get("restartCount") and "waiting" in state:
                # Never ran yet (ContainerCreating, ...): a stale pre-start state that a
                # lagging watch can deliver after the pod was seen Ready. Not a loss.
                continue
            what = (f"{term.get('reason') or 'Error'}, exit code {term.get('exitCode')}" if term
                    else (state.get("waiting") or {}).get("reason") or "not running")
            return PodLoss("ContainerStopped", f"container {cs.get('name')} stopped: {what}")
    return None


def last_warning(events: list[dict[str, Any]]) -> str | None:
    """The message of the newest informative ``Warning`` event in ``events``, if any.

    The kubelet follows a detailed failure event (``Failed to pull image "x": ...``) with a
    bare echo of the waiting reason (``Error: ErrImagePull``); such echoes are skipped.
    """
    warnings = [e for e in events if e.get("type") == "Warning" and e.get("message")
                and not _REASON_ECHO.fullmatch(str(e["message"]))]  # fmt: skip
    if not warnings:
        return None
    newest = max(warnings, key=lambda e: (e.get("lastTimestamp") or e.get("eventTime") or "",
                                          int((e.get("metadata") or {}).get("resourceVersion")
                                              or 0)))  # fmt: skip
    return str(newest["message"])


_REASON_ECHO = re.compile(r"Error: [A-Z][A-Za-z]+")


def judge_start(name: str, pod: Pod | None) -> Pod | None:
    """The pod once Running+Ready, None while it is still starting (``pod`` None = gone).

    Raises :class:`PodStartError` when it will not start.
    """
    if pod is None:
        raise PodStartError(name, "PodDeleted", "the pod was deleted before it started")
    failure = pod_start_failure(pod)
    if failure is not None:
        raise PodStartError(name, *failure)
    return pod if pod_ready(pod) else None
