"""``python -m kuberun_trio`` as an operator runs it: subprocesses, the real OpenSSH client."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.kube import open_kube_client
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.podtemplate import LABEL_INSTANCE, build_pod
from kuberun_trio.server.keys import ensure_private_key, known_hosts_line, public_key_line

needs_ssh = pytest.mark.needs("ssh", "ssh-keygen")
"""For the tests that drive the OpenSSH client (the rest run the CLI alone)."""


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if home is not None:  # a fresh HOME: no ~/.kube/config, no $KUBECONFIG
        env = {**{k: v for k, v in os.environ.items() if k != "KUBECONFIG"}, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "kuberun_trio", *args], capture_output=True,
                          text=True, timeout=60, env=env)


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


# -- check-config -------------------------------------------------------------------------------

def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    (tmp_path / "kc").write_text(KUBECONFIG)
    path.write_text("ssh: {listen: '0.0.0.0:2022'}\ninstance: gw\n"
                    f"kubernetes: {{connection: {{kubeconfig: {tmp_path / 'kc'}}}}}\n")
    result = cli("check-config", str(path), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{path}: OK (listen 0.0.0.0:2022, instance gw, cluster via kubeconfig)")


def test_check_config_explains_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
ssh: {listen: nowhere, hostKeys: [/no/such/key]}
auth: {authorizedKeys: [/no/such/file], webhook: {url: "https://x", timeout: soon}}
kubernetes: {timeouts: {podStart: 6x}, pod: {metadata: {namespace: Bad_NS}}}
log: {level: chatty}
""")
    result = cli("check-config", str(path), home=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: 8 problems"
    # structure, the files it names and the kubeconfig: all in one run
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "ssh.listen", "auth.webhook.timeout", "log.level", "kubernetes.pod.metadata.namespace",
        "kubernetes.timeouts.podStart", "ssh.hostKeys[0]", "auth.authorizedKeys[0]",
        "kubernetes.connection.kubeconfig"]
    assert "ssh.hostKeys[0]: cannot read /no/such/key" in result.stderr
    assert "auth.authorizedKeys[0]: cannot read /no/such/file" in result.stderr
    assert f"kubeconfig: file not found: {tmp_path}/.kube/config" in result.stderr


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    assert cli("--listen", "nowhere").returncode == 2
    assert cli("check-config").returncode == 2
    path = tmp_path / "bad.yaml"
    path.write_text("log: {format: xml}\n")
    result = cli("--config", str(path), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "log.format: must be text or json" in result.stderr


# -- a running server -----------------------------------------------------------------------------

@attrs.define
class Server:
    proc: trio.Process
    banner: str
    stderr: Path

    @property
    def port(self) -> int:
        first = self.banner.splitlines()[0]
        return int(first.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])

    def log(self) -> str:
        return self.stderr.read_text()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, args: Sequence[str], until: bytes) -> AsyncIterator[Server]:
    errpath = tmp_path / f"server-{trio.current_time()}.log"
    with errpath.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kuberun_trio", *args], stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        out = b""
        with trio.fail_after(30):
            while until not in out:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"server exited: {errpath.read_text()}"
                out += chunk
        yield Server(proc, out.decode(), errpath)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(server: Server, sig: int = signal.SIGTERM) -> int:
    server.proc.send_signal(sig)
    with trio.fail_after(30):
        return await server.proc.wait()


