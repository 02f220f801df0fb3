"""End to end: the real OpenSSH client against ``python -m kuberun_trio`` in a subprocess.

Two processes, as an operator runs them: a standalone embedded cluster
(``python -m kuberun_trio embedded-cluster --kubeconfig-out FILE``) and the
gateway (``python -m kuberun_trio --cluster kubeconfig --kubeconfig FILE ...``).
The clients are ``ssh``, ``sftp``, ``scp`` and, for the pty, ``ssh -tt`` inside
a detached ``tmux``. Pods are observed through the cluster's REST API with the
kubeconfig's own CA and token (plain ``urllib``, independent of the gateway's
client code), filtered by the gateway instance label.

One cluster and one gateway serve the module; tests that kill or restart a
gateway, or need another image, start their own gateway with its own
``--instance``. Every test using the shared gateway must leave no pod behind
(checked after each test).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import yaml
from support import SFTP_SERVER, require_namespaces_sync

pytestmark = pytest.mark.needs("ssh", "sftp", "scp", "ssh-keygen", paths=[SFTP_SERVER])

GATEWAY = [sys.executable, "-m", "kuberun_trio"]
"""How an operator starts the gateway."""
INSTANCE_LABEL = "kuberun.trio/instance"
FAIL_IMAGE = "unpullable.example/*"
"""Images the cluster refuses to pull (``--fail-image``)."""
ENV = {**{k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"},
       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
"""Environment of every subprocess: no ssh-agent (only ``-i`` keys count), no proxy."""

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 30) -> int:
    """Signal ``proc`` (if alive), wait, SIGKILL it if it does not exit in time; close pipes."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return proc.returncode


# == the cluster, seen through its REST API ===================================================

class Kube:
    """A minimal, synchronous reader of the cluster's pods (kubeconfig CA + bearer token)."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = str(cluster["server"]).rstrip("/")
        self.token = config["users"][0]["user"].get("token")
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if "certificate-authority-data" in cluster:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
            context = ssl.create_default_context(cadata=ca)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def _open(self, path: str, query: dict[str, str], timeout: float) -> Any:
        url = f"{self.server}{path}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return self.opener.open(request, timeout=timeout)

    def pod_list(self, instance: str) -> dict[str, Any]:
        query = {"labelSelector": f"{INSTANCE_LABEL}={instance}"}
        with self._open("/api/v1/namespaces/default/pods", query, 10) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def pods(self, instance: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.pod_list(instance)["items"]
        return items

    def names(self, instance: str) -> set[str]:
        return {str(pod["metadata"]["name"]) for pod in self.pods(instance)}

    def events_since(self, instance: str, resource_version: str) -> list[tuple[str, str]]:
        """(type, pod name) of every watch event of ``instance``'s pods after the version."""
        query = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": "1",
                 "labelSelector": f"{INSTANCE_LABEL}={instance}"}
        events = []
        with self._open("/api/v1/namespaces/default/pods", query, 10) as response:
            for line in response:
                if line.strip():
                    event = json.loads(line)
                    events.append((event["type"], event["object"]["metadata"].get("name", "")))
        return events

    def wait_no_pods(self, instance: str, timeout: float = 15) -> None:
        wait_for(lambda: not self.pods(instance), timeout, f"no pods of instance {instance}")


@attrs.frozen
class Cluster:
    kubeconfig: Path
    kube: Kube


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_namespaces_sync()  # the tests read the pod's name from `hostname`
    folder = tmp_path_factory.mktemp("cluster")
    kubeconfig, out = folder / "kubeconfig", folder / "cluster.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [*GATEWAY, "embedded-cluster", "--kubeconfig-out", str(kubeconfig),
             "--fail-image", FAIL_IMAGE],
            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for(lambda: proc.poll() is not None or b"kubeconfig:" in out.read_bytes(), 30,
                 "the embedded cluster to print its kubeconfig")
        assert proc.poll() is None, out.read_text()
        yield Cluster(kubeconfig, Kube(kubeconfig))
    finally:
        assert stop_process(proc) == 0, out.read_text()


# == keys =====================================================================================

