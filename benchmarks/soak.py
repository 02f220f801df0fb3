"""Soak harness: churn real SSH clients through the gateway and prove nothing leaks.

``python -m benchmarks.soak --connections N --concurrency C --duration T
[--faults RATE] [--json FILE] [--plot FILE.png] [--seed S]``

Theory of operation
-------------------
This process runs the embedded cluster and the gateway in-process (the
library API), so it can see the gateway's trio tasks, file descriptors and
memory directly. Clients are separate processes -- the real OpenSSH ``ssh``,
``sftp`` and ``scp``, plus a small asyncssh client (:mod:`.soakclient`) for
signals -- so their cost does not pollute the gateway's numbers.

``C`` workers run ``N`` scenarios in all (or until ``T`` seconds pass), taking
turns through a shuffled cycle of: exec, interactive shell (pty), sftp and scp
round trips checked by SHA-256, early disconnect, client ``kill -9``, and a
signal to the process in the pod. Each scenario logs in as its own user
(``soak-<n>``), so the gateway's log (captured in-process: ``connection-start``
names the user, ``pod-created`` the pod, ``connection-end`` the end) ties its
connections to their pods. ``early-disconnect`` and ``kill9`` wait for their
session's first line, end the client, and then must see, within
``--gone-within`` seconds, every connection's ``connection-end``, every pod
gone, and every exec stream of those pods closed in the request log.

With ``--faults RATE`` the embedded cluster injects, about RATE times a second,
one of: API 500/429, a dropped watch, a cut exec stream, an evicted pod. The
fault injector records what each fault hit (:attr:`Faults.hits`). A failed
scenario is *excused* only when a fault hit its own target during the
scenario: a request or exec stream naming one of its pods, the eviction of one
of its pods, or -- for the gateway's shared pod watch (a dropped watch, a
failed list/watch) and pod creation -- one of its connections that was live
(for a create: still without a pod) when the fault bit. Every other failure,
and every success with wrong bytes, is a hard failure. The report counts the
excused failures per fault kind, each with its fault's target.

A sampler records live connections, pods, RSS, fds, trio tasks and latency
percentiles twice a second (and draws a progress line). At the end, once the
clients are gone, it waits for the gateway to settle and checks: 0 pods,
0 pod processes, trio tasks and fds back to their baseline, RSS growth within
``--rss-bound`` MiB from a third into the run (the heaps grow while concurrency
ramps up; a leak goes on growing) to the end. It prints a report, writes JSON
and a PNG plot, and exits 1 if anything leaked or failed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import psutil
import trio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.limits import Limits, MaxStartups
from kuberun_trio.gateway.serve import Gateway, GatewayOptions, open_gateway

BENCH_LIMITS = Limits(max_startups=MaxStartups.parse("100000"), max_startups_per_address=100_000,
                      max_connections=100_000, max_connections_per_user=100_000,
                      max_sessions=1000)
"""Limits far above what a benchmark's fleet (one user, one address) opens: the harnesses
measure the data path and leaks, not the limits (``benchmarks.abuse_limits`` does that)."""

CLIENT_DEADLINE = 60.0
"""Seconds one client command may take before it counts as failed."""
SCENARIOS = ("exec", "shell", "sftp", "scp", "early-disconnect", "kill9", "signal")
LOG_EVENTS = ("connection-start", "pod-created", "connection-end")
"""The gateway log events the soak reads (see :class:`GatewayLog`)."""


@attrs.define
class ConnectionTrace:
    """One gateway connection as its log told it (times are ``trio.current_time()``)."""

    username: str
    started: float
    pod: str | None = None
    pod_created: float | None = None
    ended: float | None = None


class GatewayLog(logging.Handler):
    """Captures the gateway's connection events in-process (the soak's ground truth)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.connections: dict[str, ConnectionTrace] = {}
        self.by_user: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        event, cid = getattr(record, "event", None), getattr(record, "connection_id", None)
        if event not in LOG_EVENTS or not isinstance(cid, str):
            return
        now = trio.current_time()
        if event == "connection-start":
            user = str(getattr(record, "username", ""))
            self.connections[cid] = ConnectionTrace(user, now)
            self.by_user.setdefault(user, []).append(cid)
        elif (trace := self.connections.get(cid)) is not None:
            if event == "pod-created":
                trace.pod, trace.pod_created = str(getattr(record, "pod", "")), now
            else:
                trace.ended = now

    def of(self, username: str) -> list[ConnectionTrace]:
        return [self.connections[cid] for cid in self.by_user.get(username, [])]