async def ssh(argv: Sequence[str], command: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [*argv, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", command],
            capture_stdout=True, capture_stderr=True, check=False, **kw)
    return result


@needs_ssh
@attrs.define
class Streaming:
    """An ``ssh`` client whose stdout is read as it arrives."""

    proc: trio.Process
    buffer: bytes = b""

    async def line(self) -> bytes:
        """The next line of output (with its newline)."""
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            chunk = await self.proc.stdout.receive_some(4096)
            assert chunk, f"ssh closed its output before a full line: {self.buffer!r}"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    async def rest(self) -> bytes:
        """Everything else it prints until it closes its output."""
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self.buffer += chunk
        rest, self.buffer = self.buffer, b""
        return rest


async def ssh_streaming(argv: Sequence[str], command: str,
                        task_status: trio.TaskStatus[Streaming] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """Run ``ssh`` in the caller's nursery; hands back a :class:`Streaming` at once."""
    proc = await trio.lowlevel.open_process(
        [*argv, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        task_status.started(Streaming(proc))
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


async def test_demo_mode_prints_a_working_ssh_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--listen", "127.0.0.1:0"]
    async with running(tmp_path, args, b"user@127.0.0.1") as server:
        command = server.banner.splitlines()[-1].strip()
        assert command.startswith(f"ssh -i {state}/client_ed25519 -p {server.port} ")
        assert f"-o UserKnownHostsFile={state}/known_hosts" in command
        host_line = server.banner.splitlines()[1]
        assert host_line.endswith(f"{state}/host_ed25519 (generated)")
        result = await ssh(shlex.split(command), "echo hello; echo oops >&2; exit 3")
        assert (result.returncode, result.stdout, result.stderr) == (3, b"hello\n", b"oops\n")
        assert await stop(server) == 0
    for name in ("host_ed25519", "client_ed25519"):
        assert os.stat(state / name).st_mode & 0o777 == 0o600
    fingerprint = host_line.split()[2]
    listed = await trio.run_process(["ssh-keygen", "-lf", str(state / "host_ed25519")],
                                    capture_stdout=True)
    assert listed.stdout.decode().split()[1] == fingerprint


@attrs.frozen
class Keys:
    host: Path
    client: Path
    authorized: Path
    known_hosts: Path

    def ssh_argv(self, port: int) -> list[str]:
        return ["ssh", "-i", str(self.client), "-p", str(port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "alice@127.0.0.1"]


def make_keys(tmp_path: Path) -> Keys:
    host, _ = ensure_private_key(tmp_path / "host_key")
    client, _ = ensure_private_key(tmp_path / "client_key")
    (tmp_path / "authorized_keys").write_text(public_key_line(client) + "\n")
    keys = Keys(tmp_path / "host_key", tmp_path / "client_key", tmp_path / "authorized_keys",
                tmp_path / "known_hosts")
    keys.known_hosts.write_text(known_hosts_line("127.0.0.1", 0, host) + "\n")
    return keys


def server_args(cluster: EmbeddedCluster, keys: Keys, instance: str, *more: str) -> list[str]:
    return ["--kubeconfig", str(cluster.kubeconfig_path), "--instance", instance,
            "--listen", "127.0.0.1:0", "--host-key", str(keys.host),
            "--authorized-keys", str(keys.authorized), "--log-format", "json", *more]


def kube_config(cluster: EmbeddedCluster) -> KubernetesConfig:
    return parse_config({"connection": {"kubeconfig": str(cluster.kubeconfig_path)}})


async def create_pods(cluster: EmbeddedCluster, instances: Sequence[str]) -> list[str]:
    """Pods labelled as a gateway instance would label them (no gateway involved)."""
    names = []
    async with open_aio_loop(), open_kube_client(kube_config(cluster)) as kube:
        for i, instance in enumerate(instances):
            body = build_pod(KubernetesConfig.default(), connection_id=f"orphan{i}",
                             username="u", client_address="10.0.0.1:1", instance=instance,
                             auth_metadata={}, auth_env={})
            created = await kube.create_pod("default", body)
            names.append(created["metadata"]["name"])
    return names


def live_pods(cluster: EmbeddedCluster) -> dict[str, str]:
    """Name -> instance label of the pods not being deleted."""
    return {p["metadata"]["name"]: p["metadata"]["labels"].get(LABEL_INSTANCE, "")
            for p in cluster.pods() if not p["metadata"].get("deletionTimestamp")}


async def wait_for(predicate: Any, seconds: float = 20) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.05)


async def test_gc_dry_run_then_delete(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    mine = await create_pods(cluster, ["gc-me", "gc-me", "someone-else"])
    base = ["gc", "--kubeconfig", str(cluster.kubeconfig_path), "--instance", "gc-me"]
    dry = await trio.run_process([sys.executable, "-m", "kuberun_trio", *base, "--dry-run"],
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.decode().splitlines()
    assert sorted(lines[:2]) == sorted(f"would delete pod default/{n}" for n in mine[:2])
    assert lines[2] == "would delete 2 pods of instance gc-me in namespace default"
    assert sorted(live_pods(cluster).values()) == ["gc-me", "gc-me", "someone-else"]
    real = await trio.run_process([sys.executable, "-m", "kuberun_trio", *base],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert real.returncode == 0, real.stderr
    assert real.stdout.decode().splitlines()[-1].startswith("deleted 2 pods of instance gc-me")
    await wait_for(lambda: list(live_pods(cluster).values()) == ["someone-else"])


@needs_ssh
async def test_orphans_swept_sessions_served_sigterm_deletes_pods(
        cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    await create_pods(cluster, ["gw-a", "gw-b"])  # gw-a's orphan; gw-b is another gateway
    args = server_args(cluster, keys, "gw-a", "--grace", "2")
    async with running(tmp_path, args, b"host key") as server:
        await wait_for(lambda: sorted(live_pods(cluster).values()) == ["gw-b"])
        keys.known_hosts.write_text(known_hosts_line(
            "127.0.0.1", server.port, ensure_private_key(keys.host)[0]) + "\n")
        argv = keys.ssh_argv(server.port)
        result = await ssh(argv, "printf hello")
        assert (result.returncode, result.stdout) == (0, b"hello"), result.stderr
        async with trio.open_nursery() as nursery:
            long = await nursery.start(ssh_streaming, argv, "echo started; exec sleep 60")
            with trio.fail_after(30):  # the session's exec runs: its first line arrived
                assert await long.line() == b"started\n"
            assert await stop(server) == 0
            with trio.fail_after(30):
                assert await long.rest() == b""
                returncode = await long.proc.wait()
        assert returncode != 0  # cut by the shutdown, not finished
        assert sorted(live_pods(cluster).values()) == ["gw-b"]
        log = server.log()
        assert '"event": "shutdown-requested"' in log
        assert '"event": "shutdown-complete"' in log


@needs_ssh
async def test_a_second_signal_forces_the_exit(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    args = server_args(cluster, keys, "gw-force", "--grace", "30")
    async with running(tmp_path, args, b"host key") as server:
        keys.known_hosts.write_text(known_hosts_line(
            "127.0.0.1", server.port, ensure_private_key(keys.host)[0]) + "\n")
        async with trio.open_nursery() as nursery:
            session = await nursery.start(ssh_streaming, keys.ssh_argv(server.port),
                                          "echo started; exec sleep 60")
            with trio.fail_after(30):
                assert await session.line() == b"started\n"
            server.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: '"event": "shutdown-requested"' in server.log(), seconds=10)
            with trio.fail_after(10):  # well before the 30 s grace period
                assert await stop(server, signal.SIGINT) == 1
        await wait_for(lambda: "gw-force" not in live_pods(cluster).values())
        assert '"event": "shutdown-forced"' in server.log()


@needs_ssh
async def test_sighup_reloads_authorized_keys(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    authorized = keys.authorized.read_text()
    keys.authorized.write_text("")
    async with running(tmp_path, server_args(cluster, keys, "gw-hup"), b"host key") as server:
        keys.known_hosts.write_text(known_hosts_line(
            "127.0.0.1", server.port, ensure_private_key(keys.host)[0]) + "\n")
        refused = await ssh(keys.ssh_argv(server.port), "true")
        assert refused.returncode == 255 and b"Permission denied" in refused.stderr
        assert live_pods(cluster) == {}
        keys.authorized.write_text(authorized)
        server.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: '"event": "reload"' in server.log(), seconds=10)
        accepted = await ssh(keys.ssh_argv(server.port), "echo in")
        assert accepted.stdout == b"in\n"
        assert await stop(server) == 0


async def test_bind_failure_is_a_runtime_error(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = server_args(cluster, keys, "gw-bind", "--listen", f"127.0.0.1:{port}")
        result = await trio.run_process([sys.executable, "-m", "kuberun_trio", *args],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1].startswith("error: ")