@attrs.frozen
class Keys:
    folder: Path
    host: Path
    client: Path
    stranger: Path
    """A key that is not in authorized_keys."""
    authorized: Path


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name,
                    "-f", str(path)], check=True, env=ENV)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    host, client, stranger = (keygen(folder / name) for name in ("host", "client", "stranger"))
    authorized = folder / "authorized_keys"
    authorized.write_text(Path(f"{client}.pub").read_text())
    return Keys(folder, host, client, stranger, authorized)


# == the gateway process ======================================================================

def speaks_ssh(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


@attrs.define
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    instance: str
    log_path: Path
    keys: Keys

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def opts(self, key: Path | None = None) -> list[str]:
        """Client options shared by ssh, sftp and scp (``-o Port`` works for all three)."""
        return ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
                "-o", f"Port={self.port}", "-i", str(key or self.keys.client)]

    def ssh(self, command: str | None, *options: str, key: Path | None = None) -> list[str]:
        """``ssh OPTIONS... alice@127.0.0.1 [COMMAND]`` (for each keyword ssh takes the first
        ``-o``, so ``options`` override :meth:`opts`)."""
        tail = [] if command is None else [command]
        return ["ssh", *options, *self.opts(key), "alice@127.0.0.1", *tail]

    def run(self, command: str, *options: str, input: bytes | None = None,
            env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.ssh(command, *options), input=input, capture_output=True,
                              env=env or ENV, timeout=timeout)


LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def start_gateway(cluster: Cluster, keys: Keys, folder: Path, instance: str,
                  *extra: str) -> GatewayProcess:
    """Start ``python -m kuberun_trio`` on a free port; return once it speaks SSH."""
    log_path = folder / f"gateway-{instance}-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*GATEWAY, "--listen", "127.0.0.1:0", "--host-key", str(keys.host),
             "--authorized-keys", str(keys.authorized), "--cluster", "kubeconfig",
             "--kubeconfig", str(cluster.kubeconfig), "--instance", instance,
             "--state-dir", str(folder / f"state-{instance}"), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        found = wait_for(lambda: proc.poll() is not None or LISTENING.search(log_path.read_bytes()),
                         30, "the gateway to print the address it listens on")
        assert proc.poll() is None, f"the gateway exited {proc.returncode}:\n{log_path.read_text()}"
        assert isinstance(found, re.Match)
        port = int(found[1])
        assert speaks_ssh(port), log_path.read_text()
    except BaseException:
        stop_process(proc)
        raise
    return GatewayProcess(proc, port, instance, log_path, keys)


@contextlib.contextmanager
def running_gateway(cluster: Cluster, keys: Keys, folder: Path, instance: str,
                    *extra: str) -> Iterator[GatewayProcess]:
    gateway = start_gateway(cluster, keys, folder, instance, *extra)
    try:
        yield gateway
    finally:
        stop_process(gateway.proc)


