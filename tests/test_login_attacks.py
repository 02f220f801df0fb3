"""Login attacks against ``python -m kuberun_trio`` on the embedded cluster.

The attacker is asyncssh (:mod:`benchmarks.attacks`), the honest user the OpenSSH client.
One gateway serves the module; each test attacks from its own source addresses
(127.0.0.0/8) and usernames, so the limiter state of one test does not touch another.
The policy is shortened (delay 0.5 s, at most 2 s) to keep the tests quick; each bound
below follows from it.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2
import asyncssh
import pytest
import trio
import trio_asyncio

from benchmarks.abuse import GatewayServer, checked_guesses
from benchmarks.attacks import AttemptLog, attack_connection
from kuberun_trio.aio.bridge import open_aio_loop

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH")

DELAY, MAX_DELAY, FREE = 0.5, 2.0, 3
USERS = ("par", "pipe", "query", "tries", "keys", "honest", "boxed")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    server = GatewayServer(
        tmp_path_factory.mktemp("gw"), users=USERS,
        hasher=argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
        auth={"throttle": {"freeFailures": FREE, "delay": f"{DELAY}s",
                           "maxDelay": f"{MAX_DELAY}s"}})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def guesses(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


async def attack(port: int, username: str, tries: Iterator[str], **kw: Any) -> AttemptLog:
    log: AttemptLog = await trio_asyncio.aio_as_trio(attack_connection)(
        port, username, tries, **kw)
    return log


def records(gateway: GatewayServer, **match: Any) -> list[dict[str, Any]]:
    return [r for r in gateway.records() if all(r.get(k) == v for k, v in match.items())]


async def test_parallel_connections_share_the_penalty(gateway: GatewayServer) -> None:
    """Before the fix each connection slept on its own: 30 x 6 guesses were all checked."""
    tries = guesses("par")
    async with open_aio_loop():
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(functools.partial(attack, gateway.port, "par", tries,
                                                     source="127.0.7.1"))
        elapsed = trio.current_time() - start
    checked = len(checked_guesses(gateway.records(), "par"))
    # FREE + 1 at once, then one per turn, DELAY apart at least
    assert 0 < checked <= FREE + 2 + elapsed / DELAY, (checked, elapsed)
    assert records(gateway, event="auth-throttled", username="par")


async def test_pipelined_guesses_do_not_skip_the_wait(gateway: GatewayServer) -> None:
    """Before the fix the right guess behind 40 pipelined wrong ones got in at once."""
    async with open_aio_loop():
        for i in range(FREE + 2):  # one failure more than free: the next turn is DELAY away
            await attack(gateway.port, "pipe", iter([f"wrong-{i}"]), source="127.0.7.2")
        before = len(checked_guesses(gateway.records(), "pipe"))
        start = trio.current_time()
        tries = itertools.chain((f"piped-{i}" for i in range(40)), [gateway.password["pipe"]])
        log = await attack(gateway.port, "pipe", tries, source="127.0.7.2", pipeline=40)
        elapsed = trio.current_time() - start
    checked = len(checked_guesses(gateway.records(), "pipe")) - before
    assert checked <= 2, "pipelined guesses were checked without waiting their turns"
    if log.ended == "success":  # only once its turn came
        assert elapsed >= 2 * DELAY * 0.9, elapsed
    assert not records(gateway, event="auth", result="allow", username="pipe") \
        or elapsed >= 2 * DELAY * 0.9


async def test_key_query_neither_resets_nor_logs_allow(gateway: GatewayServer) -> None:
    """Before the fix an unsigned query for an authorized key logged allow and reset."""
    assert gateway.key is not None
    public = asyncssh.import_public_key(gateway.key.export_public_key("openssh"))
    async with open_aio_loop():
        for i in range(FREE + 2):
            await attack(gateway.port, "query", iter([f"wrong-{i}"]), source="127.0.7.3")
        log = await attack(gateway.port, "query", iter([]), source="127.0.7.3",
                           query_key=public)
        assert log.ended != "success"
        # not reset: the next guess still waits (or is refused)
        await attack(gateway.port, "query", iter(["again"]), source="127.0.7.3")
    assert not records(gateway, event="auth", result="allow", username="query")
    assert records(gateway, event="auth", reason="bad signature", username="query")
    assert [r for r in gateway.records() if r.get("username") == "query"
            and r.get("event") in ("auth-delayed", "auth-throttled")]


def openssh(gateway: GatewayServer, tmp: Path, user: str, source: str, *options: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(gateway.port), "-b", source,
         "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp / 'kh'}",
         "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", *options,
         f"{user}@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_AUTH_SOCK": "", **(env or {})})


def write_keys(tmp: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp / f"id_{i}"
        path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        path.chmod(0o600)
        paths.append(path)
    return paths


async def test_openssh_offering_too_many_keys_is_disconnected(
        gateway: GatewayServer, tmp_path: Path) -> None:
    """Before the fix the client could offer any number of keys."""
    keys = write_keys(tmp_path, 8)
    identities = [arg for k in keys for arg in ("-i", str(k))]
    result = await trio.to_thread.run_sync(lambda: openssh(
        gateway, tmp_path, "keys", "127.0.7.4", "-o", "BatchMode=yes",
        "-o", "PreferredAuthentications=publickey", *identities))
    assert result.returncode == 255
    assert "too many authentication failures" in result.stderr.lower(), result.stderr
    line, = records(gateway, event="auth-max-tries", username="keys")
    assert line["tries"] == 6
    denied = records(gateway, event="auth", result="deny", username="keys")
    assert len(denied) == 6 and all(d["fingerprint"].startswith("SHA256:") for d in denied)


async def test_openssh_wrong_passwords_disconnected_after_max_tries(
        gateway: GatewayServer, tmp_path: Path) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho not-the-password\n")
    askpass.chmod(askpass.stat().st_mode | stat.S_IXUSR)
    result = await trio.to_thread.run_sync(lambda: openssh(
        gateway, tmp_path, "tries", "127.0.7.5", "-o", "NumberOfPasswordPrompts=20",
        "-o", "PreferredAuthentications=password",
        env={"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}))
    assert result.returncode == 255
    assert "too many authentication failures" in result.stderr.lower(), result.stderr
    assert len(records(gateway, event="auth-max-tries", username="tries")) == 1


async def test_allow_logged_once_with_the_key_fingerprint(
        gateway: GatewayServer, tmp_path: Path) -> None:
    """Before the fix ``allow`` came from the unsigned query, without the fingerprint."""
    assert gateway.key is not None
    wrong, = write_keys(tmp_path, 1)
    right = tmp_path / "id_right"
    right.write_bytes(gateway.key.export_private_key())
    right.chmod(0o600)
    result = await trio.to_thread.run_sync(lambda: openssh(
        gateway, tmp_path, "honest", "127.0.7.6", "-o", "BatchMode=yes",
        "-o", "PreferredAuthentications=publickey", "-i", str(wrong), "-i", str(right)))
    assert result.returncode == 0, result.stderr
    keygen = await trio.run_process(["ssh-keygen", "-lf", str(right)], capture_stdout=True)
    fingerprint = keygen.stdout.decode().split()[1]
    allow, = records(gateway, event="auth", result="allow", username="honest")
    assert (allow["method"], allow["fingerprint"]) == ("publickey", fingerprint)
    assert allow["message"].endswith(f"by publickey {fingerprint}")


async def test_penalized_address_is_dropped_before_the_key_exchange(
        gateway: GatewayServer) -> None:
    async with open_aio_loop():
        stop = trio.current_time() + 5

        async def flood() -> None:
            tries = guesses("box")
            while trio.current_time() < stop:
                await attack(gateway.port, "boxed", tries, source="127.0.7.8")

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(flood)
            await trio.sleep(3)  # its attempts are being refused by now
            boxed = await attack(gateway.port, "boxed", iter(["x"]), source="127.0.7.8")
            elsewhere = await attack(gateway.port, "honest", iter([gateway.password["honest"]]),
                                     source="127.0.7.9")
    assert boxed.prompts == 0, boxed  # no key exchange, no auth
    assert boxed.ended.startswith(("ConnectionLost", "ConnectionReset")), boxed
    assert elsewhere.ended == "success", elsewhere
    dropped = records(gateway, event="auth-throttled-connection")
    assert dropped and all(r["remote_address"].startswith("127.0.7.8:") for r in dropped)
