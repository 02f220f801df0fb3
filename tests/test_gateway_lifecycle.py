"""The connection lifecycle end to end: asyncssh client → gateway → embedded cluster.

Each test reads the cluster's request log for ordering (every exec stream of a pod
closed before the pod's DELETE arrived) and counts what could leak (trio and asyncio
tasks, file descriptors, child processes, pods) before and after.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import pytest
import trio
import trio_asyncio
from lifecyclekit import Snapshot, StallProxy, Track, settle, snapshot

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.podtemplate import (
    ANNOTATION_CLIENT_ADDRESS,
    ANNOTATION_USERNAME,
    LABEL_CONNECTION_ID,
    LABEL_USERNAME,
    label_value_problem,
)
from kuberun_trio.gateway.serve import Gateway, GatewayOptions, serve_gateway


@attrs.define
class Rig:
    cluster: EmbeddedCluster
    gateway: Gateway
    client_key: asyncssh.SSHKey
    scope: trio.CancelScope
    """Cancels serve_gateway (the server-shutdown case)."""
    served: trio.Event
    """Set once serve_gateway has returned."""
    proxy: StallProxy | None = None
    execs: Track | None = None
    """Every exec connection through the proxy."""

    async def connect(self, username: str = "alice") -> asyncssh.SSHClientConnection:
        conn: asyncssh.SSHClientConnection = await aio(
            asyncssh.connect, "127.0.0.1", self.gateway.address[1], username=username,
            client_keys=[self.client_key], known_hosts=None)
        return conn

    def log(self, pod: str) -> list[Any]:
        return self.cluster.request_log.for_pod("default", pod)


async def aio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio_asyncio.aio_as_trio(functools.partial(fn, *args, **kwargs))()


@contextlib.asynccontextmanager
async def open_rig(tmp_path: Path, *, proxy: bool = False, timeouts: dict[str, str] | None = None,
                   **pod: Any) -> AsyncIterator[Rig]:
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with open_aio_loop(), open_embedded_cluster(
            https=not proxy, kubeconfig_path=tmp_path / "kubeconfig",
            backoff_base=0.2) as cluster, trio.open_nursery() as nursery:
        stall = execs = None
        connection: dict[str, Any] = {"kubeconfig": str(cluster.kubeconfig_path)}
        if proxy:
            stall = StallProxy(("127.0.0.1", int(cluster.url.rsplit(":", 1)[1])))
            execs = stall.track(b"/exec?")
            connection = {"host": f"http://127.0.0.1:{await nursery.start(stall.serve)}"}
        data: dict[str, Any] = {"connection": connection,
                                "timeouts": {"podStart": "20s", "podStop": "10s",
                                             **(timeouts or {})}}
        if pod:
            data["pod"] = pod
        options = GatewayOptions(
            kubernetes=parse_config(data),
            authenticator=PublicKeyAuthenticator(
                [client_key.export_public_key("openssh").decode()]),
            host_keys=(host_key.export_private_key("openssh"),), port=0, instance="test-gw")
        scope, served = trio.CancelScope(), trio.Event()

        async def serve(task_status: trio.TaskStatus[Gateway]) -> None:
            try:
                with scope:
                    await serve_gateway(options, task_status=task_status)
            finally:
                served.set()

        gateway = await nursery.start(serve)
        try:
            yield Rig(cluster, gateway, client_key, scope, served, stall, execs)
        finally:
            scope.cancel()
            await served.wait()
            nursery.cancel_scope.cancel()


async def start(conn: asyncssh.SSHClientConnection, command: str) -> asyncssh.SSHClientProcess:
    proc: asyncssh.SSHClientProcess = await aio(conn.create_process, command, encoding=None)
    return proc


async def finish(proc: asyncssh.SSHClientProcess) -> tuple[bytes, bytes, int | None]:
    async def go() -> tuple[bytes, bytes, int | None]:
        out, err = await proc.communicate()
        return out, err, proc.exit_status

    result: tuple[bytes, bytes, int | None] = await aio(go)
    return result


async def run(conn: asyncssh.SSHClientConnection, command: str) -> tuple[bytes, bytes, int | None]:
    return await finish(await start(conn, command))


async def wait_running(rig: Rig, pod: str, execs: int) -> None:
    """Until ``execs`` exec streams of ``pod`` are open (and their processes run)."""
    await settle(lambda: sum(e.kind == "exec-open" for e in rig.log(pod)) >= execs)


async def close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await aio(conn.wait_closed)


def the_pod(rig: Rig) -> str:
    pods = rig.cluster.pods()
    assert len(pods) == 1
    return str(pods[0]["metadata"]["name"])


async def assert_execs_closed_before_delete(rig: Rig, pod: str, execs: int) -> None:
    """Every exec stream of ``pod`` was closed by the gateway before the DELETE arrived.

    Witnesses: the proxy saw the gateway close each exec connection before the cluster's
    request log received the DELETE; the log has an exec-close for every exec-open. (The
    cluster logs exec-close when the client's Close frame or EOF arrives; here some
    streams are cut inside the proxy, whose upstream side may close later than the
    gateway did, so the proxy's times are the witness. tests/test_gateway_smoke.py
    checks the same order from the request log alone.)
    """
    assert rig.proxy is not None and rig.execs is not None
    await settle(lambda: sum(e.kind == "exec-close" for e in rig.log(pod)) >= execs)
    entries = rig.log(pod)
    text = "\n".join(f"{e.seq} {e.kind} {e.method} {e.path.rsplit('/', 1)[-1]} "
                     f"received={e.received:.4f} time={e.time:.4f}" for e in entries)
    opened = [e for e in entries if e.kind == "exec-open"]
    closed = [e for e in entries if e.kind == "exec-close"]
    deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
    assert len(opened) == len(closed) == execs, text
    assert len(deletes) == 1, text
    connections = rig.execs.about(f"/pods/{pod}/exec?")
    assert len(connections) == execs
    for connection in connections:
        assert connection.closed_at is not None and connection.closed_at < deletes[0].received


async def assert_nothing_left(rig: Rig, before: Snapshot) -> None:
    """No pod, connection, process, task or fd more than before the connection.

    Allowed: idle keep-alive connections in the gateway's HTTP pool to the API server
    (owned by the gateway's KubeClient, not by any SSH connection), each visible as a
    socket pair, one server-side handler task of the embedded cluster and one asyncio
    fd watcher.
    """
    await settle(lambda: not rig.cluster.pods() and not rig.gateway.connections)
    api_port = int(rig.cluster.url.rsplit(":", 1)[1])
    gateway_side = rig.proxy.port if rig.proxy else api_port  # where the gateway dials
    ssh_port = rig.gateway.address[1]

    def problems() -> list[str]:
        now = snapshot()
        found = [f"task {t}" for t in sorted(now.trio_tasks - before.trio_tasks)]
        found += [f"process {p}" for p in sorted(now.children - before.children)]
        if now.fds > before.fds:
            found.append(f"{now.fds - before.fds} more non-socket fds")
        if now.asyncio_tasks > before.asyncio_tasks:
            found.append(f"{now.asyncio_tasks - before.asyncio_tasks} more asyncio tasks")
        pairs = now.keepalive_pairs(api_port)
        if rig.proxy is not None:  # the proxy's per-connection handlers
            pairs += now.keepalive_pairs(gateway_side)
        if now.http_handlers != pairs:
            found.append(f"{now.http_handlers} API handlers for {pairs} keep-alive pairs")
        if rig.proxy is not None and rig.proxy.held_open:
            found.append(f"{rig.proxy.held_open} stalled connections still open")
        more_pairs = now.keepalive_pairs(gateway_side) - before.keepalive_pairs(gateway_side)
        if now.io_tasks - before.io_tasks > max(more_pairs, 0):
            found.append(f"{now.io_tasks - before.io_tasks} more asyncio fd watchers")
        for local, remote, status in sorted(now.tcp - before.tcp):
            if status == "LISTEN" and local[1] != ssh_port:
                continue  # e.g. the proxy's
            if status == "ESTABLISHED" and {api_port, gateway_side} & {
                    local[1], remote[1] if remote else 0}:
                continue  # keep-alive (checked above)
            found.append(f"socket {local} -> {remote} {status}")
        return found

    with contextlib.suppress(trio.TooSlowError):
        await settle(lambda: not problems(), within=5)
    if found := problems():
        pytest.fail("left behind:\n" + "\n".join(found))


async def warm_up(rig: Rig) -> Snapshot:
    """One full connection, so that pools and lazily started tasks exist; then a snapshot."""
    conn = await rig.connect()
    assert (await run(conn, "true"))[2] == 0
    await close(conn)
    await settle(lambda: not rig.cluster.pods() and not rig.gateway.connections)
    await trio.sleep(0.2)
    return snapshot()


# == pod start failure ==========================================================================


async def test_image_pull_failure_reaches_the_client(tmp_path: Path) -> None:
    async with open_rig(tmp_path, spec={"containers": [{"name": "shell",
                                                        "image": "nosuch/image"}]}) as rig:
        rig.cluster.faults.fail_image("nosuch/*")
        conn = await rig.connect()
        out, err, status = await run(conn, "echo never")
        assert out == b"" and status == 255
        assert b"ErrImagePull" in err and b'failed to pull and unpack image "nosuch/image"' in err
        with trio.fail_after(5):
            await aio(conn.wait_closed)  # the gateway ended the connection
        deletes = [e for e in rig.cluster.request_log.entries if e.method == "DELETE"]
        assert len(deletes) == 1
        await settle(lambda: not rig.cluster.pods())


@pytest.mark.parametrize("fault", ["image", "create-forbidden"])
async def test_start_failure_reaches_a_session_opened_late(tmp_path: Path, fault: str) -> None:
    """The failure comes before the client opened its session: the reason still reaches it."""
    async with open_rig(tmp_path, spec={"containers": [{"name": "shell",
                                                        "image": "nosuch/image"}]}) as rig:
        if fault == "image":
            rig.cluster.faults.fail_image("nosuch/*")
        else:
            rig.cluster.faults.fail_requests("create", "pods", 1, code=403)
        conn = await rig.connect()
        await settle(lambda: any(e.method == "DELETE" or e.status == 403
                                 for e in rig.cluster.request_log.entries))
        await trio.sleep(0.3)
        out, err, status = await run(conn, "echo never")
        assert (out, status) == (b"", 255)
        assert (b"ErrImagePull" if fault == "image" else b"403") in err, err
        with trio.fail_after(5):
            await aio(conn.wait_closed)
        await settle(lambda: not rig.cluster.pods() and not rig.gateway.connections)


# == disconnect: ordering and leaks ============================================================


async def test_client_disconnect_closes_execs_before_delete_and_leaks_nothing(
        tmp_path: Path) -> None:
    async with open_rig(tmp_path, proxy=True) as rig:
        before = await warm_up(rig)
        conn = await rig.connect()
        await start(conn, "sleep 30")
        await start(conn, "cat /dev/zero")  # mid-transfer: the client never reads
        pod = await settle_pod(rig)
        await wait_running(rig, pod, 2)
        await trio.sleep(0.3)
        await close(conn)
        await settle(lambda: not rig.gateway.connections)
        await assert_execs_closed_before_delete(rig, pod, 2)
        await assert_nothing_left(rig, before)


async def settle_pod(rig: Rig) -> str:
    await settle(lambda: rig.cluster.pods())
    return the_pod(rig)


async def test_disconnect_mid_pod_creation(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        before = await warm_up(rig)
        rig.cluster.faults.delay_start(30)
        conn = await rig.connect()
        proc = await start(conn, "echo never")
        pod = await settle_pod(rig)
        assert rig.cluster.pods()[0]["status"]["phase"] == "Pending"
        await close(conn)
        del proc
        await settle(lambda: not rig.gateway.connections)
        assert [e.method for e in rig.log(pod) if e.method == "DELETE"] == ["DELETE"]
        await assert_nothing_left(rig, before)


async def test_disconnect_mid_exec_handshake(tmp_path: Path) -> None:
    async with open_rig(tmp_path, proxy=True) as rig:
        assert rig.proxy is not None
        before = await warm_up(rig)
        conn = await rig.connect()
        rule = rig.proxy.stall(b"/exec?", to="client")  # the 101 never comes back
        await start(conn, "sleep 30")
        pod = await settle_pod(rig)
        await wait_running(rig, pod, 1)  # the server upgraded and runs the command
        await rule.hit.wait()
        await close(conn)
        await settle(lambda: not rig.gateway.connections)
        await assert_execs_closed_before_delete(rig, pod, 1)  # dropped: no 101, no handshake
        await assert_nothing_left(rig, before)


# == pod lost under live sessions ===============================================================


@pytest.mark.parametrize("how", ["delete", "evict", "kill"])
async def test_pod_lost_ends_sessions_and_connection(tmp_path: Path, how: str) -> None:
    async with open_rig(tmp_path) as rig:
        other = await rig.connect("bystander")
        bystander = await start(other, "sleep 30")
        await settle(lambda: len(rig.cluster.pods()) == 1)
        conn = await rig.connect()
        await settle(lambda: len(rig.cluster.pods()) == 2)
        pod = next(p["metadata"]["name"] for p in rig.cluster.pods()
                   if p["metadata"]["labels"][LABEL_USERNAME] == "alice")
        procs = [await start(conn, "sleep 30"), await start(conn, "sleep 31")]
        await wait_running(rig, pod, 2)
        if how == "delete":  # deleted by someone else, 30 s grace: the execs live on
            rig.cluster.store.mark_deleting("default", pod, 30)
        else:
            await getattr(rig.cluster.faults, how)("default", pod)
        for proc in procs:
            with trio.fail_after(10):
                out, err, status = await finish(proc)
            # Eviction and kill SIGKILL the exec's process too, so its stream may end
            # (137) before the watcher sees the pod go: the session asks the watcher
            # (ExecTarget.pod_loss) and still reports the pod loss, never exit-signal KILL.
            assert proc.exit_signal is None, proc.exit_signal
            assert status == 255, (out, err)
            assert f"the pod {pod} is gone".encode() in err, err
        with trio.fail_after(5):
            await aio(conn.wait_closed)
        # the gateway still serves: the bystander's session lives, new connections work
        assert bystander.exit_status is None
        assert (await run(other, "echo still here"))[0] == b"still here\n"
        third = await rig.connect()
        assert (await run(third, "echo new"))[0] == b"new\n"
        await close(third)
        await close(other)


# == server shutdown ============================================================================


async def test_server_cancel_closes_execs_then_deletes_every_pod(tmp_path: Path) -> None:
    async with open_rig(tmp_path, proxy=True) as rig:
        conns = [await rig.connect(), await rig.connect("bob")]
        procs = [await start(conns[0], "sleep 30"), await start(conns[1], "cat")]
        await settle(lambda: len(rig.cluster.pods()) == 2)
        pods = [p["metadata"]["name"] for p in rig.cluster.pods()]
        for pod in pods:
            await wait_running(rig, pod, 1)
        started = trio.current_time()
        rig.scope.cancel()
        with trio.fail_after(10):
            await rig.served.wait()
        assert trio.current_time() - started < 5
        for pod in pods:
            await assert_execs_closed_before_delete(rig, pod, 1)
        for proc in procs:
            _, err, status = await finish(proc)
            assert status == 255 and b"shutting down" in err
        await settle(lambda: not rig.cluster.pods())


async def test_graceful_shutdown(tmp_path: Path) -> None:
    async with open_rig(tmp_path, proxy=True) as rig:
        conn = await rig.connect()
        quick = await start(conn, "sleep 1; echo done")
        slow = await start(conn, "sleep 30")
        pod = await settle_pod(rig)
        await wait_running(rig, pod, 2)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                rig.gateway.shutdown, grace=2.0, message="maintenance at noon"))
            await trio.sleep(0.2)
            with pytest.raises((OSError, asyncssh.Error)):  # no longer accepting
                await rig.connect()
        assert 2.0 <= trio.current_time() - started < 5
        out, err, status = await finish(quick)
        assert (out, status) == (b"done\n", 0)
        assert b"maintenance at noon" in err
        out, err, status = await finish(slow)
        assert status == 255 and b"maintenance at noon" in err
        await assert_execs_closed_before_delete(rig, pod, 2)
        with trio.fail_after(5):
            await rig.served.wait()  # serve_gateway returned after the shutdown
        await settle(lambda: not rig.cluster.pods())


# == pod metadata and logs ======================================================================


@pytest.mark.parametrize("username", ["Jürgen.Müller", "x" * 200, "ADMIN", "a.b.c.", "用户"])
async def test_pod_labels_are_sanitised(tmp_path: Path, username: str) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect(username)
        assert (await run(conn, "true"))[2] == 0
        meta = rig.cluster.pods()[0]["metadata"]
        (cid,) = rig.gateway.connections
        assert meta["labels"][LABEL_CONNECTION_ID] == cid
        assert meta["labels"]["kuberun.trio/instance"] == "test-gw"
        label = meta["labels"][LABEL_USERNAME]
        assert label_value_problem(label) is None
        assert label == username if label_value_problem(username) is None else label != username
        assert meta["annotations"][ANNOTATION_USERNAME] == username
        local = conn.get_extra_info("sockname")
        assert meta["annotations"][ANNOTATION_CLIENT_ADDRESS] == f"{local[0]}:{local[1]}"
        await close(conn)


async def test_one_log_line_per_lifecycle_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kuberun_trio")
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        assert (await run(conn, "exit 4"))[2] == 4
        (cid,) = rig.gateway.connections
        await close(conn)
        await settle(lambda: not rig.gateway.connections)
    mine = [r for r in caplog.records if getattr(r, "connection_id", None) == cid]
    events = [getattr(r, "event", None) for r in mine]
    assert None not in events, [r.getMessage() for r in mine]
    for expected in ("connection-start", "pod-created", "pod-running", "session-start",
                     "session-exit", "pod-deleted", "connection-end"):
        assert events.count(expected) == 1, events
    order = [events.index(e) for e in ("connection-start", "pod-created", "pod-running",
                                       "session-start", "session-exit", "pod-deleted",
                                       "connection-end")]
    assert order == sorted(order)
    exit_record = mine[events.index("session-exit")]
    assert exit_record.exit_status == 4
    for event in ("pod-running", "pod-deleted", "connection-end"):
        assert isinstance(mine[events.index(event)].duration_ms, int)
