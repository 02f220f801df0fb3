"""``kubernetes.pod.mode`` end to end: the real OpenSSH client against ``python -m kuberun_trio``.

The embedded cluster runs as its own process with ``--private-tmp`` (every pod has a
``/tmp`` of its own, so a file found again proves the same pod) and namespaces (a pod's
hostname is its name). Each user gets a persistent pod named
:func:`~kuberun_trio.core.podtemplate.persistent_pod_name`; the tests use a username of
their own each, so that they do not meet on one pod.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import require_namespaces_sync
from test_e2e_openssh import (
    ENV,
    GATEWAY,
    Cluster,
    GatewayProcess,
    Keys,
    Kube,
    control_master,
    first_line,
    keygen,
    running_gateway,
    spawn,
    start_gateway,
    stop_process,
    wait_for,
)

from kuberun_trio.core.podtemplate import persistent_pod_name
from kuberun_trio.gateway.persistent import claims

pytestmark = pytest.mark.needs("ssh", "ssh-keygen")



@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_namespaces_sync()  # hostname == pod name, private /tmp
    folder = tmp_path_factory.mktemp("cluster")
    kubeconfig, out = folder / "kubeconfig", folder / "cluster.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([*GATEWAY, "embedded-cluster", "--kubeconfig-out",
                                 str(kubeconfig), "--private-tmp"],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for(lambda: proc.poll() is not None or b"kubeconfig:" in out.read_bytes(), 30,
                 "the embedded cluster to print its kubeconfig")
        assert proc.poll() is None, out.read_text()
        yield Cluster(kubeconfig, Kube(kubeconfig))
    finally:
        assert stop_process(proc) == 0, out.read_text()


def pod_of(kube: Kube, user: str) -> dict[str, Any] | None:
    """The user's persistent pod as the API server has it (None: there is none)."""
    query = {"labelSelector": "kuberun.trio/mode=persistent"}
    with kube._open("/api/v1/namespaces/default/pods", query, 10) as response:
        items: list[dict[str, Any]] = json.load(response)["items"]
    name = persistent_pod_name(user)
    return next((p for p in items if p["metadata"]["name"] == name), None)


def as_user(argv: list[str], user: str) -> list[str]:
    return [f"{user}@127.0.0.1" if a == "alice@127.0.0.1" else a for a in argv]


