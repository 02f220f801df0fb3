"""The soak's excuse rule: a failure is excused only by a fault that hit its own target.

Drives :meth:`Soak.own_fault_hits` with a scripted fault record and gateway log
(no cluster, no clients): a fault on another scenario's pod, or outside the
scenario's time, or on the shared watch after its connection ended, or on a
create after its pod existed, excuses nothing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from benchmarks.soak import ConnectionTrace, GatewayLog, Soak
from kuberun_trio.cluster.faults import FaultHit

T0 = 1000.0


def soak_with(hits: list[FaultHit], traces: dict[str, list[ConnectionTrace]]) -> Soak:
    soak: Any = Soak.__new__(Soak)
    soak.t0 = T0
    soak.cluster = SimpleNamespace(faults=SimpleNamespace(hits=hits))
    log = GatewayLog()
    for user, user_traces in traces.items():
        for i, trace in enumerate(user_traces):
            cid = f"{user}-{i}"
            log.connections[cid] = trace
            log.by_user.setdefault(user, []).append(cid)
    soak.log = log
    result: Soak = soak
    return result


def hit(kind: str, at: float, target: str, pod: str | None = None) -> FaultHit:
    return FaultHit(kind, T0 + at, target, pod)


MINE = ConnectionTrace("soak-1", T0 + 1, pod="pod-a", pod_created=T0 + 2, ended=T0 + 8)
OTHER = ConnectionTrace("soak-2", T0 + 1, pod="pod-b", pod_created=T0 + 2, ended=T0 + 8)


def kinds(soak: Soak, start: float = 0.5, end: float = 9.0) -> list[str]:
    return [h["kind"] for h in soak.own_fault_hits("soak-1", start, end)]


def test_a_fault_on_its_own_pod_during_the_scenario_excuses() -> None:
    soak = soak_with([hit("evict", 5, "pod default/pod-a", "pod-a"),
                      hit("exec-cut", 6, "exec stream of pod pod-a", "pod-a"),
                      hit("api-500", 7, "GET /api/v1/namespaces/default/pods/pod-a", "pod-a")],
                     {"soak-1": [MINE]})
    assert kinds(soak) == ["evict", "exec-cut", "api-500"]


def test_a_fault_on_another_pod_or_outside_the_scenario_does_not() -> None:
    soak = soak_with([hit("evict", 5, "pod default/pod-b", "pod-b"),
                      hit("exec-cut", 12, "exec stream of pod pod-a", "pod-a"),
                      hit("evict", 0.1, "pod default/pod-a", "pod-a")],
                     {"soak-1": [MINE], "soak-2": [OTHER]})
    assert kinds(soak) == []


def test_the_shared_watch_counts_only_while_its_connection_lives() -> None:
    during = hit("watch-drop", 5, "every open watch")
    after = hit("watch-drop", 8.5, "every open watch")  # its connection already ended
    list_fail = hit("api-500", 6, "GET /api/v1/namespaces/default/pods?watch=True")
    soak = soak_with([during, after, list_fail], {"soak-1": [MINE]})
    assert kinds(soak) == ["watch-drop", "api-500"]
    assert [h["t"] for h in soak.own_fault_hits("soak-1", 0.5, 9.0)] == [5, 6]


def test_a_failed_create_counts_only_before_its_pod_existed() -> None:
    before = hit("api-429", 1.5, "POST /api/v1/namespaces/default/pods")
    later = hit("api-429", 4, "POST /api/v1/namespaces/default/pods")  # someone else's create
    soak = soak_with([before, later], {"soak-1": [MINE]})
    assert [h["t"] for h in soak.own_fault_hits("soak-1", 0.5, 9.0)] == [1.5]
    never = ConnectionTrace("soak-1", T0 + 1, ended=T0 + 6)  # no pod at all: both count
    assert len(soak_with([before, later], {"soak-1": [never]}).own_fault_hits(
        "soak-1", 0.5, 9.0)) == 2


def test_no_connection_no_excuse_and_own_pod_hits_come_first() -> None:
    shared = hit("watch-drop", 3, "every open watch")
    own = hit("exec-cut", 6, "exec stream of pod pod-a", "pod-a")
    assert soak_with([shared, own], {}).own_fault_hits("soak-1", 0.5, 9.0) == ()
    assert kinds(soak_with([shared, own], {"soak-1": [MINE]})) == ["exec-cut", "watch-drop"]
