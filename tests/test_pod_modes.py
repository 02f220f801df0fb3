"""``kubernetes.pod.mode``: persistent pods (one per user) and session pods (one per channel).

In-process: an embedded cluster, the gateway library and asyncssh clients (the OpenSSH
client drives the same behaviour end to end in tests/test_pod_modes_e2e.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import trio
import trio_asyncio
from gatewaykit import Rig, kube_config, open_rig
from prometheus_client import generate_latest

from kuberun_trio.aio.kube import KubeClient, open_kube_client
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.podtemplate import (
    LABEL_CONNECTION_ID,
    LABEL_INSTANCE,
    LABEL_MODE,
    build_pod,
    dns1123_label_problem,
    persistent_pod_name,
)
from kuberun_trio.errors import KubernetesError, NotFoundError
from kuberun_trio.gateway import persistent
from kuberun_trio.gateway.reaper import GcOptions
from kuberun_trio.gateway.timelimits import SessionTimeLimits
from kuberun_trio.server.gc import find_orphans


async def run(conn: asyncssh.SSHClientConnection, command: str) -> tuple[str, str, int | None]:
    async def go() -> tuple[str, str, int | None]:
        r = await conn.run(command)
        return str(r.stdout), str(r.stderr), r.exit_status

    return await trio_asyncio.aio_as_trio(go)()


async def close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await trio_asyncio.aio_as_trio(conn.wait_closed)()


async def settle(check: Callable[[], Any], within: float = 15.0) -> Any:
    with trio.fail_after(within):
        while not (result := check()):
            await trio.sleep(0.05)
    return result


def names(rig: Rig) -> set[str]:
    return {str(p["metadata"]["name"]) for p in rig.pods()
            if not p["metadata"].get("deletionTimestamp")}


def the_pod(rig: Rig) -> dict[str, Any]:
    pods = rig.pods()
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


@contextlib.asynccontextmanager
async def kube_of(rig: Rig) -> AsyncIterator[KubeClient]:
    async with open_kube_client(kube_config(rig.cluster)) as kube:
        yield kube


# == names and labels ==========================================================================

@pytest.mark.parametrize("username", [
    "alice", "Alice", "Jürgen Müller", "日本語", "-_-", "a.b@c.example", "", "x" * 300,
    "root\n", "UPPER_case-99"])
def test_persistent_pod_name_is_a_stable_dns_label(username: str) -> None:
    name = persistent_pod_name(username)
    assert dns1123_label_problem(name) is None, name
    assert name == persistent_pod_name(username)
    assert name.startswith("kuberun-")


def test_persistent_pod_names_keep_users_apart() -> None:
    users = ["alice", "Alice", "ALICE", "al ice", "al-ice", "x" * 100, "x" * 101]
    assert len({persistent_pod_name(u) for u in users}) == len(users)
    assert persistent_pod_name("Jürgen").startswith("kuberun-jurgen-")


def test_persistent_manifest_belongs_to_the_user() -> None:
    gateway_pod = {"apiVersion": "v1", "kind": "Pod", "name": "gw-0", "uid": "u1"}
    operators = {"apiVersion": "example.com/v1", "kind": "Lab", "name": "lab", "uid": "u2"}
    config = parse_config({"pod": {"mode": "persistent", "metadata": {
        "annotations": {"kuberun.trio/holder": "gw_1", "kuberun.trio/lease": "ns/l"},
        "ownerReferences": [gateway_pod, operators]}}})
    body = build_pod(config, connection_id="c1", username="bob", client_address="1.2.3.4:5",
                     instance="gw", auth_metadata={}, auth_env={})
    meta = body["metadata"]
    assert meta["name"] == persistent_pod_name("bob") and "generateName" not in meta
    assert meta["labels"][LABEL_MODE] == "persistent"
    assert LABEL_CONNECTION_ID not in meta["labels"] and LABEL_INSTANCE not in meta["labels"]
    assert "kuberun.trio/holder" not in meta["annotations"]
    assert meta["ownerReferences"] == [operators], "it must outlive the gateway's pod"
    fixed = parse_config({"pod": {"mode": "persistent", "metadata": {"name": "bobs-box"}}})
    body = build_pod(fixed, connection_id="c1", username="bob", client_address="",
                     instance="gw", auth_metadata={}, auth_env={})
    assert body["metadata"]["name"] == "bobs-box"


def test_session_manifest_names_its_session() -> None:
    config = parse_config({"pod": {"mode": "session", "metadata": {"name": "box"}}})
    body = build_pod(config, connection_id="c1", username="bob", client_address="",
                     instance="gw", auth_metadata={}, auth_env={}, session_id="c1-2")
    assert body["metadata"]["name"] == "box-c1-2"
    assert body["metadata"]["labels"][LABEL_MODE] == "session"
    assert body["metadata"]["labels"][LABEL_CONNECTION_ID] == "c1"


def test_claim_keys_are_valid_annotation_keys() -> None:
    from kuberun_trio.core.podtemplate import qualified_name_problem

    for cid in ("0123456789abcdef", "Conn ID/with spaces", "x" * 200):
        assert qualified_name_problem(persistent.claim_key(cid)) is None


# == persistent mode ===========================================================================

async def test_persistent_pod_kept_and_reused(tmp_path: Path) -> None:
    async with open_rig(tmp_path, mode="persistent") as rig:
        conn = await rig.connect("bob")
        assert (await run(conn, "echo kept > /tmp/note"))[2] == 0
        pod = the_pod(rig)
        assert pod["metadata"]["name"] == persistent_pod_name("bob")
        (claim,) = persistent.claims(pod).values()
        assert rig.gateway.reaper is not None
        assert claim["holder"] == rig.gateway.reaper.holder, "the claim names this process"
        await close(conn)
        await settle(lambda: not persistent.claims(the_pod(rig)))
        pod = the_pod(rig)
        assert persistent.disconnect_time(pod) is not None
        conn = await rig.connect("bob")
        assert await run(conn, "cat /tmp/note") == ("kept\n", "", 0)
        assert the_pod(rig)["metadata"]["uid"] == pod["metadata"]["uid"]
        other = await rig.connect("carol")
        await run(other, "true")
        assert len(names(rig)) == 2, "one pod per user"
        await close(conn)
        await close(other)
        # the gateway's own sweeps (the start-up one included) leave users' pods alone,
        # even one that carries the instance label (the mode label decides)
        assert rig.gateway.reaper is not None
        async with kube_of(rig) as kube:
            await kube.patch_pod("default", persistent_pod_name("bob"), {"metadata": {
                "labels": {LABEL_INSTANCE: "test-gw", LABEL_CONNECTION_ID: "gone"}}})
            assert await find_orphans(kube, "default", "test-gw") == []  # nor does `gc`
        assert await rig.gateway.reaper.sweep_at_start() == 0
        assert await rig.gateway.reaper.sweep() == 0
        assert len(names(rig)) == 2


async def test_persistent_pod_gets_no_session_deadline(tmp_path: Path) -> None:
    """``maxSessionDuration`` ends connections; it must not put the user's pod (which
    outlives them) on a clock."""
    limits = SessionTimeLimits(max_session_duration=3600, timeout_grace_period=5)
    async with open_rig(tmp_path, options={"time_limits": limits}, mode="persistent") as rig:
        conn = await rig.connect("bob")
        assert (await run(conn, "true"))[2] == 0
        assert "activeDeadlineSeconds" not in the_pod(rig)["spec"]
        await close(conn)


class LateSight:
    """A KubeClient that does not see the pod on its first GET (another replica creates it
    between this gateway's GET and its create): the create then meets a 409."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.blind = True

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        if self.blind:
            self.blind = False
            raise NotFoundError(404, "NotFound", f'pods "{name}" not found')
        return await self.kube.get_pod(namespace, name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kube, name)


async def test_create_conflict_uses_the_existing_pod(tmp_path: Path) -> None:
    async with open_rig(tmp_path, mode="persistent") as rig, kube_of(rig) as kube:
        conn = await rig.connect("bob")
        await run(conn, "true")
        config = parse_config({"pod": {"mode": "persistent"}})
        body = build_pod(config, connection_id="late", username="bob", client_address="",
                         instance="other", auth_metadata={}, auth_env={})
        events: list[str] = []
        with trio.fail_after(10):
            pod = await persistent.claim(
                LateSight(kube), body, connection_id="late",  # type: ignore[arg-type]
                holder="other_1", lease="", create_missing=True,
                idle_timeout=60, emit=lambda _lvl, event, *a, **k: events.append(event))
        assert events == ["persistent-pod-exists", "persistent-pod-claimed"]
        assert pod["metadata"]["name"] == the_pod(rig)["metadata"]["name"]
        assert set(persistent.claims(pod)) >= {persistent.claim_key("late")}
        await close(conn)


async def test_concurrent_connections_share_one_pod(tmp_path: Path) -> None:
    async with open_rig(tmp_path, mode="persistent") as rig:
        outputs: list[tuple[str, str, int | None]] = []

        async def one() -> None:
            conn = await rig.connect("bob")
            outputs.append(await run(conn, "echo hi"))
            await close(conn)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert outputs == [("hi\n", "", 0)] * 4
        assert names(rig) == {persistent_pod_name("bob")}
        await settle(lambda: not persistent.claims(the_pod(rig)))


async def test_missing_pod_refused_when_not_created(tmp_path: Path) -> None:
    async with open_rig(tmp_path, mode="persistent", createMissingPods=False) as rig:
        conn = await rig.connect("bob")
        out, err, status = await run(conn, "echo never")
        assert (out, status) == ("", 255)
        assert f"your pod {persistent_pod_name('bob')} does not exist" in err
        assert "createMissingPods" in err
        assert rig.pods() == []
        await close(conn)


async def test_idle_pod_reaped_only_when_unused(tmp_path: Path) -> None:
    gc = {"gc": GcOptions(sweep_interval=0.3)}
    async with open_rig(tmp_path, options=gc, mode="persistent",
                        persistentIdleTimeout="1s") as rig:
        conn = await rig.connect("bob")
        await run(conn, "true")
        first = the_pod(rig)["metadata"]["uid"]
        await trio.sleep(2.0)  # several sweeps past the idle timeout: in use, so kept
        assert await run(conn, "echo alive") == ("alive\n", "", 0)
        await close(conn)
        await settle(lambda: not rig.pods(), within=15)
        assert rig.gateway.reaper is not None and rig.gateway.reaper.persistent_pods_deleted == 1
        scraped = generate_latest(rig.gateway.metrics.registry).decode()
        assert "kuberun_persistent_pods_deleted_total 1.0" in scraped
        conn = await rig.connect("bob")
        assert (await run(conn, "true"))[2] == 0
        assert the_pod(rig)["metadata"]["uid"] != first, "a new pod after the reaping"
        await close(conn)


async def test_sweep_drops_dead_replicas_claims(tmp_path: Path) -> None:
    """A claim whose gateway's Lease is gone is stale; a claim of a live Lease holder keeps
    the pod; a claim naming no Lease cannot be judged and keeps it too; a claim of this
    process for a connection it no longer has is stale."""
    gc = {"gc": GcOptions(sweep_interval=3600)}
    async with open_rig(tmp_path, options=gc, mode="persistent",
                        persistentIdleTimeout="1s") as rig, kube_of(rig) as kube:
        conn = await rig.connect("bob")
        await run(conn, "true")
        await close(conn)
        name = persistent_pod_name("bob")
        await settle(lambda: not persistent.claims(the_pod(rig)))
        await trio.sleep(1.1)
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "kuberun-live"},
                 "spec": {"holderIdentity": "live_1", "leaseDurationSeconds": 60,
                          "renewTime": "2099-01-01T00:00:00.000000Z"}}
        await kube.create_lease("default", lease)
        reaper = rig.gateway.reaper
        assert reaper is not None

        async def claim_as(holder: str, lease_ref: str) -> None:
            value = f'{{"holder":"{holder}","lease":"{lease_ref}"}}'
            await kube.patch_pod("default", name, {"metadata": {"annotations": {
                "kuberun.trio/in-use.c9": value}}})

        await claim_as("live_1", "default/kuberun-live")
        assert await reaper.sweep_persistent() == 0
        await claim_as("nobody_1", "")
        assert await reaper.sweep_persistent() == 0
        await claim_as("dead_1", "default/kuberun-dead")
        assert await reaper.sweep_persistent() == 1
        await settle(lambda: not rig.pods())
        # this very process, for a connection it no longer has (a release that failed)
        conn = await rig.connect("bob")
        await run(conn, "true")
        await close(conn)
        await settle(lambda: not persistent.claims(the_pod(rig)))
        await trio.sleep(1.1)
        await claim_as(reaper.holder, "")
        assert await reaper.sweep_persistent() == 1