def ssh(gateway: GatewayProcess, user: str, command: str,
        *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(as_user(gateway.ssh(command, *options), user), capture_output=True,
                          env=ENV, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    host, client, stranger = (keygen(folder / name) for name in ("host", "client", "stranger"))
    authorized = folder / "authorized_keys"
    authorized.write_text(Path(f"{client}.pub").read_text())
    return Keys(folder, host, client, stranger, authorized)


@contextlib.contextmanager
def gateway_with(cluster: Cluster, keys: Keys, folder: Path, instance: str,
                 config: str) -> Iterator[GatewayProcess]:
    path = folder / f"{instance}.yaml"
    path.write_text(config)
    with running_gateway(cluster, keys, folder, instance, "--config", str(path)) as gateway:
        yield gateway


PERSISTENT = "kubernetes: {pod: {mode: persistent}}\n"


@pytest.fixture(scope="module")
def persistent_gateway(cluster: Cluster, keys: Keys,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with gateway_with(cluster, keys, tmp_path_factory.mktemp("gw"), "pm-main",
                      PERSISTENT) as gateway:
        yield gateway


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# == persistent mode ===========================================================================

def test_reconnect_reads_back_a_file(persistent_gateway: GatewayProcess,
                                     cluster: Cluster) -> None:
    user = unique("Files.User")  # upper case and a dot: still one valid, stable pod name
    first = ssh(persistent_gateway, user, "hostname; echo kept > /tmp/note")
    assert (first.returncode, first.stdout.decode()) == (0, f"{persistent_pod_name(user)}\n"), \
        first.stderr
    pod = pod_of(cluster.kube, user)
    assert pod is not None, "the pod outlives its connection"
    wait_for(lambda: not claims(pod_of(cluster.kube, user) or {}), 10, "the claim released")
    again = ssh(persistent_gateway, user, "hostname; cat /tmp/note")
    assert again.stdout.decode() == f"{persistent_pod_name(user)}\nkept\n", again.stderr
    other = ssh(persistent_gateway, unique("other"), "cat /tmp/note")
    assert other.returncode == 1, "another user's pod has its own /tmp"
    assert (pod_of(cluster.kube, user) or {})["metadata"]["uid"] == pod["metadata"]["uid"]


def test_two_connections_at_once_get_one_pod(persistent_gateway: GatewayProcess,
                                             cluster: Cluster) -> None:
    user = unique("twice")
    clients = [spawn(as_user(persistent_gateway.ssh("hostname; sleep 1"), user))
               for _ in range(2)]
    try:
        results = [client.communicate(timeout=60) for client in clients]
    finally:
        for client in clients:
            stop_process(client, signal.SIGKILL)
    assert [c.returncode for c in clients] == [0, 0], results
    assert {out.decode() for out, _ in results} == {f"{persistent_pod_name(user)}\n"}
    assert pod_of(cluster.kube, user) is not None


@pytest.mark.slow  # two gateways and a Lease expiry; tests/test_pod_modes.py judges claims fast
def test_two_replicas_share_the_pod_and_reap_a_dead_ones_claim(
        cluster: Cluster, keys: Keys, tmp_path: Path) -> None:
    """Replicas A and B: one user through both at once gets one pod. A is killed with its
    connection open; once A's Lease has expired, B's sweep drops A's claim and, the pod
    being idle, deletes it."""
    path = tmp_path / "replicas.yaml"
    path.write_text("kubernetes: {pod: {mode: persistent, persistentIdleTimeout: 1s}}\n"
                    "gc: {sweepInterval: 0.5s, margin: 1s}\n"
                    "lease: {duration: 2s, renewInterval: 0.5s}\n")
    user = unique("replicas")
    a = start_gateway(cluster, keys, tmp_path, "pm-replica-a", "--config", str(path))
    clients: list[subprocess.Popen[bytes]] = []
    try:
        with running_gateway(cluster, keys, tmp_path, "pm-replica-b", "--config",
                             str(path)) as b:
            clients = [spawn(as_user(gw.ssh("hostname; exec sleep 600"), user)) for gw in (a, b)]
            assert {first_line(c) for c in clients} == {persistent_pod_name(user)}
            pod = pod_of(cluster.kube, user)
            assert pod is not None and len(claims(pod)) == 2
            stop_process(a.proc, signal.SIGKILL)
            stop_process(clients[1])  # B's connection ends: only A's dead claim is left
            wait_for(lambda: pod_of(cluster.kube, user) is None, 30, "the idle pod reaped")
            assert "persistent-claim-stale" in b.log() and "persistent-pod-reaped" in b.log()
    finally:
        stop_process(a.proc, signal.SIGKILL)
        for client in clients:
            stop_process(client, signal.SIGKILL)


def test_idle_pod_reaped(cluster: Cluster, keys: Keys, tmp_path: Path) -> None:
    config = ("kubernetes: {pod: {mode: persistent, persistentIdleTimeout: 1s}}\n"
              "gc: {sweepInterval: 0.5s}\n")
    with gateway_with(cluster, keys, tmp_path, "pm-idle", config) as gateway:
        user = unique("idle")
        result = ssh(gateway, user, "hostname")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: pod_of(cluster.kube, user) is None, 20, "the idle pod reaped")
        assert "persistent-pod-reaped" in gateway.log()


def test_restart_keeps_and_reuses_the_pod(cluster: Cluster, keys: Keys,
                                          tmp_path: Path) -> None:
    path = tmp_path / "persistent.yaml"
    path.write_text(PERSISTENT)
    user = unique("restart")
    first = start_gateway(cluster, keys, tmp_path, "pm-restart", "--config", str(path),
                          "--grace", "0.5")
    client = spawn(as_user(first.ssh("echo kept > /tmp/note; hostname; exec sleep 600"), user))
    try:
        assert first_line(client) == persistent_pod_name(user)
        uid = (pod_of(cluster.kube, user) or {})["metadata"]["uid"]
        assert stop_process(first.proc) == 0, first.log()  # SIGTERM with a session open
        client.wait(30)
        # the restart runs the start-up sweep of its instance: the user's pod is not its
        with running_gateway(cluster, keys, tmp_path, "pm-restart", "--config",
                             str(path)) as second:
            again = ssh(second, user, "hostname; cat /tmp/note")
            assert again.stdout.decode() == f"{persistent_pod_name(user)}\nkept\n", again.stderr
        pod = pod_of(cluster.kube, user)
        assert pod is not None and pod["metadata"]["uid"] == uid
    finally:
        stop_process(first.proc, signal.SIGKILL)
        stop_process(client, signal.SIGKILL)


def test_missing_pod_is_a_login_error(cluster: Cluster, keys: Keys,
                                      tmp_path: Path) -> None:
    config = "kubernetes: {pod: {mode: persistent, createMissingPods: false}}\n"
    with gateway_with(cluster, keys, tmp_path, "pm-missing", config) as gateway:
        user = unique("missing")
        result = ssh(gateway, user, "echo never")
        assert result.returncode == 255 and result.stdout == b""
        assert (f"kuberun: PodMissing: your pod {persistent_pod_name(user)} does not exist"
                in result.stderr.decode()), result.stderr
        assert pod_of(cluster.kube, user) is None
        assert "PodMissing" in gateway.log()


# == session mode ==============================================================================

def test_session_mode_gives_each_channel_its_pod(cluster: Cluster, keys: Keys,
                                                 tmp_path: Path, short_dir: Path) -> None:
    config = "kubernetes: {pod: {mode: session}}\n"
    with gateway_with(cluster, keys, tmp_path, "pm-session", config) as gateway, \
            control_master(gateway, short_dir) as control:
        assert cluster.kube.names(gateway.instance) == set(), "no pod for the connection"
        first = spawn(gateway.ssh("echo $HOSTNAME; exec sleep 600", *control))
        try:
            one = first_line(first)
            second = gateway.run("echo $HOSTNAME; hostname", *control)
            two, again = second.stdout.decode().split()
            assert one != two and two == again and one.startswith("kuberun-")
            # the second channel ended: its pod goes, the first one's stays
            wait_for(lambda: cluster.kube.names(gateway.instance) == {one}, 15,
                     "only the first channel's pod")
        finally:
            stop_process(first, signal.SIGKILL)
        # the first channel ended, the connection lives on: its pod goes too
        cluster.kube.wait_no_pods(gateway.instance)
        assert subprocess.run(gateway.ssh(None, *control, "-O", "check"), env=ENV,
                              capture_output=True).returncode == 0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