@pytest.fixture(scope="module")
def shared_gateway(cluster: Cluster, keys: Keys,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(cluster, keys, tmp_path_factory.mktemp("gw"), "e2e-main") as gw:
        yield gw


@pytest.fixture
def gateway(shared_gateway: GatewayProcess, cluster: Cluster) -> Iterator[GatewayProcess]:
    """The shared gateway; after the test, none of its pods may remain."""
    yield shared_gateway
    assert shared_gateway.proc.poll() is None, shared_gateway.log()
    cluster.kube.wait_no_pods(shared_gateway.instance)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (ControlPath, tmux)."""
    folder = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def spawn(argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, **kw)


def first_line(proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """The first stdout line of ``proc`` (the callers' commands print whole lines at once)."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    assert readable, f"no output within {timeout}s"
    return proc.stdout.readline().decode().strip()


# == sessions =================================================================================

def test_exec_output_stderr_and_exit_code(gateway: GatewayProcess, cluster: Cluster) -> None:
    result = gateway.run("echo hello; echo oops >&2; hostname; exit 7")
    assert result.returncode == 7, result.stderr
    hello, hostname = result.stdout.decode().splitlines()
    assert hello == "hello"
    assert result.stderr == b"oops\n"
    assert hostname.startswith("kuberun-")
    ok = gateway.run("true")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, b"", b"")


def test_host_key_is_the_configured_one(gateway: GatewayProcess, keys: Keys,
                                        tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{gateway.port} {Path(f'{keys.host}.pub').read_text()}")
    strict = ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}"]
    result = gateway.run("echo trusted", *strict)
    assert (result.returncode, result.stdout) == (0, b"trusted\n"), result.stderr
    known.write_text(f"[127.0.0.1]:{gateway.port} {Path(f'{keys.stranger}.pub').read_text()}")
    result = gateway.run("echo trusted", *strict)
    assert result.returncode == 255 and result.stdout == b""


def test_env_via_send_env(gateway: GatewayProcess) -> None:
    value = """it's "quoted" $HOME `x` \\ ; end"""
    env = {**ENV, "KR_E2E_VAR": value, "KR_E2E_OTHER": "not sent"}
    result = gateway.run('printf "%s|%s" "$KR_E2E_VAR" "${KR_E2E_OTHER-unset}"',
                         "-o", "SendEnv=KR_E2E_VAR", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{value}|unset"


def test_stdin_eof(gateway: GatewayProcess) -> None:
    result = gateway.run("wc -c", input=b"abc")
    assert (result.returncode, result.stdout.strip()) == (0, b"3"), result.stderr
    data = os.urandom(3 * 1024 * 1024 + 17)
    result = gateway.run("sha256sum; echo done", input=data, timeout=60)
    assert result.returncode == 0, result.stderr
    digest, done = result.stdout.decode().split("\n", 1)
    assert digest.split()[0] == hashlib.sha256(data).hexdigest() and done == "done\n"


# == pty ======================================================================================

@pytest.mark.needs("tmux")
def test_pty_and_window_change(gateway: GatewayProcess, short_dir: Path) -> None:
    tmux = ["tmux", "-S", str(short_dir / "tmux"), "-f", "/dev/null"]
    env = {**ENV, "TERM": "xterm-256color"}

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t", "e2e"],
                              capture_output=True, env=env, check=True).stdout.decode()

    def type_line(line: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "e2e", "-l", line], env=env, check=True)
        subprocess.run([*tmux, "send-keys", "-t", "e2e", "Enter"], env=env, check=True)

    marks = iter(range(1, 1000))

    def ask(command: str) -> list[str]:
        """Type ``command``; the output lines between its echo and a marker."""
        n = next(marks)
        type_line(f"{command}; echo MARK$(({n}*1000))END")
        def answered() -> str:
            text = pane()
            return text if f"MARK{n * 1000}END" in text else ""

        text = wait_for(answered, 20, f"the output of {command!r} in tmux")
        lines = text.splitlines()
        end = lines.index(f"MARK{n * 1000}END")
        start = max(i for i, line in enumerate(lines[:end]) if f"MARK$(({n}*1000))END" in line)
        return [line.strip() for line in lines[start + 1:end]]

    status = short_dir / "status"
    client = shlex.join(["ssh", "-tt", *gateway.opts(), "alice@127.0.0.1"])
    subprocess.run([*tmux, "new-session", "-d", "-s", "e2e", "-x", "100", "-y", "30",
                    f"{client}; echo $? > {status}; sleep 600"], env=env, check=True)
    try:
        wait_for(lambda: pane().strip(), 30, "the shell prompt")  # typing earlier mixes lines
        term = subprocess.run([*tmux, "show-options", "-gv", "default-terminal"],
                              capture_output=True, env=env, check=True).stdout.decode().strip()
        assert ask('test -t 0 && echo "tty $TERM"') == [f"tty {term}"]
        assert ask("stty size") == ["30 100"]
        subprocess.run([*tmux, "resize-window", "-t", "e2e", "-x", "120", "-y", "40"],
                       env=env, check=True)
        # the window change travels on its own path (a resize message on the exec stream):
        # ask again until it has landed, within a deadline
        wait_for(lambda: ask("stty size") == ["40 120"], 20, "stty size to report 40 120")
        type_line("exit 5")
        wait_for(lambda: status.exists() and status.read_text().strip(), 20,
                 "the ssh client to exit")
        assert status.read_text().strip() == "5"
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)


# == one connection, several sessions ========================================================

