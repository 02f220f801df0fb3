"""Port forwarding end to end: ``ssh -L`` / ``-D`` / ``-R`` (OpenSSH) and curl against
``python -m kuberun_trio`` with ``security.forwarding.forwardingMode: enable``, on a
standalone embedded cluster (subprocesses, as in ``test_e2e_openssh``).

The embedded cluster's pods share this host's network, so a server started in the pod
listens on a free port of this host; a file it serves lives in the test's directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_e2e_openssh as e2e
import yaml
from test_e2e_openssh import ENV, Cluster, GatewayProcess, Keys, start_gateway, wait_for

pytestmark = [e2e.pytestmark, pytest.mark.needs("curl")]
cluster = e2e.cluster
keys = e2e.keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def fwd_gateway(cluster: Cluster, keys: Keys,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("fwd")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"security": {"forwarding": {"forwardingMode": "enable"}}}))
    gateway = start_gateway(cluster, keys, folder, "e2e-fwd", "--config", str(config))
    try:
        yield gateway
    finally:
        e2e.stop_process(gateway.proc)
        cluster.kube.wait_no_pods("e2e-fwd", timeout=30)


@pytest.fixture
def gateway(fwd_gateway: GatewayProcess, cluster: Cluster) -> Iterator[GatewayProcess]:
    yield fwd_gateway
    assert fwd_gateway.proc.poll() is None, fwd_gateway.log()
    cluster.kube.wait_no_pods(fwd_gateway.instance)


@contextlib.contextmanager
def ssh_bg(gateway: GatewayProcess, command: str | None, *options: str,
           stderr: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """An ``ssh`` client running in the background (stopped and reaped at the end); its
    stderr goes to the file ``stderr`` (if given)."""
    argv = gateway.ssh(command, "-o", "ExitOnForwardFailure=yes", *options,
                       *(["-N"] if command is None else []))
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(stderr.open("wb")) if stderr is not None else \
            subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV)
        try:
            yield proc
        finally:
            e2e.stop_process(proc)


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--noproxy", "", *args], capture_output=True,
                          env=ENV, timeout=timeout)


def serve_http(folder: Path, port: int) -> str:
    """The command that serves ``folder`` over HTTP on ``port`` inside the pod."""
    return (f"exec {sys.executable} -m http.server {port} --bind 127.0.0.1 "
            f"--directory {folder}")


def wait_http(url: str, *socks: str) -> None:
    """Until the pod's server answers through the forward (it takes a moment to start)."""
    def answered() -> bool:
        return curl(*socks, "-o", "/dev/null", "-f", url, timeout=10).returncode == 0

    wait_for(answered, 30, f"{url} to answer")


@pytest.mark.parametrize("size", [
    4 * 1024 * 1024,
    pytest.param(256 * 1024 * 1024, marks=pytest.mark.slow, id="256MiB"),
])
def test_local_and_dynamic_forward_to_a_server_in_the_pod(gateway: GatewayProcess,
                                                          tmp_path: Path, size: int) -> None:
    blob = tmp_path / "blob"
    with blob.open("wb") as f:
        for _ in range(size // (1024 * 1024)):
            f.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    pod_port, local, socks = free_port(), free_port(), free_port()
    with ssh_bg(gateway, serve_http(tmp_path, pod_port), "-L",
                f"127.0.0.1:{local}:localhost:{pod_port}", "-D", f"127.0.0.1:{socks}") as ssh:
        url = f"http://127.0.0.1:{local}/blob"
        wait_http(url)
        got = curl("-o", str(tmp_path / "got"), url)
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256((tmp_path / "got").read_bytes()).hexdigest() == digest
        # ssh -D: SOCKS through the same path, the pod named by its loopback name
        proxied = curl("--socks5-hostname", f"127.0.0.1:{socks}", "-o", str(tmp_path / "s"),
                       f"http://localhost:{pod_port}/blob")
        assert proxied.returncode == 0, proxied.stderr
        assert hashlib.sha256((tmp_path / "s").read_bytes()).hexdigest() == digest
        assert ssh.poll() is None
    log = gateway.log()
    assert f"forward to localhost:{pod_port} ended" in log


def test_forward_to_a_port_where_nothing_listens(gateway: GatewayProcess,
                                                 tmp_path: Path) -> None:
    closed, local = free_port(), free_port()
    with ssh_bg(gateway, None, "-o", "LogLevel=INFO", "-L",
                f"127.0.0.1:{local}:127.0.0.1:{closed}", stderr=tmp_path / "err") as ssh:
        wait_for(lambda: ssh.poll() is not None or _listening(local), 30, "ssh -L to listen")
        result = curl(f"http://127.0.0.1:{local}/", timeout=30)
        assert result.returncode != 0
    err = (tmp_path / "err").read_text()
    # the client's open failed (not accepted and then reset), and says why
    assert "open failed: connect failed" in err and "connection refused" in err, err
    line = wait_for(lambda: _line(gateway, "forward-failed", f"127.0.0.1:{closed}"), 10,
                    "the forward-failed log line")
    assert "connection refused" in line


def test_forward_to_another_host_is_refused(gateway: GatewayProcess, tmp_path: Path) -> None:
    local = free_port()
    with ssh_bg(gateway, None, "-o", "LogLevel=INFO", "-L",
                f"127.0.0.1:{local}:example.com:80", stderr=tmp_path / "err") as ssh:
        wait_for(lambda: ssh.poll() is not None or _listening(local), 30, "ssh -L to listen")
        assert curl(f"http://127.0.0.1:{local}/", timeout=30).returncode != 0
    err = (tmp_path / "err").read_text()
    assert "administratively prohibited: only the pod itself" in err, err
    line = wait_for(lambda: _line(gateway, "request-refused", "example.com:80"), 10,
                    "the request-refused log line")
    assert "podNetworkCommand is not set" in line


def test_remote_forward_is_refused(gateway: GatewayProcess) -> None:
    result = gateway.run("true", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22")
    assert result.returncode == 255
    assert b"remote port forwarding failed" in result.stderr, result.stderr
    line = wait_for(lambda: _line(gateway, "request-refused", "tcpip-forward"), 10,
                    "the request-refused log line")
    assert "Kubernetes has no reverse port-forward" in line


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        time.sleep(0.05)
        return False


def _line(gateway: GatewayProcess, event: str, needle: str) -> str | None:
    for line in gateway.log().splitlines():
        if event in line and needle in line:
            return line
    return None
