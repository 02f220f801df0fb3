"""The abuse benchmark: attack a real gateway and measure what the attacker gets.

``python -m benchmarks.abuse [--quick] [--json FILE] [--only NAME[,NAME]] [--logs DIR]``

Theory of operation
-------------------
A real ``python -m kuberun_trio`` runs on the embedded cluster (:class:`GatewayServer`),
with a password file (argon2, default cost), an authorized key, JSON logs to a file and
an otherwise default configuration. Attack clients are asyncssh on plain asyncio
(:mod:`.attacks`), from source addresses in 127.0.0.0/8, so one machine can be many
attackers. Each scenario is a function in :data:`SCENARIOS` taking a :class:`Bench` and
returning a dict of numbers (with its goal and whether it was met); a new scenario is one
more function there. Scenarios use their own usernames and source addresses, so the
gateway's login limiter state of one does not help or hurt another.

*Guesses per second* are counted where they matter, on the server: a password guess is a
credential the gateway actually checked (an ``auth`` log line with the password file's
verdict). A throttled reply tells the attacker nothing, so it is not a guess. The rate is
taken after the attacker's first 5 checked guesses, until the attack stops.

The limit scenarios (channels per connection, connections per user) start a second
gateway with ``security.maxSessions`` / ``security.maxConnectionsPerUser`` = 10 and report
``supported: false`` when this build refuses those keys. Pods left after an API stall
longer than ``podStop`` are measured by :mod:`.abuse_stall` in a process of its own (its
own cluster, whose API server it stalls).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import argon2
import asyncssh
import attrs

from .attacks import attack_connection
from .procstats import percentile, raise_fd_limit

GUESS_GOAL = 1.0
"""Goal: at most this many checked guesses per second (per address, per username)."""
LATENCY_GOAL = 3.0
"""Goal: p99 of a legitimate password login during the flood, seconds."""
USERS = ("victim1", "victim2", "victim3", "victim4", "victim5", "bob")


@attrs.define
class GatewayServer:
    """``python -m kuberun_trio`` on the embedded cluster, JSON logs in a file."""

    workdir: Path
    auth: dict[str, Any] = attrs.field(factory=dict)
    """More keys of the ``auth`` section (``maxTries``, ``throttle``, ...)."""
    more: dict[str, Any] = attrs.field(factory=dict)
    """More top-level sections of the configuration."""
    hasher: argon2.PasswordHasher = attrs.field(factory=argon2.PasswordHasher)
    users: tuple[str, ...] = USERS
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    password: dict[str, str] = attrs.field(factory=dict)
    key: asyncssh.SSHKey | None = None

    @property
    def logfile(self) -> Path:
        return self.workdir / "gateway.log"

    def write_files(self) -> Path:
        self.password = {user: f"{user}-{secrets.token_hex(4)}" for user in self.users}
        (self.workdir / "passwords").write_text(
            "".join(f"{u}:{self.hasher.hash(p)}\n" for u, p in self.password.items()))
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        (self.workdir / "authorized_keys").write_text(
            self.key.export_public_key("openssh").decode())
        config = self.workdir / "gateway.yaml"  # JSON is YAML
        config.write_text(json.dumps({
            "ssh": {"listen": "127.0.0.1:0"},
            "auth": {"passwordFile": str(self.workdir / "passwords"),
                     "authorizedKeys": [str(self.workdir / "authorized_keys")], **self.auth},
            "log": {"format": "json"}, "instance": f"abuse-{secrets.token_hex(3)}",
            **self.more}))
        return config

    def start(self) -> None:
        config = self.write_files()
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        with open(self.logfile, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kuberun_trio", "--config", str(config), "--cluster",
                 "embedded", "--state-dir", str(self.workdir / "state")],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            if " listening on " in line:
                self.port = int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"gateway did not start: {self.logfile.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logfile.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def stamp(record: dict[str, Any]) -> float:
    return datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


def checked_guesses(records: list[dict[str, Any]], username: str) -> list[float]:
    """Times (epoch) of the password checks the gateway made for ``username``."""
    return sorted(stamp(r) for r in records
                  if r.get("event") == "auth" and r.get("username") == username
                  and r.get("method") == "password"
                  and (r.get("result") == "allow" or "password file:" in r.get("reason", "")))


def guess_rate(times: list[float], end: float, skip: int = 5) -> float:
    """Checked guesses per second after the first ``skip`` (0 when there are no more)."""
    if len(times) <= skip:
        return 0.0
    return (len(times) - skip) / max(end - times[skip - 1], 1e-3)


@attrs.define
class Bench:
    server: GatewayServer
    duration: float
    """Seconds each attack runs."""
    flood: int
    """Connections of the parallel attack and of the flood."""
    quick: bool


def wrong(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


async def _run_for(seconds: float, make: Callable[[], Any], parallel: int) -> list[Any]:
    """Keep ``parallel`` attacking connections going for ``seconds``."""
    results: list[Any] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            results.append(await make())

    with contextlib.suppress(TimeoutError):  # the last connections end at maxTries
        async with asyncio.timeout(seconds + 90):
            await asyncio.gather(*(worker() for _ in range(parallel)))
    return results


def _rate_result(bench: Bench, username: str, began: float, end: float,
                 logs: list[Any]) -> dict[str, Any]:
    times = [t for t in checked_guesses(bench.server.records(), username) if t >= began - 1]
    rate = guess_rate(times, end)
    return {"checked_guesses": len(times), "attempts_sent": sum(x.sent for x in logs),
            "connections": len(logs), "logins": sum(x.ended == "success" for x in logs),
            "guesses_per_s_after_5": round(rate, 3), "goal_per_s": GUESS_GOAL,
            "met": rate <= GUESS_GOAL and not any(x.ended == "success" for x in logs),
            "seconds": round(end - began, 1)}


# == scenarios ==========================================================================

async def parallel_guessing(bench: Bench) -> dict[str, Any]:
    """Many parallel connections from one address guess one user's password."""
    guesses = wrong("p")
    began = time.time()
    logs = await _run_for(bench.duration, lambda: attack_connection(
        bench.server.port, "victim1", guesses, source="127.0.1.1"), bench.flood)
    return _rate_result(bench, "victim1", began, time.time(), logs)


