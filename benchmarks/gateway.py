"""The gateway benchmark: every metric against its baselines, side by side, in one run.

``python -m benchmarks.gateway [--quick] [--json FILE] [--mib N] [--levels 100,500,1000]``

Theory of operation
-------------------
This process only orchestrates: it runs no event loop. Every party is its own
process, so CPU time and memory can be read per party from ``/proc``:

* the embedded cluster (:mod:`.benchcluster`: HTTPS, its request log on tap);
* the gateway (:mod:`.gateway_datapath` ``--serve-gateway``: the library's
  ``open_gateway`` with a kubeconfig pointing at that cluster);
* baseline 1, asyncssh on plain asyncio running the same commands locally
  (:mod:`.gateway_datapath` ``--serve-baseline``; never imports trio_asyncio);
* baseline 2, OpenSSH's ``sshd`` on a loopback port with its own config, host
  key and authorized_keys in a temp dir (installed with apt-get when missing
  and root, except with ``--quick``);
* baseline 3, kubernetes-asyncio straight to the embedded cluster (no SSH): exec,
  and for ``ssh -L`` throughput a ``pods/portforward`` WebSocket to the same data
  server the gateway's direct-tcpip channel reaches (``benchclient forward``);
* clients (:mod:`.benchclient`): asyncssh / kubernetes-asyncio on plain asyncio.

Clock: all processes stamp with ``time.monotonic()``; the cluster converts its
request log to that clock, so client times (auth complete, first byte, close)
line up with API events (exec request received, DELETE received). Connection
setup splits into *handshake* (TCP connect → auth complete, client side),
*pod start* (auth complete → the exec request reaches the API server: the
gateway creates the pod, waits until it is Ready and opens the exec
WebSocket), and *exec start* (exec request received → first byte of output at
the client). The kube baseline is cut at the same points, with the same
request log: *pod start* is create request sent → its exec request received
(create, Ready, WebSocket connect), *exec start* is exec request received →
first byte; so the ``gw/kube`` ratios compare like with like (the gateway's
side adds only the SSH channel and its own bookkeeping).

Memory per idle connection is ``(PSS with N idle shells - PSS with 0) / N`` of
the server process(es) alone (for sshd: every ``sshd*`` process). CPU per GiB is
the server's ``utime + stime`` over the download + upload phase divided by the
GiB moved. Goals from issue 6 are printed next to the numbers, not asserted.
Mass disconnects split into *exec closed* (client close → the exec stream's
Close reaches the API server) and *DELETE*; the JSON keeps every connection's
timeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .procstats import children, comm, cpu_seconds, percentile, pss_kib, raise_fd_limit

MiB = 1024 * 1024
LOG_DIR: Path | None = None
"""Where the parties' stderr goes (``--logs``); default: the run's temp dir."""
FLEET_PER_CLIENT = 500
"""Connections per fleet client process."""


class Party:
    """One child process speaking lines on stdin/stdout; stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *,
                 terminate: bool = False) -> None:
        self.name = name
        self.terminate = terminate
        """Stop with SIGTERM (sshd) instead of closing stdin."""
        self.errfile = (LOG_DIR or workdir) / f"{name}.stderr"
        self._err: IO[bytes] = open(self.errfile, "wb")  # noqa: SIM115 -- closed in stop()
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): "
                               f"{self.errfile.read_text()[-2000:]}")
        return line

    def ask(self, line: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.readline())

    def stop(self, timeout: float = 60) -> None:
        if self.terminate and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def client(mode: str, params: dict[str, Any], workdir: Path,
           on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run a benchclient to completion; its last JSON line is the result."""
    party = Party(f"client-{mode}", python("-m", "benchmarks.benchclient", mode,
                                           json.dumps(params)), workdir)
    try:
        while True:
            line = json.loads(party.readline())
            if "mark" in line and on_line is not None:
                on_line(line)
            elif "mark" not in line:
                result: dict[str, Any] = line
                party.stop()
                if party.proc.returncode:
                    raise RuntimeError(f"client {mode} failed")
                return result
    finally:
        party.stop()


# ----------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_sshd(install: bool) -> str | None:
    path = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if path is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing openssh-server for the sshd baseline ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=False, env=env,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("sshd") or ("/usr/sbin/sshd"
                                        if os.path.exists("/usr/sbin/sshd") else None)
    return path


def start_sshd(sshd: str, workdir: Path, host_key: Path, pub: Path) -> tuple[Party, int]:
    port = free_port()
    conf = workdir / "sshd_config"
    conf.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {pub}
PidFile {workdir}/sshd.pid
UsePAM no
PermitRootLogin yes
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com
MaxStartups 2000
MaxSessions 100
LogLevel ERROR
""")
    os.makedirs("/run/sshd", exist_ok=True)
    party = Party("sshd", [sshd, "-D", "-e", "-f", str(conf)], workdir, terminate=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return party, port
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen: {party.errfile.read_text()[-1000:]}")


def sshd_pids(listener: int) -> list[int]:
    return [listener, *(p for p in children(listener) if comm(p).startswith("sshd"))]


# ----------------------------------------------------------------- measurements


def measure_datapath(port: int, user: str, ctx: dict[str, Any],
                     cpu_pids: dict[str, int]) -> dict[str, Any]:
    cpu0: dict[str, float] = {}

    def mark(_: dict[str, Any]) -> None:
        cpu0.update({name: cpu_seconds(pid) for name, pid in cpu_pids.items()})

    params = {"port": port, "user": user, "key": ctx["key"], "data": ctx["data"],
              "keys": ctx["keys"]}
    result = client("datapath", params, ctx["workdir"], mark)
    gib = 2 * ctx["mib"] / 1024
    for name, pid in cpu_pids.items():
        result[f"cpu_s_per_gib_{name}"] = (cpu_seconds(pid) - cpu0[name]) / gib
    return result


def measure_with_metrics(host: Path, pub: Path, kubeconfig: Path, kube_cfg: dict[str, Any],
                         ctx: dict[str, Any], cluster: Party,
                         parties: list[Party]) -> dict[str, Any]:
    """The data path through a second gateway that serves metrics, scraped every second
    (as Prometheus would) while the bytes flow: its CPU per GiB against the first's."""
    import threading
    import urllib.request

    gateway = Party("gateway-metrics", python(
        "-m", "benchmarks.gateway_datapath", "--serve-gateway", str(host), str(pub),
        "--kubeconfig", str(kubeconfig), "--kube-config", json.dumps(kube_cfg), "--metrics"),
        ctx["workdir"])
    parties.append(gateway)
    port, metrics_port = int(gateway.readline()), int(gateway.readline())
    stop, scrapes = threading.Event(), [0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def scrape() -> None:
        while not stop.wait(1.0):
            with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                r.read()
            scrapes[0] += 1

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        result = measure_datapath(port, "bench", ctx, {"gateway": gateway.pid,
                                                       "cluster": cluster.pid})
    finally:
        stop.set()
        scraper.join(15)
        gateway.stop()
        parties.remove(gateway)
    result["scrapes"] = scrapes[0]
    return result


def log_since(cluster: Party, seq: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = cluster.ask(f"log {seq}")
    return entries


def log_length(cluster: Party) -> int:
    """The ``seq`` the next request-log entry will get."""
    entries = log_since(cluster, 0)
    return int(entries[-1]["seq"]) + 1 if entries else 0


def pod_events(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per pod: when its first exec request, last exec close and DELETE reached the server."""
    pods: dict[str, dict[str, float]] = {}
    for e in entries:
        if not e["pod"]:
            continue
        row = pods.setdefault(e["pod"], {})
        if e["kind"] == "exec-close":
            row["exec_close"] = e["time"]
        if e["kind"] != "http":
            continue
        if "/exec" in e["path"] and "exec" not in row:
            row["exec"] = e["received"]
        if e["method"] == "DELETE" and "delete" not in row:
            row["delete"] = e["received"]
    return pods


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "max": max(values, default=0.0), "n": len(values)}


def kube_setup_intervals(setups: list[dict[str, Any]],
                         events: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The kube baseline's pod start and exec start, cut where the gateway's are.

    pod start: create sent → the exec request received by the API server;
    exec start: exec request received → first byte at the client.
    """
    joined = [(s, events[s["pod"]]) for s in setups if "exec" in events.get(s["pod"], {})]
    return {
        "pod_start_ms": percentile([1000 * (e["exec"] - s["t0"]) for s, e in joined], 0.5),
        "exec_start_ms": percentile([1000 * (s["t_first"] - e["exec"]) for s, e in joined],
                                    0.5),
        "setups_joined": len(joined),
    }


def measure_setup(port: int, user: str, ctx: dict[str, Any],
                  cluster: Party | None) -> dict[str, Any]:
    seq = log_length(cluster) if cluster else 0
    conns = client("setup", {"port": port, "user": user, "key": ctx["key"],
                             "count": ctx["setups"]}, ctx["workdir"])["connections"]
    out: dict[str, Any] = {
        "total_ms": stats([1000 * (c["t_first"] - c["t0"]) for c in conns]),
        "handshake_ms": stats([1000 * (c["t_auth"] - c["t0"]) for c in conns]),
        "auth_to_first_byte_ms": stats([1000 * (c["t_first"] - c["t_auth"]) for c in conns]),
    }
    if cluster is not None:
        wait_for_no_pods(cluster, 60)
        events = pod_events(log_since(cluster, seq))
        joined = [(c, events.get(c["host"], {})) for c in conns]
        out["pod_start_ms"] = stats([1000 * (e["exec"] - c["t_auth"])
                                     for c, e in joined if "exec" in e])
        out["exec_start_ms"] = stats([1000 * (c["t_first"] - e["exec"])
                                      for c, e in joined if "exec" in e])
        out["disconnect_to_delete_ms"] = stats([1000 * (e["delete"] - c["t_close"])
                                                for c, e in joined if "delete" in e])
    return out


def wait_for_no_pods(cluster: Party, timeout: float) -> float:
    start = time.monotonic()
    while cluster.ask("pods")["sandboxes"] or cluster.ask("pods")["pods"]:
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.1)
    return time.monotonic() - start


def tree_usage(pid: int) -> dict[str, float]:
    kids = children(pid)
    return {"processes": 1 + len(kids),
            "pss_mib": (pss_kib(pid) + sum(pss_kib(k) for k in kids)) / 1024}


def measure_fleet(port: int, user: str, count: int, ctx: dict[str, Any],
                  pss_pids: Callable[[], list[int]], cluster: Party | None,
                  cluster_pid: int | None = None) -> dict[str, Any]:
    def pss() -> int:
        return sum(pss_kib(p) for p in pss_pids())

    seq = log_length(cluster) if cluster else 0
    pss0 = pss()
    clients = []
    start = time.monotonic()
    for i in range(0, count, FLEET_PER_CLIENT):
        n = min(FLEET_PER_CLIENT, count - i)
        params = {"port": port, "user": user, "key": ctx["key"], "count": n,
                  "timeout": ctx["fleet_timeout"]}
        clients.append(Party(f"fleet-{count}-{i}", python(
            "-m", "benchmarks.benchclient", "fleet", json.dumps(params)), ctx["workdir"]))
    ready: list[dict[str, Any]] = []
    for party in clients:
        ready += json.loads(party.readline())["ready"]
    all_up = time.monotonic() - start
    time.sleep(1.0)
    pss_n = pss()
    ok = [r for r in ready if not r["error"]]
    errors = [r["error"] for r in ready if r["error"]]
    out: dict[str, Any] = {
        "connections": count, "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "all_up_s": all_up,
        "first_byte_ms": stats([1000 * (r["t_first"] - r["t0"]) for r in ok]),
        "handshake_ms": stats([1000 * (r["t_auth"] - r["t0"]) for r in ok]),
        "server_pss_mib_idle": pss0 / 1024, "server_pss_mib_loaded": pss_n / 1024,
        "pss_kib_per_idle_connection": (pss_n - pss0) / max(1, len(ok)),
    }
    if cluster_pid is not None:
        out["cluster_tree"] = tree_usage(cluster_pid)
    closes: list[float | None] = []
    for party in clients:
        assert party.proc.stdin is not None
        party.proc.stdin.write("\n")
        party.proc.stdin.flush()
    for party in clients:
        closes += json.loads(party.readline())["closed"]
        party.stop()
    if cluster is not None:
        out["pods_gone_s"] = wait_for_no_pods(cluster, 300)
        events = pod_events(log_since(cluster, seq))

        def after_close(event: str) -> dict[str, float]:
            """Client close -> ``event`` at the API server, per connection that got there."""
            return stats([1000 * (events[r["host"]][event] - t)
                          for r, t in zip(ready, closes, strict=True)
                          if t is not None and not r["error"]
                          and event in events.get(r["host"], {})])

        out["disconnect_to_delete_ms"] = after_close("delete")
        out["disconnect_to_exec_close_ms"] = after_close("exec_close")
        out["timeline"] = [  # per connection, for digging into the percentiles
            {**r, "t_close": t, **events.get(r.get("host", ""), {})}
            for r, t in zip(ready, closes, strict=True)]
        out["pod_start_ms"] = stats([1000 * (events[r["host"]]["exec"] - r["t_auth"])
                                     for r in ok if "exec" in events.get(r["host"], {})])
    return out


# ----------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncssh  # key generation only; this process runs no event loop

    raise_fd_limit()
    results: dict[str, Any] = {"config": {
        "mib": args.mib, "keys": args.keys, "setups": args.setups, "levels": args.levels,
        "idle_n": args.idle_n, "cipher": "aes128-gcm@openssh.com", "gateway_api_qps": args.qps,
        "cpus": os.cpu_count(), "quick": args.quick}}
    with tempfile.TemporaryDirectory(prefix="kuberun-bench-") as tmpdir:
        workdir = Path(tmpdir)
        workdir.chmod(0o755)
        key, host, pub = workdir / "client", workdir / "host", workdir / "client.pub"
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_bytes(client_key.export_private_key("openssh"))
        pub.write_bytes(client_key.export_public_key("openssh"))
        host.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh"))
        for f in (key, host):
            f.chmod(0o600)
        data = workdir / "data"
        data.write_bytes(os.urandom(args.mib * MiB))
        ctx = {"workdir": workdir, "key": str(key), "data": str(data), "mib": args.mib,
               "keys": args.keys, "setups": args.setups, "fleet_timeout": args.fleet_timeout}
        kubeconfig = workdir / "kubeconfig"
        parties: list[Party] = []
        try:
            cluster = Party("cluster", python("-m", "benchmarks.benchcluster", str(kubeconfig)),
                            workdir)
            parties.append(cluster)
            if cluster.readline().strip() != "ready":
                raise RuntimeError("cluster did not start")
            kube_cfg = {"connection": {"qps": args.qps, "burst": 2 * args.qps},
                        "timeouts": {"podStart": "300s", "podStop": "60s"}}
            gateway = Party("gateway", python(
                "-m", "benchmarks.gateway_datapath", "--serve-gateway", str(host), str(pub),
                "--kubeconfig", str(kubeconfig), "--kube-config", json.dumps(kube_cfg)), workdir)
            parties.append(gateway)
            gw_port = int(gateway.readline())
            baseline = Party("asyncssh", python(
                "-m", "benchmarks.gateway_datapath", "--serve-baseline", str(host), str(pub)),
                workdir)
            parties.append(baseline)
            base_port = int(baseline.readline())
            sshd_bin = ensure_sshd(install=not args.quick)
            sshd: Party | None = None
            if sshd_bin and not args.no_sshd:
                sshd, sshd_port = start_sshd(sshd_bin, workdir, host, pub)
                parties.append(sshd)
            me = pwd.getpwuid(os.getuid()).pw_name
            results["sshd"] = sshd_bin if sshd else None

            step("data path: gateway")
            dp = results["datapath"] = {}
            dp["gateway"] = measure_datapath(gw_port, "bench", ctx, {
                "gateway": gateway.pid, "cluster": cluster.pid})
            step("data path: gateway with metrics served and scraped every second")
            dp["gateway_metrics"] = measure_with_metrics(host, pub, kubeconfig, kube_cfg, ctx,
                                                         cluster, parties)
            if not args.quick:
                step("data path: gateway again (metrics off; brackets the metrics run)")
                again = measure_datapath(gw_port, "bench", ctx, {"gateway": gateway.pid})
                dp["gateway_metrics"]["cpu_s_per_gib_gateway_off_again"] = \
                    again["cpu_s_per_gib_gateway"]
            if not args.no_recording:
                step("data path: gateway with session recording")
                recorded = Party("gateway-rec", python(
                    "-m", "benchmarks.gateway_datapath", "--serve-gateway", str(host), str(pub),
                    "--kubeconfig", str(kubeconfig), "--kube-config", json.dumps(kube_cfg),
                    "--record", str(workdir / "recordings")), workdir)
                parties.append(recorded)
                on = measure_datapath(int(recorded.readline()), "bench", ctx, {
                    "gateway": recorded.pid})
                recorded.stop()
                parties.remove(recorded)
                casts = list((workdir / "recordings").rglob("*.cast"))
                results["recording"] = {
                    "on": on, "off": dp["gateway"], "files": len(casts),
                    "bytes_written": sum(p.stat().st_size for p in casts),
                    **{f"{k}_ratio": on[k] / dp["gateway"][k]
                       for k in ("download_mib_s", "upload_mib_s")}}
                shutil.rmtree(workdir / "recordings", ignore_errors=True)
            step("data path: asyncssh baseline")
            dp["asyncssh"] = measure_datapath(base_port, "bench", ctx, {"server": baseline.pid})
            if sshd:
                step("data path: sshd")
                dp["sshd"] = measure_datapath(sshd_port, me, ctx, {})
            step("data path: kubernetes-asyncio exec")
            cpu0 = cpu_seconds(cluster.pid)
            seq = log_length(cluster)
            dp["kube"] = client("kube", {"kubeconfig": str(kubeconfig), "data": str(data),
                                         "keys": args.keys, "count": args.setups}, workdir)
            dp["kube"]["cluster_cpu_s_whole_run"] = cpu_seconds(cluster.pid) - cpu0
            dp["kube"].update(kube_setup_intervals(dp["kube"]["setups"],
                                                   pod_events(log_since(cluster, seq))))

            step("ssh -L: gateway direct-tcpip and kubernetes-asyncio port-forward")
            results["forward"] = client("forward", {
                "port": gw_port, "user": "bench", "key": str(key), "data": str(data),
                "kubeconfig": str(kubeconfig)}, workdir)

            step("connection setup")
            st = results["setup"] = {}
            st["gateway"] = measure_setup(gw_port, "bench", ctx, cluster)
            st["asyncssh"] = measure_setup(base_port, "bench", ctx, None)
            if sshd:
                st["sshd"] = measure_setup(sshd_port, me, ctx, None)

            step("idle connections: memory")
            idle = results["idle"] = {}
            idle["gateway"] = measure_fleet(gw_port, "bench", args.idle_n, ctx,
                                            lambda: [gateway.pid], cluster, cluster.pid)
            idle["asyncssh"] = measure_fleet(base_port, "bench", args.idle_n, ctx,
                                             lambda: [baseline.pid], None)
            if sshd:
                sshd_pid = sshd.pid
                idle["sshd"] = measure_fleet(sshd_port, me, args.idle_n, ctx,
                                             lambda: sshd_pids(sshd_pid), None)
            conc = results["concurrency"] = {}
            for level in args.levels:
                step(f"concurrency: {level} connections")
                conc[str(level)] = measure_fleet(gw_port, "bench", level, ctx,
                                                 lambda: [gateway.pid], cluster, cluster.pid)
            results["gateway_pss_mib_end"] = pss_kib(gateway.pid) / 1024
        finally:
            for party in reversed(parties):
                party.stop()
    return results


def step(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what} ...", file=sys.stderr, flush=True)




# ----------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    dp, st, idle = results["datapath"], results["setup"], results["idle"]
    systems = ["gateway", "asyncssh", "sshd", "kube"]
    lines = [f"{'metric':<34}" + "".join(f"{s:>10}" for s in systems)
             + f"{'gw/async':>10}{'gw/sshd':>9}{'gw/kube':>9}  goal"]

    def row(name: str, vals: dict[str, float | None], goal: str = "", digits: int = 1) -> None:
        g = vals.get("gateway")
        lines.append(f"{name:<34}" + "".join(f"{fmt(vals.get(s), digits):>10}" for s in systems)
                     + f"{ratio(g, vals.get('asyncssh')):>10}{ratio(g, vals.get('sshd')):>9}"
                     f"{ratio(g, vals.get('kube')):>9}  {goal}")

    def pick(table_: dict[str, Any], *path: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for s in systems:
            node: Any = table_.get(s)
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            out[s] = node
        return out

    row("download MiB/s", pick(dp, "download_mib_s"), ">= 0.8x asyncssh")
    row("upload MiB/s", pick(dp, "upload_mib_s"), ">= 0.8x asyncssh")
    row("keystroke RTT p50 ms", pick(dp, "key_p50_ms"), "<= asyncssh + 0.5 ms", 3)
    row("keystroke RTT p99 ms", pick(dp, "key_p99_ms"), "", 3)
    row("server CPU s per GiB moved", {"gateway": dp["gateway"]["cpu_s_per_gib_gateway"],
                                       "asyncssh": dp["asyncssh"]["cpu_s_per_gib_server"]}, "", 2)
    row("  cluster CPU s per GiB (gw run)", {"gateway": dp["gateway"]["cpu_s_per_gib_cluster"]},
        "", 2)
    if "gateway_metrics" in dp:
        on = dp["gateway_metrics"]
        offs = [dp["gateway"]["cpu_s_per_gib_gateway"],
                *([on["cpu_s_per_gib_gateway_off_again"]]
                  if "cpu_s_per_gib_gateway_off_again" in on else [])]
        off = sum(offs) / len(offs)
        row("  gw CPU s/GiB, metrics scraped", {"gateway": on["cpu_s_per_gib_gateway"]}, "", 2)
        lines.append(f"{'  metrics on / off (gw CPU/GiB)':<34}"
                     f"{on['cpu_s_per_gib_gateway'] / off:>10.3f}"
                     f"  (off: mean of the runs before and after, if any; {on['scrapes']} scrapes; "
                     "goal <= 1.02)")
    rec = results.get("recording")
    if rec:
        for what in ("download", "upload"):
            row(f"  {what} MiB/s recording on",
                {"gateway": rec["on"][f"{what}_mib_s"]},
                f"{rec[f'{what}_mib_s_ratio']:.2f}x of off (goal >= 0.8x)")
    fw = results.get("forward")
    if fw:  # the ratio to read is gw/kube: the same port-forward stream with SSH in front
        row("ssh -L download MiB/s", pick(fw, "download_mib_s"))
        row("ssh -L upload MiB/s", pick(fw, "upload_mib_s"))
    row("setup to first byte p50 ms", pick(st, "total_ms", "p50"))
    row("setup to first byte p99 ms", pick(st, "total_ms", "p99"))
    row("  handshake p50 ms", pick(st, "handshake_ms", "p50"))
    kube = dp["kube"]
    # Both sides cut at the same request-log points (see the module docstring).
    row("  pod start p50 ms (-> exec req)", {"gateway": st["gateway"]["pod_start_ms"]["p50"],
                                             "kube": kube["pod_start_ms"]})
    row("  exec start p50 ms (req -> byte)", {"gateway": st["gateway"]["exec_start_ms"]["p50"],
                                              "kube": kube["exec_start_ms"]})
    row("disconnect -> DELETE p50 ms", {"gateway": st["gateway"]["disconnect_to_delete_ms"]["p50"]})
    row("disconnect -> DELETE p99 ms", {"gateway": st["gateway"]["disconnect_to_delete_ms"]["p99"]},
        "<= 50 ms")
    row(f"PSS KiB per idle conn (N={results['config']['idle_n']})",
        pick(idle, "pss_kib_per_idle_connection"), "<= 250 KiB")
    lines.append("")
    lines.append(f"{'concurrent':>10}{'errors':>8}{'all up s':>10}{'1st byte p50':>14}"
                 f"{'p99 ms':>9}{'max ms':>9}{'handshake p99':>15}"
                 f"{'exec closed p50':>17}{'DELETE p50':>12}{'p99 ms':>9}"
                 f"{'gw PSS MiB':>12}{'KiB/conn':>10}{'cluster procs':>15}{'cluster PSS MiB':>17}")
    for level, r in results["concurrency"].items():
        tree = r.get("cluster_tree", {})
        lines.append(
            f"{level:>10}{r['errors']:>8}{r['all_up_s']:>10.1f}{r['first_byte_ms']['p50']:>14.0f}"
            f"{r['first_byte_ms']['p99']:>9.0f}{r['first_byte_ms']['max']:>9.0f}"
            f"{r['handshake_ms']['p99']:>15.0f}"
            f"{r.get('disconnect_to_exec_close_ms', {}).get('p50', 0):>17.1f}"
            f"{r['disconnect_to_delete_ms']['p50']:>12.1f}{r['disconnect_to_delete_ms']['p99']:>9.1f}"
            f"{r['server_pss_mib_loaded']:>12.1f}{r['pss_kib_per_idle_connection']:>10.0f}"
            f"{tree.get('processes', 0):>15}{tree.get('pss_mib', 0):>17.0f}")
        for e in r["error_samples"]:
            lines.append(f"{'':>10}error: {e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min): 16 MiB, 10 connections, no sshd install")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--mib", type=int, help="MiB each way (default 512; quick 16)")
    parser.add_argument("--keys", type=int, help="keystrokes (default 1000; quick 100)")
    parser.add_argument("--setups", type=int, help="sequential connections (default 30; quick 3)")
    parser.add_argument("--idle-n", type=int, help="idle shells for PSS (default 100; quick 10)")
    parser.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")],
                        help="concurrency levels (default 100,500,1000; quick 10)")
    parser.add_argument("--qps", type=int, default=1000,
                        help="the gateway's API qps (burst 2x; default 1000, config default 50)")
    parser.add_argument("--fleet-timeout", type=float, default=120,
                        help="seconds one fleet connection may take to answer (default 120)")
    parser.add_argument("--logs", type=Path, help="keep every process's stderr in this dir")
    parser.add_argument("--no-sshd", action="store_true", help="skip the sshd baseline")
    parser.add_argument("--no-recording", action="store_true",
                        help="skip the data path with session recording on")
    args = parser.parse_args(argv)
    defaults = ({"mib": 16, "keys": 100, "setups": 3, "idle_n": 10, "levels": [10]} if args.quick
                else {"mib": 512, "keys": 1000, "setups": 30, "idle_n": 100,
                      "levels": [100, 500, 1000]})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    global LOG_DIR
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
        LOG_DIR = args.logs
    started = time.monotonic()
    results = run(args)
    results["wall_s"] = time.monotonic() - started
    print(table(results))
    print(f"(wall {results['wall_s']:.0f} s; sshd: {results['sshd'] or 'not run'}; "
          f"gateway API qps {args.qps})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