async def test_sweep_delete_loses_to_a_newer_claim(tmp_path: Path) -> None:
    """The sweep deletes at the version it judged: a claim made since turns it into 409."""
    async with open_rig(tmp_path, mode="persistent") as rig, kube_of(rig) as kube:
        conn = await rig.connect("bob")
        await run(conn, "true")
        await close(conn)
        name = persistent_pod_name("bob")
        judged = the_pod(rig)["metadata"]["resourceVersion"]
        await kube.patch_pod("default", name, {"metadata": {"annotations": {
            persistent.claim_key("newcomer"): "{}"}}})
        with pytest.raises(KubernetesError) as caught:
            await kube.delete_pod("default", name, resource_version=judged)
        assert caught.value.status == 409
        assert names(rig) == {name}


async def test_connection_waits_for_a_deletion_then_gets_a_new_pod(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kuberun_trio")
    stubborn = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]
    async with open_rig(tmp_path, mode="persistent", idleCommand=stubborn) as rig, \
            kube_of(rig) as kube:
        conn = await rig.connect("bob")
        await run(conn, "true")
        await close(conn)
        old = the_pod(rig)["metadata"]["uid"]
        await kube.delete_pod("default", persistent_pod_name("bob"), grace_period_seconds=2)
        assert the_pod(rig)["metadata"].get("deletionTimestamp")
        conn = await rig.connect("bob")
        assert (await run(conn, "true"))[2] == 0
        assert the_pod(rig)["metadata"]["uid"] != old
        await close(conn)
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "persistent-pod-terminating" in events