async def distributed_guessing(bench: Bench) -> dict[str, Any]:
    """One user's password guessed from 50 addresses (the per-username limit)."""
    guesses = wrong("d")
    sources = itertools.cycle(f"127.0.2.{i}" for i in range(1, 51))
    began = time.time()
    logs = await _run_for(bench.duration, lambda: attack_connection(
        bench.server.port, "victim2", guesses, source=next(sources)), 50)
    return _rate_result(bench, "victim2", began, time.time(), logs)


async def pipelined_guessing(bench: Bench) -> dict[str, Any]:
    """Each connection pipelines 40 wrong guesses; at the end, 40 wrong and the right one."""
    guesses = wrong("q")
    began = time.time()
    logs = await _run_for(bench.duration, lambda: attack_connection(
        bench.server.port, "victim3", guesses, source="127.0.3.1", pipeline=40), 1)
    result = _rate_result(bench, "victim3", began, time.time(), logs)
    result["disconnects"] = sorted({x.ended for x in logs})
    # The right guess last in a pipeline: it gets in only once its turn has come.
    start = time.monotonic()
    before = len(checked_guesses(bench.server.records(), "victim3"))
    last = await attack_connection(
        bench.server.port, "victim3",
        itertools.chain(itertools.islice(wrong("r"), 40), [bench.server.password["victim3"]]),
        source="127.0.3.1", pipeline=40)
    checked = len(checked_guesses(bench.server.records(), "victim3")) - before
    result["right_guess"] = {
        "ended": last.ended, "checked_on_that_connection": checked,
        "in_after_s": None if last.success_at is None else round(last.success_at - start, 2)}
    return result


