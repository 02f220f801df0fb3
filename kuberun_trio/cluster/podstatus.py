"""Pod status as the kubelet derives it: phase, conditions, the status object.

Theory of operation
-------------------
The pod worker keeps its containers' states in memory and, on every change,
asks :func:`pod_status` for the whole ``status`` it would write. The phase is
the kubelet's ``getPhase`` (:func:`pod_phase`): Pending while any container
waits for its first start, Running while any runs, else decided by the
restart policy and the exit codes. Conditions follow ``status/generate.go``:
``PodReadyToStartContainers`` (the sandbox is up), ``Initialized`` (no init
containers here), ``Ready``/``ContainersReady`` (every container running;
``PodCompleted``/``PodFailed`` once terminal), ``PodScheduled``, and
``DisruptionTarget`` for an eviction. :class:`Conditions` keeps each
condition's ``lastTransitionTime`` until its status actually flips.
The kubelet owns only the :data:`MANAGED` status keys; :func:`merged` keeps
anything else a writer put there.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Protocol

Obj = dict[str, Any]

CONDITION_ORDER = (
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
    "DisruptionTarget",
)
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
"""The kubelet's status message (and event) for ``activeDeadlineSeconds``."""
EVICTED_MESSAGE = "The node was low on resource: memory. "
MANAGED = frozenset(
    (
        "phase",
        "conditions",
        "message",
        "reason",
        "hostIP",
        "hostIPs",
        "podIP",
        "podIPs",
        "startTime",
        "containerStatuses",
    )
)
"""The status keys the kubelet writes (others are kept as they are)."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerView(Protocol):
    """What the status needs of a container."""

    name: str
    state: Obj
    last_state: Obj

    def status(self) -> Obj: ...


def pod_phase(containers: Sequence[ContainerView], restart_policy: str, terminal: bool) -> str:
    """The kubelet's ``getPhase`` (``terminal``: the pod's containers are all done)."""
    running = waiting = stopped = succeeded = 0
    for c in containers:
        if "running" in c.state:
            running += 1
        elif "terminated" in c.state:
            stopped += 1
            succeeded += c.state["terminated"]["exitCode"] == 0
        elif "terminated" in c.last_state:
            stopped += 1
        else:
            waiting += 1
    if terminal:
        return "Succeeded" if stopped == succeeded == len(containers) else "Failed"
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    return "Failed" if restart_policy == "Never" else "Running"


class Conditions:
    """A pod's conditions; a condition keeps its transition time until its status flips."""

    def __init__(self) -> None:
        self._by_type: dict[str, Obj] = {}

    def set(self, type_: str, ok: bool, reason: str = "", message: str = "") -> None:
        value = "True" if ok else "False"
        old = self._by_type.get(type_)
        cond: Obj = {"type": type_, "status": value, "lastProbeTime": None}
        same = old is not None and old["status"] == value
        cond["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now_rfc3339()
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self._by_type[type_] = cond

    def ordered(self) -> list[Obj]:
        """The conditions set so far, in the kubelet's order."""
        return [self._by_type[t] for t in CONDITION_ORDER if t in self._by_type]


def pod_status(
    *,
    phase: str,
    containers: Sequence[ContainerView],
    conditions: Conditions,
    sandbox_up: bool,
    has_sandbox: bool,
    evicted: bool,
    host_ip: str,
    start_time: str | None,
    failure: tuple[str, str] | None = None,
) -> Obj:
    """The status object for ``phase``; updates ``conditions`` on the way."""
    conditions.set("PodReadyToStartContainers", sandbox_up)
    conditions.set("Initialized", True)
    unready = [c.name for c in containers if "running" not in c.state]
    for type_ in ("Ready", "ContainersReady"):
        if phase in ("Succeeded", "Failed"):
            conditions.set(type_, False, "PodCompleted" if phase == "Succeeded" else "PodFailed")
        elif unready:
            message = f"containers with unready status: [{' '.join(unready)}]"
            conditions.set(type_, False, "ContainersNotReady", message)
        else:
            conditions.set(type_, True)
    if evicted:
        conditions.set("DisruptionTarget", True, "TerminationByKubelet", EVICTED_MESSAGE)
    st: Obj = {"phase": phase}
    st["conditions"] = conditions.ordered()
    if evicted:
        st.update(message=EVICTED_MESSAGE, reason="Evicted")
    elif failure is not None:
        st.update(reason=failure[0], message=failure[1])
    st.update(hostIP=host_ip, hostIPs=[{"ip": host_ip}])
    if has_sandbox:
        st.update(podIP=host_ip, podIPs=[{"ip": host_ip}])
    st["startTime"] = start_time
    st["containerStatuses"] = [c.status() for c in containers]
    return st


def merged(old: Obj, status: Obj) -> Obj:
    """``status`` over ``old``, keeping the keys the kubelet does not manage."""
    return {**{k: v for k, v in old.items() if k not in MANAGED}, **status}