# == session mode ==============================================================================

async def test_session_mode_one_pod_per_channel(tmp_path: Path) -> None:
    async with open_rig(tmp_path, mode="session") as rig:
        conn = await rig.connect()

        async def start(command: str) -> asyncssh.SSHClientProcess[Any]:
            async def go() -> asyncssh.SSHClientProcess[Any]:
                return await conn.create_process(command)
            return await trio_asyncio.aio_as_trio(go)()

        first = await start("cat")
        second = await start("cat")
        pods = await settle(lambda: len(names(rig)) == 2 and names(rig))
        assert len(rig.gateway.connections) == 1

        async def finish(proc: asyncssh.SSHClientProcess[Any]) -> None:
            async def go() -> None:
                proc.stdin.write_eof()
                await proc.wait()
            await trio_asyncio.aio_as_trio(go)()

        await finish(first)
        left = await settle(lambda: len(names(rig)) == 1 and names(rig))
        (gone,) = pods - left

        def deleted() -> bool:  # logged once the DELETE's answer is out
            return any(e.method == "DELETE" for e in rig.cluster.request_log.for_pod(
                "default", gone))

        await settle(deleted)
        entries = rig.cluster.request_log.for_pod("default", gone)
        closes = [e for e in entries if e.kind == "exec-close"]
        deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
        assert len(closes) == 1 and len(deletes) == 1
        assert closes[0].time < deletes[0].received, "the exec closed before its DELETE"
        assert await run(conn, "echo third") == ("third\n", "", 0)
        await finish(second)
        await settle(lambda: not rig.pods())
        await close(conn)


