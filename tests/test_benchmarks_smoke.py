"""CI smoke of both harnesses: ``benchmarks.gateway --quick`` and a short fault-injecting soak.

Each runs as a real subprocess (as a user would run it) and writes JSON; the
tests check the keys and that the values are sane -- bytes moved at a real
rate, latencies positive and bounded, the concurrency fleet without errors,
the soak passed with no leaks, and every scenario that moves data succeeded at
least once with its output checked (transfers by SHA-256). The subprocess
timeouts leave room for a loaded 2-core machine: the soak's is derived from its
own parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak import CLIENT_DEADLINE, SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def run_module(args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", *args, "--json", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_gateway_benchmark_quick(tmp_path: Path) -> None:
    # --quick takes ~30 s on an idle machine (it also moves its data once more with session
    # recording on); a loaded 2-core one may need several times that
    r = run_module(["benchmarks.gateway", "--quick"], tmp_path / "bench.json", 600)
    systems = {"gateway", "gateway_metrics", "asyncssh", "kube"} | (
        {"sshd"} if r["sshd"] else set())
    assert set(r["datapath"]) == systems
    recording = r["recording"]
    assert recording["files"] >= 1 and recording["bytes_written"] > 0, recording
    assert recording["download_mib_s_ratio"] > 0 and recording["upload_mib_s_ratio"] > 0
    for name, dp in r["datapath"].items():
        assert 1 < dp["download_mib_s"] < 100_000, (name, dp)
        assert 1 < dp["upload_mib_s"] < 100_000, (name, dp)
        assert 0 < dp["key_p50_ms"] <= dp["key_p99_ms"] < 1000, (name, dp)
    for name, fw in r["forward"].items():  # ssh -L through the gateway vs a direct port-forward
        assert 1 < fw["download_mib_s"] < 100_000 and 1 < fw["upload_mib_s"] < 100_000, (name, fw)
    assert set(r["forward"]) == {"gateway", "kube"}
    assert r["datapath"]["gateway"]["cpu_s_per_gib_gateway"] > 0
    assert r["datapath"]["gateway_metrics"]["cpu_s_per_gib_gateway"] > 0
    setup = r["setup"]["gateway"]
    for part in ("handshake_ms", "pod_start_ms", "exec_start_ms"):
        assert setup[part]["n"] == r["config"]["setups"], part
        assert 0 < setup[part]["p50"] < setup["total_ms"]["p50"], (part, setup)
    parts = sum(setup[p]["p50"] for p in ("handshake_ms", "pod_start_ms", "exec_start_ms"))
    assert parts == pytest.approx(setup["total_ms"]["p50"], rel=0.5)
    # the kube baseline is cut at the same request-log points: every setup joined
    kube = r["datapath"]["kube"]
    assert kube["setups_joined"] == r["config"]["setups"], kube
    for s in kube["setups"]:
        assert 0 < s["create_to_ready_ms"] < 1000 * (s["t_first"] - s["t0"])
    assert 0 < kube["exec_start_ms"] < kube["pod_start_ms"]
    delete = setup["disconnect_to_delete_ms"]
    assert delete["n"] == r["config"]["setups"] and 0 < delete["p50"] < 5000
    idle = r["idle"]["gateway"]
    assert idle["errors"] == 0 and idle["pss_kib_per_idle_connection"] < 10_000
    (level,) = r["concurrency"].values()
    assert level["errors"] == 0 and level["connections"] == 10
    assert level["first_byte_ms"]["n"] == 10 and level["disconnect_to_delete_ms"]["n"] == 10
    assert level["cluster_tree"]["processes"] > 10  # every connection had a real pod


@pytest.mark.needs("ssh", "sftp", "scp")
def test_soak_short(tmp_path: Path) -> None:
    # 4 rounds of the 7 scenarios, taken in turn. The timeout follows from the run's own
    # bounds: launching stops after --duration, the last scenario may take 3 client
    # commands of CLIENT_DEADLINE each (scp) plus --gone-within, then --settle; plus start-up.
    connections, duration, settle, gone_within = 28, 90, 40, 30
    timeout = duration + 3 * CLIENT_DEADLINE + gone_within + settle + 120
    r = run_module(["benchmarks.soak", "--connections", str(connections), "--concurrency", "4",
                    "--duration", str(duration), "--faults", "0.3", "--settle", str(settle),
                    "--gone-within", str(gone_within)], tmp_path / "soak.json", timeout)
    assert r["passed"] is True
    assert r["connections"] == connections
    assert all(v == 0 for v in r["leaks"].values()), r["leaks"]
    assert {"pods", "pod_processes", "gateway_tasks", "fds"} <= set(r["leaks"])
    rows = r["scenarios"]
    assert set(rows) == set(SCENARIOS)
    for name in ("exec", "sftp", "scp", "shell", "signal"):
        assert rows[name]["ok"] > 0, (name, rows[name])
    for name in ("sftp", "scp"):  # every success compared the SHA-256 of the round trip
        assert rows[name]["sha256_verified"] == rows[name]["ok"], rows[name]
    # early-disconnect and kill9 count as ok only after the gateway cleaned up after them
    assert rows["early-disconnect"]["ok"] + rows["kill9"]["ok"] > 0, rows
    # Faults come at random times (about 0.3 a second): a short run may see none bite, so
    # only what did bite is checked here; test_soak_excuses.py checks the matching itself.
    assert set(r["fault_hits"]) <= set(r["fault_kinds"]), r
    for kind, excused in r["excused_by_fault_kind"].items():
        assert kind in r["fault_hits"] and all(row["targets"] for row in excused), excused
    assert r["rss_mib"]["growth_after_warmup"] <= r["rss_mib"]["bound"]
    assert r["samples"] and r["latency_ms"]["p50"] > 0