async def key_query_guessing(bench: Bench) -> dict[str, Any]:
    """Guesses interleaved with unsigned queries for an authorized key (public half only)."""
    assert bench.server.key is not None
    public = asyncssh.import_public_key(bench.server.key.export_public_key("openssh"))
    guesses = wrong("k")
    began = time.time()
    logs = await _run_for(bench.duration, lambda: attack_connection(
        bench.server.port, "victim4", guesses, source="127.0.4.1", query_key=public), 20)
    result = _rate_result(bench, "victim4", began, time.time(), logs)
    allows = [r for r in bench.server.records()
              if r.get("event") == "auth" and r.get("result") == "allow"
              and r.get("username") == "victim4"]
    result["allow_lines"] = len(allows)
    result["met"] = result["met"] and not allows
    return result


async def _probe(bench: Bench, count: int, source: str) -> dict[str, Any]:
    """Legitimate logins from their own process (see :mod:`.attacks`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.attacks", str(bench.server.port), "bob", source,
        str(count), "0.5", stdout=subprocess.PIPE,
        env={**os.environ, "LOGIN_PASSWORD": bench.server.password["bob"]})
    out, _ = await proc.communicate()
    result: dict[str, Any] = json.loads(out)
    return result


def _latency(probe: dict[str, Any]) -> dict[str, Any]:
    values = probe["latencies"]
    return {"logins": len(values), "errors": probe["errors"][:3],
            "p50_s": round(statistics.median(values), 3) if values else None,
            "p99_s": round(percentile(values, 99), 3) if values else None}


async def login_during_flood(bench: Bench) -> dict[str, Any]:
    """A legitimate password login from another address while one address floods."""
    count = 6 if bench.quick else 20
    baseline = _latency(await _probe(bench, count, "127.0.5.2"))
    stop = asyncio.Event()
    guesses = wrong("f")
    flood_logs: list[Any] = []

    async def flooder() -> None:
        while not stop.is_set():
            flood_logs.append(await attack_connection(bench.server.port, "victim5", guesses,
                                                      source="127.0.5.1"))

    tasks = [asyncio.ensure_future(flooder()) for _ in range(bench.flood)]
    await asyncio.sleep(3 if bench.quick else 5)  # let the flood build up
    during = _latency(await _probe(bench, count, "127.0.5.3"))
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    p99 = during["p99_s"] if during["p99_s"] is not None else float("inf")
    return {"baseline_no_flood": baseline, "during_flood": during,
            "flood_connections": bench.flood, "flood_attempts": sum(x.sent for x in flood_logs),
            "flood_logins": sum(x.ended == "success" for x in flood_logs),
            "p99_ratio_to_baseline": round(p99 / baseline["p99_s"], 1)
            if baseline["p99_s"] else None,
            "goal_p99_s": LATENCY_GOAL, "met": p99 < LATENCY_GOAL and not during["errors"]}


LIMIT = 10
"""``security.maxSessions`` and ``security.maxConnectionsPerUser`` in the limit scenarios."""


@contextlib.asynccontextmanager
async def _limits_server(bench: Bench) -> Any:
    """A second gateway with ``security`` limits; None if this build does not know them."""
    server = GatewayServer(
        bench.server.workdir / f"limits-{secrets.token_hex(2)}", users=("bob",),
        more={"security": {"maxSessions": LIMIT, "maxConnectionsPerUser": LIMIT}})
    server.workdir.mkdir(parents=True)
    try:
        await asyncio.to_thread(server.start)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).splitlines() if "security" in ln]
        yield None, (lines[0] if lines else str(exc)[-300:]).strip()
        await asyncio.to_thread(server.stop)
        return
    try:
        yield server, ""
    finally:
        await asyncio.to_thread(server.stop)


async def _key_login(server: GatewayServer) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", server.port, username="bob",
                                  client_keys=[server.key], known_hosts=None, agent_path=None)


async def channels_per_connection(bench: Bench) -> dict[str, Any]:
    """Session channels one connection gets (goal: security.maxSessions, exactly)."""
    async with _limits_server(bench) as (server, why):
        if server is None:
            return {"supported": False, "reason": why, "met": None}
        async with await _key_login(server) as conn:
            opened, refusal = 0, ""
            for _ in range(LIMIT + 5):
                try:
                    await conn.create_process("sleep 60")
                except asyncssh.ChannelOpenError as exc:
                    refusal = exc.reason
                    break
                opened += 1
            conn.abort()
    return {"limit": LIMIT, "achieved": opened, "refusal": refusal, "met": opened == LIMIT}


async def connections_per_user(bench: Bench) -> dict[str, Any]:
    """Connections one user gets (goal: security.maxConnectionsPerUser, exactly)."""
    async with _limits_server(bench) as (server, why):
        if server is None:
            return {"supported": False, "reason": why, "met": None}
        conns, refusal = [], ""
        try:
            for _ in range(LIMIT + 5):
                try:
                    conns.append(await _key_login(server))
                except (asyncssh.Error, OSError) as exc:
                    refusal = f"{type(exc).__name__}: {exc}"
                    break
        finally:
            for conn in conns:
                conn.abort()
    return {"limit": LIMIT, "achieved": len(conns), "refusal": refusal,
            "met": len(conns) == LIMIT}


async def pods_after_api_stall(bench: Bench) -> dict[str, Any]:
    """Pods left after the API server stalls longer than podStop while clients connect
    (goal: 0 within one sweep). Its own gateway and cluster: ``benchmarks.abuse_stall``."""
    with tempfile.TemporaryDirectory(prefix="abuse-stall-") as tmp:
        out = Path(tmp) / "stall.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.abuse_stall", "--json", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await proc.wait()
        if not out.exists():
            return {"error": f"benchmarks.abuse_stall exited {proc.returncode}", "met": False}
        result: dict[str, Any] = json.loads(out.read_text())
    result["met"] = result["pods_left_after_one_sweep"] == 0
    return result


SCENARIOS: dict[str, Callable[[Bench], Any]] = {
    "parallel": parallel_guessing,
    "distributed": distributed_guessing,
    "pipelined": pipelined_guessing,
    "key_query": key_query_guessing,
    "login_during_flood": login_during_flood,
    "channels_per_connection": channels_per_connection,
    "connections_per_user": connections_per_user,
    "pods_after_api_stall": pods_after_api_stall,
}
"""Every scenario by name, run in this order (``--only`` picks some)."""


async def run_scenarios(bench: Bench, names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        print(f"-- {name}: {SCENARIOS[name].__doc__}", flush=True)
        started = time.monotonic()
        results[name] = await SCENARIOS[name](bench)
        results[name]["wall_s"] = round(time.monotonic() - started, 1)
        print(f"   {json.dumps(results[name])}", flush=True)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; "
                         f"known: {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        workdir = Path(args.logs or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        server = GatewayServer(workdir)
        server.start()
        try:
            bench = Bench(server, duration=args.duration or (8.0 if args.quick else 30.0),
                          flood=args.flood or (60 if args.quick else 300), quick=args.quick)
            results = asyncio.run(run_scenarios(bench, names))
        finally:
            server.stop()
    return {"config": {"quick": args.quick, "duration_s": bench.duration, "flood": bench.flood},
            "scenarios": results,
            "met": all(r.get("met") is not False for r in results.values())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short attacks, 60-connection flood")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    parser.add_argument("--duration", type=float, help="seconds per attack (default 30, quick 8)")
    parser.add_argument("--flood", type=int, help="parallel connections (default 300, quick 60)")
    parser.add_argument("--logs", type=Path, help="keep the gateway's files and log here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
