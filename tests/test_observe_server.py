"""Metrics and health in ``python -m kuberun_trio``: the demo's endpoint, the config keys."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import trio
from observekit import http_get, value
from test_server_cli import (
    create_pods,
    known_hosts_line,
    make_keys,
    running,
    server_args,
    ssh,
    stop,
)

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.server.keys import ensure_private_key


def url(banner: str, what: str) -> tuple[str, int, str]:
    match = re.search(rf"^{what} at http://([0-9.]+):([0-9]+)(/\S*)$", banner, re.M)
    assert match, banner
    return match[1], int(match[2]), match[3]


async def test_demo_serves_metrics_on_the_next_free_port(tmp_path: Path) -> None:
    """Two demos at once: both want 127.0.0.1:9100; the second (at least) moves on."""
    args = ["--listen", "127.0.0.1:0"]
    async with running(tmp_path, [*args, "--state-dir", str(tmp_path / "a")],
                       b"user@127.0.0.1") as first, \
            running(tmp_path, [*args, "--state-dir", str(tmp_path / "b")],
                    b"user@127.0.0.1") as second:
        host, port1, path = url(first.banner, "metrics")
        _, port2, _ = url(second.banner, "metrics")
        assert (host, path) == ("127.0.0.1", "/metrics")
        assert port1 != port2 and min(port1, port2) >= 9100 and max(port1, port2) <= 9200
        for port in (port1, port2):
            status, body = await http_get((host, port), path)
            assert status == 200
            assert value(body, "containerssh_ssh_current_connections", country="XX") == 0
        assert "health at" not in first.banner  # health stays off unless configured
        assert await stop(first) == 0
        assert await stop(second) == 0


async def test_configured_endpoints_count_orphans_and_serve_sessions(
        cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    await create_pods(cluster, ["gw-m", "gw-m"])
    config = tmp_path / "config.yaml"
    config.write_text("metrics: {enable: true, listen: '127.0.0.1:0', path: /prom}\n"
                      "health: {enable: true, listen: '127.0.0.1:0'}\n")
    args = server_args(cluster, keys, "gw-m", "--config", str(config))
    async with running(tmp_path, args, b"/readyz\n") as server:
        mhost, mport, path = url(server.banner, "metrics")
        hhost, hport, _ = url(server.banner, "health")
        assert path == "/prom"
        with trio.fail_after(20):
            while (await http_get((hhost, hport), "/readyz"))[0] != 200:
                await trio.sleep(0.1)
        keys.known_hosts.write_text(known_hosts_line(
            "127.0.0.1", server.port, ensure_private_key(keys.host)[0]) + "\n")
        result = await ssh(keys.ssh_argv(server.port), "printf hello")
        assert (result.returncode, result.stdout) == (0, b"hello"), result.stderr
        status, body = await http_get((mhost, mport), "/prom")
        assert status == 200
        assert value(body, "kuberun_orphan_pods_deleted_total") == 2
        assert value(body, "containerssh_auth_success_total", authtype="pubkey",
                     country="XX") == 1
        assert value(body, "kuberun_ready") == 1
        assert await stop(server) == 0


async def test_a_taken_metrics_port_is_a_clear_error(
        cluster: EmbeddedCluster, tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(f"metrics: {{enable: true, listen: '127.0.0.1:{port}'}}\n")
        args = server_args(cluster, keys, "gw-taken", "--config", str(config))
        result = await trio.run_process([sys.executable, "-m", "kuberun_trio", *args],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 1
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith(f"error: cannot serve the metrics endpoint on 127.0.0.1:{port}: "), last
