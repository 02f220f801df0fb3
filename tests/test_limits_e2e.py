"""Limits end to end: ``python -m kuberun_trio`` in a subprocess, the real OpenSSH client, and
asyncssh as the attacker.

* keepalive: an ``ssh`` client whose process is stopped (SIGSTOP) loses its pod within
  ``clientAliveInterval * clientAliveCountMax`` (+ the pod delete);
* the OpenSSH client reads the per-user refusal;
* with the gateway's ``RLIMIT_NOFILE`` lowered, one user holding every connection and
  session the configured limits allow cannot lock another user out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_e2e_openssh as e2e
import yaml
from test_e2e_openssh import (
    ENV,
    Cluster,
    GatewayProcess,
    Keys,
    first_line,
    spawn,
    start_gateway,
    stop_process,
    wait_for,
)

pytestmark = e2e.pytestmark
cluster = e2e.cluster
"""The module's own embedded cluster (a subprocess), as in ``test_e2e_openssh``."""
keys = e2e.keys


@contextlib.contextmanager
def gateway_with(cluster: Cluster, keys: Keys, folder: Path, instance: str,
                 config: dict[str, Any]) -> Iterator[GatewayProcess]:
    path = folder / f"{instance}.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(cluster, keys, folder, instance, "--config", str(path))
    try:
        yield gateway
    finally:
        stop_process(gateway.proc)
        cluster.kube.wait_no_pods(instance, timeout=30)


def test_keepalive_frees_the_pod_of_a_vanished_client(cluster: Cluster, keys: Keys,
                                                      tmp_path: Path) -> None:
    interval, count = 1.0, 2
    config = {"ssh": {"clientAliveInterval": f"{interval:g}s", "clientAliveCountMax": count}}
    with gateway_with(cluster, keys, tmp_path, "limits-alive", config) as gateway:
        client = spawn(gateway.ssh("echo ready; exec sleep 600", "-o", "ServerAliveInterval=0"))
        try:
            assert first_line(client) == "ready"
            assert cluster.kube.names(gateway.instance)
            # An idle but live client keeps its pod: it answers the probes.
            time.sleep(3 * interval * count)
            assert client.poll() is None and cluster.kube.names(gateway.instance)
            os.kill(client.pid, signal.SIGSTOP)  # the client vanishes (its kernel still ACKs)
            stopped = time.monotonic()
            wait_for(lambda: not cluster.kube.names(gateway.instance), 20,
                     "the stopped client's pod to be deleted")
            took = time.monotonic() - stopped
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(client.pid, signal.SIGCONT)
            stop_process(client)
        assert took < interval * count + 8, took  # + slack for the delete on a busy machine
        assert "limit client-alive (connection): the client stopped answering keepalives" \
            in gateway.log()


def test_openssh_client_reads_the_per_user_refusal(cluster: Cluster, keys: Keys,
                                                   tmp_path: Path) -> None:
    config = {"security": {"maxConnectionsPerUser": 1}}
    with gateway_with(cluster, keys, tmp_path, "limits-user", config) as gateway:
        first = spawn(gateway.ssh("echo in; exec sleep 600"))
        try:
            assert first_line(first) == "in"
            second = gateway.run("echo second", "-o", "LogLevel=INFO")
            assert second.returncode == 255
            assert b"too many connections for user 'alice' (limit 1)" in second.stderr, \
                second.stderr
            other = gateway.ssh("echo bob", key=None).copy()
            other[-2] = "bob@127.0.0.1"
            result = subprocess.run(other, capture_output=True, env=ENV, timeout=30)
            assert result.stdout == b"bob\n", result.stderr
        finally:
            stop_process(first)
        assert "max-connections-per-user" in gateway.log()


# == file descriptors ===========================================================================

FD_LIMIT = 140


async def _hog(port: int, key_path: Path, connections: int, sessions: int) -> tuple[int, int]:
    """Open as many connections and sessions as the gateway lets mallory have; hold them."""
    import asyncssh

    held: list[Any] = []
    opened_sessions = 0
    try:
        for _ in range(connections):
            try:
                conn = await asyncssh.connect("127.0.0.1", port, username="mallory",
                                              client_keys=[str(key_path)], known_hosts=None)
            except (asyncssh.Error, OSError):
                continue
            held.append(conn)
            for _ in range(sessions):
                try:
                    proc = await asyncio.wait_for(conn.create_process("exec sleep 600"), 30)
                except (asyncssh.Error, OSError, TimeoutError):
                    break
                held.append(proc)
                opened_sessions += 1
        return len([h for h in held if isinstance(h, asyncssh.SSHClientConnection)]), \
            opened_sessions
    finally:
        _HELD.extend(held)


_HELD: list[Any] = []


async def _release() -> None:
    for item in _HELD:
        item.close()
    _HELD.clear()
    await asyncio.sleep(0.5)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_one_user_cannot_lock_others_out_when_fds_run_short(
        cluster: Cluster, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The configured limits let one user hold 12 x (1 + 10) = 132 fds: more than the
    # process has. The gateway must stop mallory before the fds run out.
    config = {"security": {"maxConnectionsPerUser": 12, "maxSessions": 10, "fdReserve": 24},
              "ssh": {"maxStartups": "50", "maxStartupsPerAddress": 50}}
    path = tmp_path / "fds.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(e2e, "GATEWAY", ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--",
                                         *e2e.GATEWAY])  # prlimit execs: same pid
    gateway = start_gateway(cluster, keys, tmp_path, "limits-fds", "--config", str(path))
    loop = asyncio.new_event_loop()
    try:
        limit = int(Path(f"/proc/{gateway.proc.pid}/limits").read_text().split(
            "Max open files")[1].split()[0])
        assert limit == FD_LIMIT
        conns, sessions = loop.run_until_complete(
            asyncio.wait_for(_hog(gateway.port, keys.client, 12, 10), 240))
        fds = len(os.listdir(f"/proc/{gateway.proc.pid}/fd"))
        # alice, with the OpenSSH client, still gets in and runs a command
        result = gateway.run("echo alice-in", timeout=60)
        assert result.returncode == 0, (result.stderr, fds, conns, sessions)
        assert result.stdout == b"alice-in\n"
        assert fds < FD_LIMIT, (fds, conns, sessions)
        assert conns + sessions < 12 * 11, "the fd share did not stop mallory"
        assert gateway.proc.poll() is None
        log = gateway.log()
        assert "fd-share" in log, log[-3000:]
        assert "Too many open files" not in log, log[-3000:]
    finally:
        loop.run_until_complete(_release())
        loop.close()
        stop_process(gateway.proc)
        cluster.kube.wait_no_pods(gateway.instance, timeout=60)


@pytest.fixture(autouse=True)
def _no_leftover_clients() -> Iterator[None]:
    yield
    assert not _HELD
