"""The kubelet against the real store, with real processes."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from kubernetes_asyncio.client import ApiClient, Configuration
from support import require_namespaces

from kuberun_trio.cluster import status
from kuberun_trio.cluster.faults import Faults
from kuberun_trio.cluster.kubelet import (
    ContainerNotRunning,
    Kubelet,
    LogBuffer,
    expand,
    go_duration,
    normalize_image,
)
from kuberun_trio.cluster.store import Store

NS = "default"
Obj = dict[str, Any]


class Node:
    """A store, faults and a running kubelet."""

    def __init__(self, store: Store, faults: Faults, kubelet: Kubelet) -> None:
        self.store, self.faults, self.kubelet = store, faults, kubelet

    def create(self, name: str, *containers: Obj, **spec: Any) -> Obj:
        return self.store.create_pod(
            NS, {"metadata": {"name": name}, "spec": {"containers": list(containers), **spec}}
        )

    def pod(self, name: str) -> Obj:
        return self.store.get_pod(NS, name)

    def gone(self, name: str) -> bool:
        try:
            self.store.get_pod(NS, name)
        except status.ApiStatusError as exc:
            return exc.code == 404
        return False

    async def until(self, name: str, check: Callable[[Obj], bool]) -> Obj:
        """Wait (via the store's change feed) until pod ``name`` satisfies ``check``."""
        changes = self.store.subscribe()
        with trio.fail_after(10):
            async with changes:
                pod = self.pod(name)
                while not check(pod):
                    _, changed = await changes.receive()
                    if changed["metadata"]["name"] == name:
                        pod = changed
        return pod

    async def until_gone(self, name: str) -> None:
        changes = self.store.subscribe()
        with trio.fail_after(10):
            async with changes:
                while not self.gone(name):
                    await changes.receive()

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.store.list_events(NS)["items"]
        return [
            (e["type"], e["reason"], e["message"])
            for e in items
            if e["involvedObject"]["name"] == name
        ]


def container(name: str = "c", *command: str, **extra: Any) -> Obj:
    return {"name": name, "image": "busybox:1.36", "command": list(command), **extra}


def cstatus(pod: Obj, index: int = 0) -> Obj:
    statuses: list[Obj] = pod.get("status", {}).get("containerStatuses") or [{}]
    return statuses[index]


def state(pod: Obj) -> Obj:
    st: Obj = cstatus(pod).get("state") or {}
    return st


def running(pod: Obj) -> bool:
    return pod.get("status", {}).get("phase") == "Running" and "running" in state(pod)


@pytest.fixture(params=[None, False], ids=["auto", "no-namespaces"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    store, faults = Store(), Faults()
    kubelet = Kubelet(
        store, faults, node_name="node-1", backoff_base=0.1, use_namespaces=request.param
    )
    faults.bind(expire=store.expire_history, evict=kubelet.evict, kill=kubelet.kill)
    async with trio.open_nursery() as nursery:
        await nursery.start(kubelet.run)
        yield Node(store, faults, kubelet)
        with trio.fail_after(10):
            await kubelet.shutdown()
        nursery.cancel_scope.cancel()


async def log_until(node: Node, pod: str, marker: bytes) -> bytes:
    """Follow the container's log until ``marker`` appears."""
    out = b""
    with trio.fail_after(10):
        async for chunk in await node.kubelet.logs(NS, pod, "c", follow=True):
            out += chunk
            if marker in out:
                break
    return out


def as_model(pod: Obj) -> Any:
    """Deserialize like kubernetes-asyncio does: it raises on missing required fields."""
    api = ApiClient.__new__(ApiClient)
    api.configuration = Configuration()
    return api._ApiClient__deserialize(pod, "V1Pod")  # type: ignore[attr-defined]


async def exec_output(node: Node, pod: str, argv: list[str]) -> tuple[int, bytes]:
    target = node.kubelet.running_container(NS, pod, "c")
    proc = await target.sandbox.exec(
        argv,
        env=target.env,
        cwd=target.working_dir,
        tty=False,
        stdin=False,
        stdout=True,
        stderr=False,
    )
    out = b""
    assert proc.stdout is not None
    while data := await proc.stdout.receive_some():
        out += data
    code = await proc.wait()
    await proc.aclose()
    return code, out


async def test_pod_runs_with_full_status(node: Node) -> None:
    created = node.create(
        "sleeper",
        container("c", "sleep", "1000", env=[{"name": "GREETING", "value": "hi"}]),
    )
    assert "nodeName" not in created["spec"]
    pod = await node.until("sleeper", running)
    st = pod["status"]
    assert pod["spec"]["nodeName"] == "node-1"
    assert st["hostIP"] == st["podIP"] == "127.0.0.1"
    assert st["podIPs"] == [{"ip": "127.0.0.1"}] and st["startTime"].endswith("Z")
    conditions = {c["type"]: c for c in st["conditions"]}
    assert list(conditions) == [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    assert all(c["status"] == "True" and c["lastTransitionTime"] for c in conditions.values())
    cs = cstatus(pod)
    assert cs["ready"] is True and cs["started"] is True and cs["restartCount"] == 0
    assert cs["image"] == "docker.io/library/busybox:1.36"
    assert cs["imageID"].startswith("docker.io/library/busybox@sha256:")
    assert cs["containerID"].startswith("containerd://") and len(cs["containerID"]) == 77
    assert cs["lastState"] == {} and "startedAt" in cs["state"]["running"]
    assert st["qosClass"] == "BestEffort"  # the store's field survives status writes
    model = as_model(pod)
    assert model.status.container_statuses[0].ready is True
    reasons = [r for _, r, _ in node.events("sleeper")]
    assert reasons[:1] == ["Scheduled"] and reasons[-2:] == ["Created", "Started"]
    assert ("Normal", "Scheduled", "Successfully assigned default/sleeper to node-1") in (
        node.events("sleeper")
    )

    code, out = await exec_output(node, "sleeper", ["sh", "-c", 'echo "$HOSTNAME $GREETING"'])
    assert (code, out) == (0, b"sleeper hi\n")
    target = node.kubelet.running_container(NS, "sleeper", "c")
    assert target.sandbox.pod.namespaces is (node.kubelet.use_namespaces is not False)


async def test_first_sync_status_is_a_valid_model(node: Node) -> None:
    node.faults.delay_start(0.5)
    node.create("slow", container("c", "sleep", "1000"))
    pod = await node.until("slow", lambda p: bool(p.get("status", {}).get("containerStatuses")))
    cs = cstatus(pod)
    assert cs["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert (cs["image"], cs["imageID"], cs["ready"], cs["started"]) == (
        "busybox:1.36",
        "",
        False,
        False,
    )
    assert pod["status"]["phase"] == "Pending"
    ready = {c["type"]: c for c in pod["status"]["conditions"]}["Ready"]
    assert ready["reason"] == "ContainersNotReady"
    assert ready["message"] == "containers with unready status: [c]"
    as_model(pod)
    await node.until("slow", running)


async def test_env_expansion_and_downward_api(node: Node) -> None:
    env = [
        {"name": "A", "value": "one"},
        {"name": "B", "value": "$(A)-two-$$(A)-$(MISSING)"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    node.create(
        "envy",
        container("c", "sh", "-c", "echo '$(B)' $POD; sleep 1000", env=env, workingDir="/tmp"),
    )
    await node.until("envy", running)
    code, out = await exec_output(node, "envy", ["sh", "-c", 'echo "$B|$POD|$(pwd)"'])
    assert code == 0
    assert out == b"one-two-$(A)-$(MISSING)|envy|/tmp\n"
    assert await log_until(node, "envy", b"\n") == b"one-two-$(A)-$(MISSING) envy\n"


async def test_terminal_phases(node: Node) -> None:
    node.create("ok", container("c", "true"), restartPolicy="Never")
    node.create("bad", container("c", "sh", "-c", "exit 3"), restartPolicy="Never")
    node.create("onfail", container("c", "true"), restartPolicy="OnFailure")
    ok = await node.until("ok", lambda p: p["status"].get("phase") == "Succeeded")
    bad = await node.until("bad", lambda p: p["status"].get("phase") == "Failed")
    # then the sandbox goes: PodReadyToStartContainers turns False
    bad = await node.until("bad", lambda p: p["status"]["conditions"][0]["status"] == "False")
    await node.until("onfail", lambda p: p["status"].get("phase") == "Succeeded")
    assert state(ok)["terminated"]["reason"] == "Completed"
    term = state(bad)["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert term["containerID"] == cstatus(bad)["containerID"]
    ready = {c["type"]: c for c in bad["status"]["conditions"]}
    assert ready["Ready"]["reason"] == "PodFailed"
    assert ready["PodReadyToStartContainers"]["status"] == "False"
    as_model(bad)
    with pytest.raises(ContainerNotRunning) as info:
        node.kubelet.running_container(NS, "bad", "c")
    assert isinstance(info.value, LookupError) and info.value.container == "c"


async def test_crash_loop_back_off(node: Node) -> None:
    node.create("crashy", container("c", "sh", "-c", "echo boom; exit 3"))
    pod = await node.until(
        "crashy",
        lambda p: (
            cstatus(p).get("restartCount", 0) >= 3
            and state(p).get("waiting", {}).get("reason") == "CrashLoopBackOff"
        ),
    )
    cs = cstatus(pod)
    uid = pod["metadata"]["uid"]
    message = cs["state"]["waiting"]["message"]
    assert message.startswith("back-off ") and message.endswith(
        f"restarting failed container=c pod=crashy_default({uid})"
    )
    last = cs["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (3, "Error")
    assert last["containerID"] == cs["containerID"]
    assert pod["status"]["phase"] == "Running" and cs["ready"] is False
    assert (
        "Warning",
        "BackOff",
        f"Back-off restarting failed container c in pod crashy_default({uid})",
    ) in node.events("crashy")
    as_model(pod)
    logs = await node.kubelet.logs(NS, "crashy", "c")  # the last terminated instance
    assert b"".join([chunk async for chunk in logs]) == b"boom\n"
    with pytest.raises(ContainerNotRunning):
        node.kubelet.running_container(NS, "crashy", "c")


async def test_start_error_and_create_error(node: Node) -> None:
    node.create("nobin", container("c", "/no/such/binary"))
    node.create("nocmd", {"name": "c", "image": "busybox:1.36"})
    pod = await node.until(
        "nobin",
        lambda p: state(p).get("waiting", {}).get("reason") == "CrashLoopBackOff",
    )
    last = cstatus(pod)["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (128, "StartError")
    assert "stat /no/such/binary: no such file or directory" in last["message"]
    pod = await node.until(
        "nocmd",
        lambda p: state(p).get("waiting", {}).get("reason") == "CreateContainerError",
    )
    assert "no command specified" in state(pod)["waiting"]["message"]
    assert pod["status"]["phase"] == "Pending" and cstatus(pod)["restartCount"] == 0
    as_model(pod)


async def test_image_pull_failure_alternates(node: Node) -> None:
    node.faults.fail_image("registry.example/nope:*")
    node.create("puller", {"name": "c", "image": "registry.example/nope:1", "command": ["true"]})
    seen: list[str] = []

    def reasons(p: Obj) -> bool:
        reason = state(p).get("waiting", {}).get("reason")
        if reason and (not seen or seen[-1] != reason):
            seen.append(reason)
        return seen.count("ErrImagePull") >= 2

    pod = await node.until("puller", reasons)
    assert seen[:4] == ["ContainerCreating", "ErrImagePull", "ImagePullBackOff", "ErrImagePull"]
    assert pod["status"]["phase"] == "Pending"
    events = node.events("puller")
    assert ("Normal", "Pulling", 'Pulling image "registry.example/nope:1"') in events
    assert ("Normal", "BackOff", 'Back-off pulling image "registry.example/nope:1"') in events
    assert ("Warning", "Failed", "Error: ErrImagePull") in events
    assert ("Warning", "Failed", "Error: ImagePullBackOff") in events
    with pytest.raises(status.ApiStatusError) as info:
        await node.kubelet.logs(NS, "puller", "c")
    assert info.value.code == 400


async def test_graceful_delete_waits_for_grace_then_kills(node: Node) -> None:
    node.create(
        "stubborn",
        container("c", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"),
        terminationGracePeriodSeconds=1,
    )
    await node.until("stubborn", running)
    await log_until(node, "stubborn", b"ready")  # the trap is set
    box = node.kubelet.running_container(NS, "stubborn", "c").sandbox.pod
    assert box.remaining_pids()
    began = trio.current_time()
    node.store.delete_pod(NS, "stubborn")
    modified = node.pod("stubborn")
    assert modified["metadata"]["deletionGracePeriodSeconds"] == 1
    await node.until_gone("stubborn")
    assert 0.9 <= trio.current_time() - began < 5
    assert box.destroyed and box.remaining_pids() == []
    assert ("Normal", "Killing", "Stopping container c") in node.events("stubborn")


async def test_graceful_delete_final_status(node: Node) -> None:
    node.create("polite", container("c", "sleep", "1000"))
    await node.until("polite", running)
    finals: list[Obj] = []
    changes = node.store.subscribe()
    node.store.delete_pod(NS, "polite", grace_period_seconds=30)
    with trio.fail_after(10):
        async with changes:
            async for kind, pod in changes:
                finals.append(pod)
                if kind == "DELETED":
                    break
    last = finals[-1]
    term = state(last)["terminated"]
    assert term["exitCode"] == 128 + signal.SIGTERM and term["reason"] == "Error"
    assert last["status"]["phase"] == "Failed"
    as_model(last)


async def test_immediate_delete_destroys_sandbox(node: Node) -> None:
    node.create("quick", container("c", "sh", "-c", "sleep 1000 & sleep 1000"))
    await node.until("quick", running)
    box = node.kubelet.running_container(NS, "quick", "c").sandbox.pod
    node.store.delete_pod(NS, "quick", grace_period_seconds=0)
    assert node.gone("quick")
    with trio.fail_after(5):
        await box._destroy_done.wait()
    assert box.remaining_pids() == []


async def test_kill_fault_restarts_and_ends_execs(node: Node) -> None:
    node.create("victim", container("c", "sleep", "1000"))
    await node.until("victim", running)
    target = node.kubelet.running_container(NS, "victim", "c")
    proc = await target.sandbox.exec(
        ["sleep", "1000"],
        env=target.env,
        cwd=None,
        tty=False,
        stdin=False,
        stdout=False,
        stderr=False,
    )
    await node.faults.kill(NS, "victim")
    assert await proc.wait() == 137  # execs end with their container
    await proc.aclose()
    pod = await node.until("victim", lambda p: running(p) and cstatus(p)["restartCount"] == 1)
    last = cstatus(pod)["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (137, "Error")


async def test_evict(node: Node) -> None:
    node.create("evictee", container("c", "sleep", "1000"))
    await node.until("evictee", running)
    box = node.kubelet.running_container(NS, "evictee", "c").sandbox.pod
    await node.faults.evict(NS, "evictee")
    pod = node.pod("evictee")
    st = pod["status"]
    assert (st["phase"], st["reason"]) == ("Failed", "Evicted")
    assert st["message"] == "The node was low on resource: memory. "
    assert state(pod)["terminated"]["exitCode"] == 137
    disruption = {c["type"]: c for c in st["conditions"]}["DisruptionTarget"]
    assert disruption["reason"] == "TerminationByKubelet"
    assert box.remaining_pids() == []
    as_model(pod)
    node.store.delete_pod(NS, "evictee")  # terminal: grace forced to 0
    assert node.gone("evictee")


async def test_logs_follow_ends_with_the_container(node: Node) -> None:
    node.create(
        "talker",
        container("c", "sh", "-c", "echo one; sleep 0.3; echo two >&2; exit 0"),
        restartPolicy="Never",
    )
    await node.until("talker", lambda p: "running" in state(p) or "terminated" in state(p))
    chunks = []
    with trio.fail_after(5):
        async for chunk in await node.kubelet.logs(NS, "talker", "c", follow=True):
            chunks.append(chunk)
    assert b"".join(chunks) == b"one\ntwo\n"


async def test_attach_stdin_once(node: Node) -> None:
    node.create("cat", container("c", "cat", stdin=True, stdinOnce=True), restartPolicy="Never")
    await node.until("cat", running)
    attachment = await node.kubelet.running_container(NS, "cat", "c").attach()  # type: ignore[attr-defined]
    assert attachment.stdin is not None
    await attachment.stdin.send_all(b"ping\n")
    assert await attachment.output.receive() == (1, b"ping\n")
    await attachment.aclose()  # stdinOnce: EOF to cat, which exits 0
    await node.until("cat", lambda p: p["status"].get("phase") == "Succeeded")


async def test_shutdown_kills_all(node: Node) -> None:
    node.create("a", container("c", "sleep", "1000"))
    node.create("b", container("c", "sleep", "1000"))
    await node.until("a", running)
    await node.until("b", running)
    boxes = [node.kubelet.running_container(NS, p, "c").sandbox.pod for p in ("a", "b")]
    await node.kubelet.shutdown()
    assert all(b.destroyed and b.remaining_pids() == [] for b in boxes)


async def test_namespaced_hostname() -> None:
    await require_namespaces()
    store, faults = Store(), Faults()
    kubelet = Kubelet(store, faults, node_name="n", backoff_base=0.1, use_namespaces=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(kubelet.run)
        node = Node(store, faults, kubelet)
        node.create("named", container("c", "sleep", "1000"))
        await node.until("named", running)
        assert await exec_output(node, "named", ["hostname"]) == (0, b"named\n")
        await kubelet.shutdown()
        nursery.cancel_scope.cancel()


def test_helpers() -> None:
    assert [go_duration(s) for s in (10, 20, 80, 300, 0.2, 3725)] == [
        "10s",
        "20s",
        "1m20s",
        "5m0s",
        "200ms",
        "1h2m5s",
    ]
    assert expand("$(A)$$(A)$(B)$", {"A": "x"}) == "x$(A)$(B)$"
    assert normalize_image("busybox") == (
        "docker.io/library/busybox:latest",
        "docker.io/library/busybox",
    )
    assert normalize_image("quay.io/a/b:1") == ("quay.io/a/b:1", "quay.io/a/b")
    assert normalize_image("localhost:5000/x") == ("localhost:5000/x:latest", "localhost:5000/x")


async def test_log_buffer_bounded_and_followed() -> None:
    buffer = LogBuffer(limit=10)
    for piece in (b"aaaa", b"bbbb", b"cccc"):
        buffer.append(piece)
    assert b"".join([c async for c in buffer.read(follow=False)]) == b"bbbbcccc"
    got: list[bytes] = []

    async def follow() -> None:
        async for chunk in buffer.read(follow=True):
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        buffer.append(b"dd")
        await trio.testing.wait_all_tasks_blocked()
        buffer.close()
    assert b"".join(got) == b"bbbbccccdd"