@attrs.frozen
class Outcome:
    scenario: str
    ok: bool
    started: float
    seconds: float
    error: str = ""
    corrupt: bool = False
    username: str = ""
    verified: bool = False
    """A transfer whose SHA-256 was compared (and matched, if ``ok``)."""
    excused_by: tuple[dict[str, Any], ...] = ()
    """The fault hits on this scenario's own targets (a failure is excused by them)."""


@attrs.frozen
class Sample:
    t: float
    connections: int
    pods: int
    rss_mib: float
    fds: int
    tasks: int
    p50_ms: float
    p99_ms: float


def task_names() -> list[str]:
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    return sorted(t.name for t in walk(trio.lowlevel.current_root_task()))


def count_tasks() -> int:
    return len(task_names())


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Soak:
    def __init__(self, args: argparse.Namespace, cluster: EmbeddedCluster, gateway: Gateway,
                 workdir: Path, key_file: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.gateway = gateway
        self.workdir = workdir
        self.key_file = key_file
        self.rng = random.Random(args.seed)
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.fault_times: list[tuple[float, str]] = []
        self.t0 = trio.current_time()
        self.launched = 0
        self.done = trio.Event()
        self.log = GatewayLog()
        self.verified: set[str] = set()
        """Users whose transfer's SHA-256 was compared (sftp, scp)."""
        order = list(args.scenarios)
        self.rng.shuffle(order)
        self.order = order

    # -- clients ------------------------------------------------------------
    def ssh_opts(self) -> list[str]:
        return ["-i", str(self.key_file), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30"]

    def ssh(self, user: str, *extra: str) -> list[str]:
        return ["ssh", "-p", str(self.gateway.address[1]), *self.ssh_opts(), *extra,
                f"{user}@127.0.0.1"]

    async def run(self, argv: list[str],
                  stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(CLIENT_DEADLINE):
            return await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                          capture_stderr=True, check=False)

    async def scenario(self, name: str, user: str) -> tuple[bool, str, bool]:
        """Run one scenario as ``user``: (ok, error, corrupt)."""
        if name == "exec":
            r = await self.run([*self.ssh(user), "echo soak-$((6*7)); exit 7"])
            ok = r.returncode == 7 and r.stdout == b"soak-42\n"
            return ok, "" if ok else f"exec rc={r.returncode} {r.stderr[-200:]!r}", False
        if name == "shell":
            r = await self.run([*self.ssh(user, "-tt")], stdin=b"echo soak-$((6*7))\nexit 5\n")
            ok = r.returncode == 5 and b"soak-42" in r.stdout
            return ok, "" if ok else f"shell rc={r.returncode} {r.stderr[-200:]!r}", False
        if name in ("sftp", "scp"):
            return await self.transfer(name, user)
        if name in ("early-disconnect", "kill9"):
            return await self.cut_client(name, user)
        r = await self.run([sys.executable, "-m", "benchmarks.soakclient",
                            str(self.gateway.address[1]), str(self.key_file), user])
        ok = r.returncode == 0
        return ok, "" if ok else f"signal rc={r.returncode} {r.stderr[-300:]!r}", False

    async def cut_client(self, name: str, user: str) -> tuple[bool, str, bool]:
        """End a client mid-session (TERM or KILL); the gateway must clean up after it."""
        proc = await trio.lowlevel.open_process(
            [*self.ssh(user), "echo started; exec " + ("sleep 30" if name == "early-disconnect"
                                                       else "cat")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            out = b""
            with trio.move_on_after(CLIENT_DEADLINE):
                while b"started\n" not in out:
                    chunk = await proc.stdout.receive_some(4096)
                    if not chunk:
                        break
                    out += chunk
            if b"started\n" not in out:
                return False, f"{name}: the session never started ({out[-200:]!r})", False
            await trio.sleep(self.rng.uniform(0, 1.0))
            proc.send_signal(signal.SIGTERM if name == "early-disconnect" else signal.SIGKILL)
            with trio.fail_after(30):
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdin.aclose()
            await proc.stdout.aclose()
        problem = await self.cleaned_up(user, self.args.gone_within)
        return problem is None, f"{name}: {problem}" if problem else "", False

    async def cleaned_up(self, user: str, within: float) -> str | None:
        """Wait until ``user``'s connections ended, pods are gone and exec streams closed.

        None when all three hold within ``within`` seconds, else what still did not.
        """
        deadline = trio.current_time() + within
        while True:
            traces = self.log.of(user)
            pods = {t.pod for t in traces if t.pod}
            live = {p["metadata"]["name"] for p in self.cluster.pods()}
            problems = []
            if not traces:
                problems.append("no connection-start in the gateway log")
            if open_conns := [t for t in traces if t.ended is None]:
                problems.append(f"{len(open_conns)} connection(s) without connection-end")
            if not pods and traces:
                problems.append("no pod-created in the gateway log")
            if still := sorted(pods & live):
                problems.append(f"pod(s) {still} not deleted")
            if execs := {p: n for p in pods if (n := self.open_execs(p))}:
                problems.append(f"exec streams still open {execs}")
            if not problems:
                return None
            if trio.current_time() > deadline:
                return f"after {within:g}s: " + "; ".join(problems)
            await trio.sleep(0.1)

    def open_execs(self, pod: str) -> int:
        """exec-open entries of ``pod`` in the request log without their exec-close."""
        entries = self.cluster.request_log.for_pod("default", pod)
        return (sum(e.kind == "exec-open" for e in entries)
                - sum(e.kind == "exec-close" for e in entries))

    async def transfer(self, how: str, user: str) -> tuple[bool, str, bool]:
        size = self.rng.randint(64 * 1024, 2 * 1024 * 1024)
        data = self.rng.randbytes(size)
        local = self.workdir / f"up-{uuid.uuid4().hex}"
        back = self.workdir / f"down-{uuid.uuid4().hex}"
        remote = f"/tmp/soak-{uuid.uuid4().hex}"
        await trio.Path(local).write_bytes(data)
        try:
            if how == "sftp":
                batch = f"put {local} {remote}\nget {remote} {back}\nrm {remote}\n".encode()
                r = await self.run(["sftp", "-P", str(self.gateway.address[1]), *self.ssh_opts(),
                                    "-b", "-", f"{user}@127.0.0.1"], stdin=batch)
                rcs = [r.returncode]
            else:
                scp = ["scp", "-q", "-P", str(self.gateway.address[1]), *self.ssh_opts()]
                r1 = await self.run([*scp, str(local), f"{user}@127.0.0.1:{remote}"])
                r = await self.run([*scp, f"{user}@127.0.0.1:{remote}", str(back)])
                await self.run([*self.ssh(user), f"rm -f {remote}"])
                rcs = [r1.returncode, r.returncode]
            if any(rcs):
                return False, f"{how} rc={rcs} {r.stderr[-200:]!r}", False
            got = await trio.Path(back).read_bytes()
            same = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            self.verified.add(user)
            return same, "" if same else f"{how}: hash mismatch ({len(got)} of {size} bytes)", \
                not same
        finally:
            for p in (local, back):
                p.unlink(missing_ok=True)

    async def worker(self) -> None:
        while True:
            if self.launched >= self.args.connections or self.elapsed() > self.args.duration:
                return
            n = self.launched
            self.launched += 1
            name = self.order[n % len(self.order)]
            user = f"soak-{n}"
            start = self.elapsed()
            try:
                ok, error, corrupt = await self.scenario(name, user)
            except trio.TooSlowError:
                ok, error, corrupt = False, f"{name}: timed out", False
            end = self.elapsed()
            excused = () if ok or corrupt else self.own_fault_hits(user, start, end)
            self.outcomes.append(Outcome(name, ok, start, end - start, error, corrupt, user,
                                         user in self.verified, excused))

    def own_fault_hits(self, user: str, start: float, end: float) -> tuple[dict[str, Any], ...]:
        """The faults that hit this scenario's own targets while it ran.

        A hit naming a pod counts if the pod is one of the scenario's. A hit on no
        single pod -- a dropped watch, a failed list/watch (the gateway's shared pod
        watch) or a failed create -- counts if one of the scenario's connections was
        live when it bit (for a create: live and still without a pod).
        """
        traces = self.log.of(user)
        pods = {t.pod for t in traces if t.pod}
        mine = []
        for hit in self.cluster.faults.hits:
            t = hit.time - self.t0
            if not start <= t <= end:
                continue
            if hit.pod is not None:
                own = hit.pod in pods
            else:
                creating = hit.target.startswith("POST ")
                own = any(
                    tr.started - self.t0 <= t <= (tr.ended - self.t0 if tr.ended else end)
                    and (not creating or tr.pod_created is None
                         or t <= tr.pod_created - self.t0)
                    for tr in traces)
            if own:
                mine.append({"kind": hit.kind, "target": hit.target, "t": round(t, 2),
                             "pod": hit.pod})
        # A hit on one of its pods (evict, exec cut, a request naming it) is the more
        # specific cause; the shared watch and creates come after it.
        return tuple(sorted(mine, key=lambda h: h["pod"] is None))

    # -- faults and sampling ------------------------------------------------
    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    async def inject_faults(self) -> None:
        faults = self.cluster.faults
        kinds: dict[str, Callable[[], Any]] = {
            "api-500": lambda: faults.fail_requests(self.rng.choice(["get", "list", "watch"]),
                                                    "pods", 1, code=500),
            "api-429": lambda: faults.fail_requests("*", "pods", 1, code=429, retry_after=1),
            "watch-drop": faults.drop_watches,
            "exec-cut": lambda: faults.cut_exec(after_bytes=self.rng.randint(0, 65536)),
            "evict": None,
        }
        while not self.done.is_set():
            await trio.sleep(self.rng.expovariate(self.args.faults))
            kind = self.rng.choice(list(kinds))
            if kind == "evict":
                pods = [p for p in self.cluster.pods()
                        if p.get("status", {}).get("phase") == "Running"]
                if not pods:
                    continue
                pod = self.rng.choice(pods)["metadata"]["name"]
                await faults.evict("default", pod)
            else:
                kinds[kind]()
            self.fault_times.append((self.elapsed(), kind))

    def sample(self) -> Sample:
        window = [o.seconds * 1000 for o in self.outcomes if o.started > self.elapsed() - 10]
        return Sample(
            t=round(self.elapsed(), 2), connections=len(self.gateway.connections),
            pods=len(self.cluster.pods()),
            rss_mib=psutil.Process().memory_info().rss / 2**20, fds=fd_count(),
            tasks=count_tasks(), p50_ms=pct(window, 0.5), p99_ms=pct(window, 0.99))

    async def sampler(self) -> None:
        while True:
            s = self.sample()
            self.samples.append(s)
            ok = sum(o.ok for o in self.outcomes)
            print(f"\r[{s.t:6.1f}s] done {len(self.outcomes)}/{self.args.connections} ok {ok} "
                  f"conns {s.connections:3d} pods {s.pods:3d} rss {s.rss_mib:6.1f} MiB "
                  f"fds {s.fds:4d} tasks {s.tasks:4d} p50 {s.p50_ms:6.0f} ms "
                  f"faults {len(self.fault_times)}   ", end="", file=sys.stderr, flush=True)
            await trio.sleep(0.5)


async def settle(soak: Soak, baseline: Sample, seconds: float) -> Sample:
    """Wait until connections and pods are gone and tasks/fds are back, or time runs out."""
    deadline = trio.current_time() + seconds
    while True:
        s = soak.sample()
        if (s.connections == 0 and s.pods == 0 and s.tasks <= baseline.tasks
                and s.fds <= baseline.fds) or trio.current_time() > deadline:
            return s
        await trio.sleep(0.25)


def pod_processes(cluster: EmbeddedCluster) -> int:
    stats = cluster.kubelet.statistics()
    children = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    return int(stats["pods"]) + len(children)


async def soak_main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kuberun-soak-") as tmp:
        workdir = Path(tmp)
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        key_file = workdir / "client_ed25519"
        key_file.write_bytes(client_key.export_private_key("openssh"))
        key_file.chmod(0o600)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        async with open_aio_loop(), open_embedded_cluster(
                https=True, kubeconfig_path=workdir / "kubeconfig") as cluster:
            kube = parse_config({"connection": {"kubeconfig": str(cluster.kubeconfig_path)},
                                 "timeouts": {"podStart": "60s", "podStop": "20s"}})
            options = GatewayOptions(
                kubernetes=kube, authenticator=PublicKeyAuthenticator(
                    [client_key.export_public_key("openssh").decode()]),
                host_keys=(host_key.export_private_key("openssh"),), port=0,
                instance="soak", limits=BENCH_LIMITS)
            async with open_gateway(options) as gateway:
                soak = Soak(args, cluster, gateway, workdir, key_file)
                gateway_log = logging.getLogger("kuberun_trio")
                gateway_log.addHandler(soak.log)
                if gateway_log.getEffectiveLevel() > logging.INFO:
                    gateway_log.setLevel(logging.INFO)
                # Warm up: one connection opens the API client's keep-alive pool, which
                # stays open by design; what grows after this is what leaks.
                ok, error, _ = await soak.scenario("exec", "soak-warmup")
                if not ok:
                    raise SystemExit(f"warm-up connection failed: {error}")
                await settle(soak, soak.sample(), 10)
                baseline = soak.sample()
                baseline_tasks = task_names()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(soak.sampler)
                    if args.faults > 0:
                        nursery.start_soon(soak.inject_faults)
                    async with trio.open_nursery() as workers:
                        for _ in range(args.concurrency):
                            workers.start_soon(soak.worker)
                    soak.done.set()  # no more faults; the sampler goes on while we settle
                    run_samples = len(soak.samples)
                    end = await settle(soak, baseline, args.settle)
                    nursery.cancel_scope.cancel()
                print(file=sys.stderr)
                soak.samples.append(end)
                extra_tasks = list(baseline_tasks)
                leaked_tasks = []
                for name in task_names():
                    if name in extra_tasks:
                        extra_tasks.remove(name)
                    else:
                        leaked_tasks.append(name)
                if leaked_tasks:
                    print(f"tasks not in the baseline: {leaked_tasks}", file=sys.stderr)
                leaks = {
                    "pods": end.pods,
                    "pod_processes": pod_processes(cluster),
                    "gateway_tasks": max(0, end.tasks - baseline.tasks),
                    "fds": max(0, end.fds - baseline.fds),
                }
                peak_rss = max(s.rss_mib for s in soak.samples)
                # The heaps grow while the concurrency ramps up and the buffers of the
                # first transfers are allocated; a leak goes on growing with every
                # connection. So growth is measured from a third into the run to the end.
                warm = soak.samples[min(len(soak.samples) - 1, run_samples // 3)].rss_mib
                return report(args, soak, baseline, end, leaks, peak_rss, warm)


def report(args: argparse.Namespace, soak: Soak, baseline: Sample, end: Sample,
           leaks: dict[str, int], peak_rss: float, warm_rss: float) -> dict[str, Any]:
    outcomes = soak.outcomes
    by: dict[str, dict[str, int]] = {}
    excused_by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in outcomes:
        row = by.setdefault(o.scenario, {"ok": 0, "failed": 0, "excused": 0,
                                         "sha256_verified": 0})
        row["ok" if o.ok else "excused" if o.excused_by else "failed"] += 1
        row["sha256_verified"] += o.ok and o.verified
        if o.excused_by:  # counted once, under its most specific fault (see own_fault_hits)
            kind = o.excused_by[0]["kind"]
            excused_by_kind.setdefault(kind, []).append({
                "scenario": o.scenario, "user": o.username, "error": o.error[:160],
                "targets": [h["target"] for h in o.excused_by if h["kind"] == kind],
                "other_hits": [f"{h['kind']}: {h['target']}" for h in o.excused_by
                               if h["kind"] != kind]})
    hard_failures = [o for o in outcomes if not o.ok and not o.excused_by]
    lat = [o.seconds * 1000 for o in outcomes if o.ok]
    rss_growth = end.rss_mib - warm_rss
    passed = (not any(leaks.values()) and not hard_failures and rss_growth <= args.rss_bound
              and len(outcomes) > 0)
    return {
        "passed": passed,
        "connections": len(outcomes), "concurrency": args.concurrency,
        "duration_s": round(soak.elapsed(), 1), "faults_injected": len(soak.fault_times),
        "fault_kinds": sorted({k for _, k in soak.fault_times}),
        "fault_hits": dict(sorted(collections.Counter(
            h.kind for h in soak.cluster.faults.hits if h.time >= soak.t0).items())),
        "scenarios": by, "leaks": leaks,
        "excused_by_fault_kind": excused_by_kind,
        "rss_mib": {"baseline": round(baseline.rss_mib, 1), "peak": round(peak_rss, 1),
                    "end": round(end.rss_mib, 1), "growth_after_warmup": round(rss_growth, 1),
                    "bound": args.rss_bound},
        "latency_ms": {"p50": round(pct(lat, 0.5), 1), "p90": round(pct(lat, 0.9), 1),
                       "p99": round(pct(lat, 0.99), 1),
                       "mean": round(statistics.fmean(lat), 1) if lat else 0.0},
        "latency_ms_by_scenario": {
            name: {"p50": round(pct(v, 0.5), 1), "p99": round(pct(v, 0.99), 1)}
            for name in sorted(by)
            if (v := [o.seconds * 1000 for o in outcomes if o.ok and o.scenario == name])},
        "hard_failures": [attrs.asdict(o) for o in hard_failures[:20]],
        "samples": [attrs.asdict(s) for s in soak.samples],
    }


BENCH_EXTRA = "install the bench extra: pip install -e '.[bench]'"


def plotting_available() -> bool:
    """Whether matplotlib can be imported (it comes with the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    axes[0].plot(t, [s["connections"] for s in samples], label="live connections")
    axes[0].plot(t, [s["pods"] for s in samples], label="pods")
    axes[1].plot(t, [s["rss_mib"] for s in samples], label="gateway RSS (MiB)")
    axes[2].plot(t, [s["fds"] for s in samples], label="open fds")
    axes[2].plot(t, [s["tasks"] for s in samples], label="trio tasks")
    axes[3].plot(t, [s["p50_ms"] for s in samples], label="latency p50 (ms, 10 s window)")
    axes[3].plot(t, [s["p99_ms"] for s in samples], label="latency p99 (ms, 10 s window)")
    for ax in axes:
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    axes[3].set_xlabel("seconds")
    fig.suptitle(f"kuberun_trio soak: {results['connections']} connections, "
                 f"{results['faults_injected']} faults, passed={results['passed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_report(results: dict[str, Any]) -> None:
    print(f"soak: {results['connections']} scenarios in {results['duration_s']} s, "
          f"concurrency {results['concurrency']}, {results['faults_injected']} faults "
          f"{results['fault_kinds']}")
    print(f"fault hits: {results['fault_hits']}")
    print(f"{'scenario':<18}{'ok':>6}{'sha256 ok':>10}{'failed':>8}{'excused':>9}"
          f"{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in sorted(results["scenarios"].items()):
        lat_s = results["latency_ms_by_scenario"].get(name, {"p50": 0, "p99": 0})
        print(f"{name:<18}{row['ok']:>6}{row['sha256_verified']:>10}{row['failed']:>8}"
              f"{row['excused']:>9}{lat_s['p50']:>10}{lat_s['p99']:>10}")
    excused = results["excused_by_fault_kind"]
    print("excused failures by fault kind (a fault that hit the scenario's own target; each "
          "counted once, under its most specific fault):" + ("" if excused else " none"))
    for kind, rows in sorted(excused.items()):
        print(f"  {kind}: {len(rows)}")
        for row in rows:
            also = f" (+{len(row['other_hits'])} shared-watch/create hits)" \
                if row["other_hits"] else ""
            print(f"    {row['scenario']} ({row['user']}): {'; '.join(row['targets'])}{also}"
                  f" -- {row['error'][:100]}")
    lat, rss = results["latency_ms"], results["rss_mib"]
    print(f"latency ms: p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']}")
    print(f"gateway RSS MiB: baseline {rss['baseline']} peak {rss['peak']} end {rss['end']} "
          f"(growth after warm-up {rss['growth_after_warmup']}, bound {rss['bound']})")
    print("leaks: " + ", ".join(f"{k}={v}" for k, v in results["leaks"].items()))
    for failure in results["hard_failures"]:
        print(f"FAILED {failure['scenario']}: {failure['error']}")
    print("PASSED" if results["passed"] else "FAILED")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=200,
                        help="SSH connections to run in all (default 200)")
    parser.add_argument("--concurrency", type=int, default=10,
                        help="connections open at once (default 10)")
    parser.add_argument("--duration", type=float, default=300,
                        help="stop starting connections after this many seconds (default 300)")
    parser.add_argument("--faults", type=float, default=0.0,
                        help="cluster faults injected per second (default 0: none)")
    parser.add_argument("--rss-bound", type=float, default=64.0,
                        help="allowed gateway RSS growth in MiB (default 64)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds the gateway may take to get back to its baseline at the "
                             "end (default 60; idle kept-alive API connections close after "
                             "15-30 s, so give it at least 35)")
    parser.add_argument("--gone-within", type=float, default=30.0,
                        help="seconds after an early disconnect or kill -9 within which the "
                             "connection must have ended, its pod be gone and its exec "
                             "streams closed (default 30)")
    parser.add_argument("--seed", type=int, default=1,
                        help="random seed of the session mix and the faults (default 1)")
    parser.add_argument("--scenarios", type=lambda v: v.split(","), default=list(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("soak.png"), metavar="FILE",
                        help="write a PNG plot over time here (default soak.png; needs "
                             "matplotlib, from the bench extra)")
    args = parser.parse_args()
    if args.plot and not plotting_available():  # before the run, not after minutes of it
        parser.error(f"--plot needs matplotlib: {BENCH_EXTRA}")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    results = trio.run(soak_main, args)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    sys.exit(0 if results["passed"] else 1)


if __name__ == "__main__":
    main()