@contextlib.contextmanager
def control_master(gateway: GatewayProcess, folder: Path) -> Iterator[list[str]]:
    """An SSH master connection; yields the options that multiplex over it."""
    control = ["-o", f"ControlPath={folder / 'ctl'}"]
    master = spawn(gateway.ssh(None, "-o", "ControlMaster=yes", *control, "-N", "-T"))
    try:
        def ready() -> bool:
            assert master.poll() is None, master.stderr.read() if master.stderr else ""
            return subprocess.run(gateway.ssh(None, *control, "-O", "check"), capture_output=True,
                                  env=ENV).returncode == 0

        wait_for(ready, 30, "the control master")
        yield control
        subprocess.run(gateway.ssh(None, *control, "-O", "exit"), capture_output=True, env=ENV)
    finally:
        stop_process(master, timeout=10)


def test_parallel_sessions_share_one_pod(gateway: GatewayProcess, cluster: Cluster,
                                         short_dir: Path) -> None:
    fifo = f"/tmp/kr-e2e-{uuid.uuid4().hex}"
    with control_master(gateway, short_dir) as control:
        (pod,) = wait_for(lambda: cluster.kube.names(gateway.instance), 30, "the pod")
        # the first session blocks on the FIFO until the second writes it: they must overlap
        first = spawn(gateway.ssh(f"mkfifo {fifo} && hostname && cat {fifo}", *control))
        try:
            assert first_line(first) == pod
            second = gateway.run(f"hostname; echo ping > {fifo}; rm {fifo}", *control)
            assert (second.returncode, second.stdout.decode()) == (0, f"{pod}\n"), second.stderr
            out, err = first.communicate(timeout=20)
            assert (first.returncode, out) == (0, b"ping\n"), err
        finally:
            stop_process(first, signal.SIGKILL)
        assert cluster.kube.names(gateway.instance) == {pod}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sftp_and_scp_round_trips(gateway: GatewayProcess, tmp_path: Path,
                                  short_dir: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    remote = f"/tmp/kr-e2e-{uuid.uuid4().hex}"
    with control_master(gateway, short_dir) as control:
        opts = [*gateway.opts(), *control]

        def remote_sha(path: str) -> str:
            result = gateway.run(f"sha256sum {path}", *control)
            assert result.returncode == 0, result.stderr
            return result.stdout.decode().split()[0]

        batch = tmp_path / "batch"
        batch.write_text(f"put {source} {remote}.sftp\nget {remote}.sftp {tmp_path}/back.sftp\n")
        result = subprocess.run(["sftp", "-b", str(batch), *opts, "alice@127.0.0.1"],
                                capture_output=True, env=ENV, timeout=60)
        assert result.returncode == 0, result.stderr
        assert remote_sha(f"{remote}.sftp") == sha256(source) == sha256(tmp_path / "back.sftp")

        for mode, flags in (("scp", []), ("legacy", ["-O"])):  # SFTP protocol, then rcp
            for src, dst in ((str(source), f"alice@127.0.0.1:{remote}.{mode}"),
                             (f"alice@127.0.0.1:{remote}.{mode}", f"{tmp_path}/back.{mode}")):
                result = subprocess.run(["scp", "-q", *flags, *opts, src, dst],
                                        capture_output=True, env=ENV, timeout=60)
                assert result.returncode == 0, (mode, result.stderr)
            assert remote_sha(f"{remote}.{mode}") == sha256(source)
            assert sha256(tmp_path / f"back.{mode}") == sha256(source)
        gateway.run(f"rm -f {remote}.*", *control)


# == pod lifetime =============================================================================

def test_pod_deleted_after_disconnect(gateway: GatewayProcess, cluster: Cluster) -> None:
    result = gateway.run("hostname")
    assert result.returncode == 0, result.stderr
    pod = result.stdout.decode().strip()
    wait_for(lambda: pod not in cluster.kube.names(gateway.instance), 15,
             f"pod {pod} to be deleted")


def test_pod_deleted_after_client_sigkill(gateway: GatewayProcess, cluster: Cluster) -> None:
    client = spawn(gateway.ssh("hostname; exec sleep 600"))
    try:
        pod = first_line(client)
        assert cluster.kube.names(gateway.instance) == {pod}
    finally:
        stop_process(client, signal.SIGKILL)
    wait_for(lambda: pod not in cluster.kube.names(gateway.instance), 15,
             f"pod {pod} to be deleted after the client died")


def test_wrong_key_refused_without_pod(gateway: GatewayProcess, cluster: Cluster,
                                       keys: Keys) -> None:
    version = cluster.kube.pod_list(gateway.instance)["metadata"]["resourceVersion"]
    result = subprocess.run(gateway.ssh("echo in", key=keys.stranger), capture_output=True,
                            env=ENV, timeout=30)
    assert result.returncode == 255 and result.stdout == b""
    assert b"Permission denied" in result.stderr
    assert cluster.kube.events_since(gateway.instance, version) == []


def test_unpullable_image(cluster: Cluster, keys: Keys, tmp_path: Path) -> None:
    image = FAIL_IMAGE.replace("*", "nothing:1")
    with running_gateway(cluster, keys, tmp_path, "e2e-pull", "--image", image) as gateway:
        version = cluster.kube.pod_list(gateway.instance)["metadata"]["resourceVersion"]
        result = gateway.run("echo should-not-run")
        assert result.returncode != 0 and b"should-not-run" not in result.stdout
        assert re.search(rb"ErrImagePull|ImagePullBackOff", result.stderr), result.stderr
        cluster.kube.wait_no_pods(gateway.instance)
        events = cluster.kube.events_since(gateway.instance, version)
        assert [kind for kind, _ in events][:1] == ["ADDED"], events  # created, then deleted
        assert gateway.proc.poll() is None


# == gateway shutdown and restart =============================================================

def test_sigterm_deletes_every_pod(cluster: Cluster, keys: Keys, tmp_path: Path) -> None:
    gateway = start_gateway(cluster, keys, tmp_path, "e2e-term", "--grace", "2")
    clients = [spawn(gateway.ssh("hostname; exec sleep 600")) for _ in range(2)]
    try:
        pods = {first_line(client) for client in clients}
        assert len(pods) == 2 and cluster.kube.names(gateway.instance) == pods
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(60) == 0, gateway.log()
        cluster.kube.wait_no_pods(gateway.instance, timeout=10)
        for client in clients:
            client.wait(20)
            assert client.returncode != 0
    finally:
        stop_process(gateway.proc, signal.SIGKILL)
        for client in clients:
            stop_process(client, signal.SIGKILL)


def test_sigkill_then_restart_removes_orphans(cluster: Cluster, keys: Keys, tmp_path: Path,
                                              gateway: GatewayProcess) -> None:
    bystander = spawn(gateway.ssh("hostname; exec sleep 600"))  # another instance's pod
    short_lease = tmp_path / "lease.yaml"
    short_lease.write_text("lease: {duration: 3s, renewInterval: 1s}\n")
    lease = ("--config", str(short_lease))
    first = start_gateway(cluster, keys, tmp_path, "e2e-orphans", *lease)
    client = spawn(first.ssh("hostname; exec sleep 600"))
    try:
        other = first_line(bystander)
        orphan = first_line(client)
        assert cluster.kube.names(first.instance) == {orphan}
        stop_process(first.proc, signal.SIGKILL)
        killed = time.monotonic()
        client.wait(20)  # the connection died with the gateway
        time.sleep(1)
        assert cluster.kube.names(first.instance) == {orphan}, "the orphan stays until a restart"
        # A restart under the same name is refused while the killed run's Lease is live
        # (tests/test_replicas.py); once it has expired, the restart sweeps the orphan.
        time.sleep(max(0.0, killed + 3.5 - time.monotonic()))
        with running_gateway(cluster, keys, tmp_path, "e2e-orphans", *lease) as second:
            cluster.kube.wait_no_pods(second.instance, timeout=20)
            assert cluster.kube.names(gateway.instance) == {other}, "other instances untouched"
            result = second.run("hostname")
            assert result.returncode == 0, result.stderr
    finally:
        stop_process(first.proc, signal.SIGKILL)
        for proc in (client, bystander):
            stop_process(proc, signal.SIGKILL)
