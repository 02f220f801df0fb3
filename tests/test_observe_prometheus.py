"""A real Prometheus scrapes a real gateway; the documented config and rules pass promtool."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from observekit import aio, http_get, open_observed

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Debian's prometheus package (tests/run installs it as root)")


def documented(marker: str) -> str:
    """The fenced YAML block right after ``<!-- marker -->`` in docs/operations.md."""
    text = OPERATIONS.read_text()
    after = text.split(f"<!-- {marker} -->\n", 1)[1]
    assert after.startswith("```yaml\n")
    return after[len("```yaml\n"):].split("\n```", 1)[0] + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def promtool(*args: str) -> None:
    done = await trio.run_process(["promtool", *args], capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_prometheus
async def test_documented_rules_and_config_pass_promtool(tmp_path: Path) -> None:
    (tmp_path / "kuberun-rules.yml").write_text(documented("prometheus-rules"))
    (tmp_path / "prometheus.yml").write_text(documented("prometheus-config"))
    await promtool("check", "rules", str(tmp_path / "kuberun-rules.yml"))
    await promtool("check", "config", str(tmp_path / "prometheus.yml"))
    rules = yaml.safe_load(documented("prometheus-rules"))["groups"][0]["rules"]
    assert {"KuberunNotReady", "KuberunPodStartFailures", "KuberunAuthFailureRate"} <= {
        r["alert"] for r in rules}


async def _query(port: int, expr: str) -> list[dict[str, Any]]:
    status, body = await http_get(("127.0.0.1", port),
                                  "/api/v1/query?query=" + urllib.parse.quote(expr))
    assert status == 200, body
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def _wait_for(port: int, expr: str, at_least: float, within: float = 60.0) -> float:
    with trio.fail_after(within):
        while True:
            result = await _query(port, expr)
            if result and float(result[0]["value"][1]) >= at_least:
                return float(result[0]["value"][1])
            await trio.sleep(0.5)


@needs_prometheus
async def test_prometheus_scrapes_the_gateway(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        assert rig.gateway.endpoints.metrics is not None
        mhost, mport = rig.gateway.endpoints.metrics
        (tmp_path / "kuberun-rules.yml").write_text(documented("prometheus-rules"))
        config = yaml.safe_load(documented("prometheus-config"))
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"{mhost}:{mport}"]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                trio.run_process,
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], check=False))
            with trio.fail_after(60):
                while (await _try_get(port, "/-/ready"))[0] != 200:
                    await trio.sleep(0.25)
            for _ in range(2):
                conn = await rig.connect("prom-user")
                result = await aio(conn.run, "echo scraped")
                assert result.stdout == "scraped\n"
                conn.close()
                await aio(conn.wait_closed)
            connections = await _wait_for(port, "sum(containerssh_ssh_connections_total)", 2)
            starts = await _wait_for(port, "sum(kuberun_pod_start_seconds_count)", 2)
            assert (connections, starts) == (2, 2)
            up = await _query(port, 'up{job="kuberun"}')
            assert up and up[0]["value"][1] == "1"
            status, body = await http_get(("127.0.0.1", port), "/api/v1/rules")
            assert status == 200, body
            groups = json.loads(body)["data"]["groups"]
            assert groups and all(rule["health"] == "ok"
                                  for group in groups for rule in group["rules"]), groups
            nursery.cancel_scope.cancel()


async def _try_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        return await http_get(("127.0.0.1", port), path)
    except OSError:
        return 0, b""
