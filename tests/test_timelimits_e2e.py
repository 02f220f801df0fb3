"""Session time limits end to end: ``python -m kuberun_trio`` with short limits and the real
OpenSSH client.

* idle: the warning, then SIGTERM and ``session idle time limit reached``, exit status
  255, the pod deleted, ``connection-end`` with ``end=idle``;
* a session whose output keeps flowing is not idle;
* max duration: a busy process that ignores SIGTERM is ended after the grace period; the
  pod carries ``activeDeadlineSeconds`` = duration + grace + podStop.
"""

from __future__ import annotations

import time
from pathlib import Path

import test_e2e_openssh as e2e
from test_e2e_openssh import Cluster, Keys, first_line, spawn, stop_process, wait_for
from test_limits_e2e import gateway_with

pytestmark = e2e.pytestmark
cluster = e2e.cluster
keys = e2e.keys

SHORT = {"timeoutWarning": "1s", "timeoutGracePeriod": "1s"}


def test_idle_session_is_warned_then_ended(cluster: Cluster, keys: Keys,
                                           tmp_path: Path) -> None:
    config = {"ssh": {"idleTimeout": "2s", **SHORT}}
    with gateway_with(cluster, keys, tmp_path, "tl-idle", config) as gateway:
        started = time.monotonic()
        tty = spawn(gateway.ssh("echo ready; exec sleep 600", "-tt"))  # a pty session, too
        # the client's keepalives (every second, answered) are not activity
        result = gateway.run("echo ready; exec sleep 600", "-o", "ServerAliveInterval=1",
                             timeout=60)
        took = time.monotonic() - started
        tty_out, tty_err = tty.communicate(timeout=30)
        assert tty.returncode == 255
        assert b"kuberun: session idle time limit reached\r\n" in tty_out + tty_err
        assert result.returncode == 255, result
        assert result.stdout == b"ready\n"
        err = result.stderr.decode()
        assert "kuberun: this connection is idle; it will be closed in 1 s" in err, err
        assert err.count("kuberun: session idle time limit reached") == 1, err
        assert took < 30, took
        wait_for(lambda: not cluster.kube.names(gateway.instance), 30, "the pod to be deleted")
        log = gateway.log()
        assert "event=time-limit" in log or '"time-limit"' in log or "time limit" in log, log
        assert "end=idle" in log, log


def test_busy_session_is_not_idle(cluster: Cluster, keys: Keys, tmp_path: Path) -> None:
    config = {"ssh": {"idleTimeout": "2s", **SHORT}}
    with gateway_with(cluster, keys, tmp_path, "tl-busy", config) as gateway:
        result = gateway.run("for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.5; done",
                             timeout=60)
        assert result.returncode == 0, result
        assert result.stdout.split() == [str(i).encode() for i in range(1, 11)]
        assert b"idle" not in result.stderr, result.stderr


def test_max_duration_ends_a_process_that_ignores_sigterm(cluster: Cluster, keys: Keys,
                                                          tmp_path: Path) -> None:
    config = {"ssh": {"maxSessionDuration": "4s", **SHORT},
              "kubernetes": {"timeouts": {"podStop": "5s"}}}
    with gateway_with(cluster, keys, tmp_path, "tl-max", config) as gateway:
        client = spawn(gateway.ssh("trap '' TERM; echo ready; "
                                   "while :; do echo tick; sleep 0.2; done"))
        try:
            assert first_line(client) == "ready"
            (pod,) = cluster.kube.pods(gateway.instance)
            assert pod["spec"]["activeDeadlineSeconds"] == 4 + 1 + 5
            _, stderr = client.communicate(timeout=30)
            assert client.returncode == 255
        finally:
            stop_process(client)
        err = stderr.decode()
        assert "reaches its time limit of 4 s in 1 s" in err, err
        assert "kuberun: session time limit reached" in err, err
        wait_for(lambda: not cluster.kube.names(gateway.instance), 30, "the pod to be deleted")
        assert "end=max-duration" in gateway.log()