async def test_session_mode_signal_and_pod_loss_stay_in_their_channel(tmp_path: Path) -> None:
    """A signal reaches the process in its channel's pod; a channel whose pod is lost ends
    with the reason and 255, while the connection and its other channels go on."""
    async with open_rig(tmp_path, mode="session") as rig, kube_of(rig) as kube:
        conn = await rig.connect()

        async def signalled() -> tuple[bytes, Any]:
            process = await conn.create_process("echo ready; exec sleep 30", encoding=None)
            line = await process.stdout.readline()
            process.send_signal("TERM")
            await process.wait()
            return line, process.exit_signal

        with trio.fail_after(20):
            line, exit_signal = await trio_asyncio.aio_as_trio(signalled)()
        assert line == b"ready\n" and exit_signal is not None and exit_signal[0] == "TERM"
        await settle(lambda: not rig.pods())

        async def start() -> tuple[asyncssh.SSHClientProcess[Any], str]:
            process = await conn.create_process("echo $HOSTNAME; exec sleep 30")
            return process, str(await process.stdout.readline()).strip()

        victim, pod = await trio_asyncio.aio_as_trio(start)()
        bystander, other = await trio_asyncio.aio_as_trio(start)()
        assert names(rig) == {pod, other}
        await kube.delete_pod("default", pod, grace_period_seconds=0)

        async def ended(process: asyncssh.SSHClientProcess[Any]) -> tuple[str, int | None]:
            _out, err = await process.communicate()
            return str(err), process.exit_status

        with trio.fail_after(20):
            err, status = await trio_asyncio.aio_as_trio(ended)(victim)
        assert status == 255 and f"the pod {pod} is gone" in err, err
        assert await run(conn, "echo still") == ("still\n", "", 0)
        bystander.stdin.write_eof()
        bystander.terminate()
        await close(conn)
        await settle(lambda: not rig.pods())


async def test_session_mode_disconnect_ends_every_channel_in_order(tmp_path: Path) -> None:
    """The client leaves with two channels open: each exec stream is closed before the
    DELETE of its own pod."""
    async with open_rig(tmp_path, mode="session") as rig:
        conn = await rig.connect()

        async def start() -> str:
            process = await conn.create_process("echo $HOSTNAME; exec sleep 30")
            return str(await process.stdout.readline()).strip()

        pods = {await trio_asyncio.aio_as_trio(start)() for _ in range(2)}
        assert names(rig) == pods and len(pods) == 2
        conn.close()

        def all_deleted() -> bool:
            return all(any(e.method == "DELETE" for e in rig.cluster.request_log.for_pod(
                "default", pod)) for pod in pods)

        await settle(all_deleted)
        for pod in pods:
            entries = rig.cluster.request_log.for_pod("default", pod)
            closes = [e for e in entries if e.kind == "exec-close"]
            deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
            assert len(closes) == 1 and len(deletes) == 1
            assert closes[0].time < deletes[0].received, pod
        await settle(lambda: not rig.pods() and not rig.gateway.connections)
