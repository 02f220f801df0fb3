"""The login limiter (sans-IO), the login gate, the password hashing queue."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
import trio
import trio.testing

from kuberun_trio.core.auth import AuthResult
from kuberun_trio.core.refusals import Refusal
from kuberun_trio.gateway.login import TOO_MANY_FAILURES, LoginGate
from kuberun_trio.gateway.throttle import LoginLimiter, LoginPolicy, address_key, login_keys
from kuberun_trio.server import passwords
from kuberun_trio.server.auth import ServerAuthenticator
from kuberun_trio.server.authconfig import AuthConfig, PasswordHashingConfig
from kuberun_trio.server.hashing import HashQueue, HashQueueFull
from kuberun_trio.server.passwords import PasswordFile, cost_class

POLICY = LoginPolicy(free_failures=3, delay=1.0, max_delay=8.0)
A, U = "addr:198.51.100.7", "user:alice"


# == the limiter (sans-IO) ===============================================================

def test_penalty_none_for_the_first_three_then_doubling_to_the_cap() -> None:
    assert [POLICY.penalty(n) for n in range(1, 9)] == [0, 0, 0, 1, 2, 4, 8, 8]


def test_sequential_attempts_wait_their_turns() -> None:
    limiter = LoginLimiter(POLICY)
    now, waits = 0.0, []
    for _ in range(8):  # each attempt comes as soon as the previous one was answered
        admission = limiter.admit([A, U], now)
        assert not admission.refused
        waits.append(admission.wait)
        now += admission.wait
    assert waits == [0, 0, 0, 0, 1, 2, 4, 8]
    assert limiter.charged(A, now) == 8


def test_parallel_attempts_share_the_penalty_and_excess_is_refused_uncharged() -> None:
    limiter = LoginLimiter(POLICY)
    admissions = [limiter.admit(["addr:10.0.0.1", f"user:u{i}"], 0.0) for i in range(300)]
    admitted = [a.wait for a in admissions if not a.refused]
    # four free at once, then turns at 1, 3 and 7 s; the next would be 15 s away (> 8 s)
    assert admitted == [0, 0, 0, 0, 1, 3, 7]
    assert all(a.key == "addr:10.0.0.1" for a in admissions[4:])
    assert limiter.charged("addr:10.0.0.1", 0.0) == 7
    assert limiter.statistics()["refused"] == 293


def test_penalty_box_while_attempts_are_refused() -> None:
    limiter = LoginLimiter(POLICY)
    for _ in range(7):
        limiter.admit([A], 0.0)  # turns booked up to 15 s ahead
    assert limiter.penalized("addr:192.0.2.1", 0.0) == 0.0
    assert limiter.penalized(A, 0.0) == 7.0  # attempts refused until 15 - 8 s
    assert limiter.penalized(A, 6.0) == 4.0  # each dropped connection: 4 s more
    assert limiter.penalized(A, 9.0) == 4.0
    assert limiter.penalized(A, 13.5) == 0.0  # quiet for 4 s, next turn near: out
    assert limiter.admit([A], 13.5).wait == 1.5  # turn at 15, next at 23
    assert limiter.admit([A], 13.6).refused  # 23 is more than 8 s away
    assert limiter.penalized(A, 14.0) == 4.0  # the refusal put it back in the box


def test_a_cancelled_attempt_refunds_nothing() -> None:
    limiter = LoginLimiter(POLICY)
    for _ in range(5):  # attempts that were cancelled while waiting: nothing reported back
        limiter.admit([A, U], 0.0)
    # the next attempt (the pipelined correct guess) starts after every booked turn
    assert limiter.admit([A, U], 0.0).wait == 3.0


def test_username_key_limits_a_distributed_attack() -> None:
    limiter = LoginLimiter(POLICY)
    waits = [limiter.admit([f"addr:203.0.113.{i}", U], 0.0) for i in range(10)]
    assert [w.wait for w in waits if not w.refused] == [0, 0, 0, 0, 1, 3, 7]
    assert waits[-1].key == U


def test_success_resets_its_keys_only() -> None:
    limiter = LoginLimiter(LoginPolicy(free_failures=100))
    for _ in range(5):
        limiter.admit([A, U], 0.0)
        limiter.admit([A, "user:bob"], 0.0)
    limiter.succeeded([A, "user:bob"])
    assert limiter.charged(A, 0.0) == 0 and limiter.charged("user:bob", 0.0) == 0
    assert limiter.charged(U, 0.0) == 5


def test_forgets_after_quiet_time_and_is_bounded() -> None:
    limiter = LoginLimiter(LoginPolicy(forget_after=60.0, max_entries=3))
    for _ in range(6):
        limiter.admit([A], 0.0)
    assert limiter.charged(A, 30.0) == 6
    assert limiter.admit([A], 100.0).wait == 0.0 and limiter.charged(A, 100.0) == 1
    for name in ("x", "y", "z"):
        limiter.admit([f"user:{name}"], 101.0)
    assert limiter.charged(A, 101.0) == 0 and limiter.charged("user:z", 101.0) == 1


@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.9", "addr:192.0.2.9"),
    ("::ffff:192.0.2.9", "addr:192.0.2.9"),
    ("2001:db8:1:2:3:4:5:6", "addr:2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "addr:2001:db8:1:2::/64"),
    ("fe80::1%eth0", "addr:fe80::/64"),
])
def test_address_keys(ip: str, key: str) -> None:
    assert address_key(ip) == key
    assert login_keys(ip, "bob") == (key, "user:bob")


# == the gate ============================================================================

class Recorder:
    """An authenticator that accepts one password and one key, and records each check."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, str]] = []

    def methods(self) -> frozenset[str]:
        return frozenset({"publickey", "password"})

    async def check_public_key(self, connection_id: str, username: str, key: str, *,
                               remote_address: str = "") -> AuthResult | None:
        self.checked.append(("publickey", key))
        return AuthResult(method="publickey", reason="k") if key == "good" else None

    async def check_password(self, connection_id: str, username: str, password: str, *,
                             remote_address: str = "") -> AuthResult | None:
        self.checked.append(("password", password))
        return AuthResult(method="password", reason="p") if password == "right" else None


async def test_gate_waits_before_checking_and_cancelling_refunds_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    auth = Recorder()
    gate = LoginGate(auth, LoginPolicy(max_tries=100, free_failures=1, delay=1.0,
                                       max_delay=16.0))
    state = gate.connection("c1", "192.0.2.1", 5000)
    assert await gate.password(state, "alice", "wrong") == Refusal()
    assert await gate.password(state, "alice", "wrong") == Refusal()  # free: second attempt
    # Pipelining: each request is cancelled by the next before its turn comes.
    for _ in range(3):
        with trio.move_on_after(0.1):
            await gate.password(state, "alice", "wrong")
    assert auth.checked == [("password", "wrong")] * 2  # never reached the authenticator
    start = trio.current_time()
    result = await gate.password(state, "alice", "right")
    assert isinstance(result, AuthResult)
    # turns after 2, 3, 4, 5 attempts: 1 + 2 + 4 + 8 seconds from the first refusal
    assert trio.current_time() - start == pytest.approx(15.0 - 0.3)
    assert gate.completed(state, "alice") is not None
    assert gate.limiter.charged("user:alice", trio.current_time()) == 0


async def test_a_burst_of_good_logins_from_one_address_is_not_refused(
        autojump_clock: trio.testing.MockClock) -> None:
    """Ten parallel logins from one address (a CI runner, a NAT) all get in: turns booked
    behind attempts that then prove themselves are booked afresh, not refused. The same
    burst of wrong passwords is still refused, since nothing resets its keys."""
    class Slow(Recorder):  # a check takes a while (a hash, a webhook): the burst overlaps
        async def check_password(self, connection_id: str, username: str, password: str, *,
                                 remote_address: str = "") -> AuthResult | None:
            await trio.sleep(0.05)
            return await super().check_password(connection_id, username, password)

    gate = LoginGate(Slow())  # the defaults: 3 free, 1 s doubling, refused beyond 10 s
    results: list[object] = []

    async def login(n: int, password: str) -> None:
        state = gate.connection(f"c{n}", "192.0.2.9", 1000 + n)
        result = await gate.password(state, "erin", password)
        if isinstance(result, AuthResult):
            assert gate.completed(state, "erin") is not None  # asyncssh's auth_completed
        results.append(result)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(login, n, "right")
    assert all(isinstance(r, AuthResult) for r in results), results
    assert trio.current_time() - start < 1.0  # no turn waited out its penalty
    results.clear()
    throttled: list[float] = []

    async def guess(n: int) -> None:
        await login(n, "wrong")
        if isinstance(results[-1], Refusal) and results[-1].banner:
            throttled.append(trio.current_time() - start)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(guess, n)
    assert len(results) == 10 and all(isinstance(r, Refusal) for r in results)
    assert throttled and gate.limiter.refused > 0  # refused without being checked
    # refused as soon as the first guesses are known to have failed, not after maxDelay
    assert max(throttled) < 1.0, throttled


async def test_gate_counts_tries_and_disconnects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kuberun_trio.gateway.login")
    gate = LoginGate(Recorder(), LoginPolicy(max_tries=3, free_failures=100))
    state = gate.connection("c2", "192.0.2.2", 1)
    assert await gate.check_key(state, "bob", "bad1", signed=False) == Refusal()
    assert await gate.check_key(state, "bob", "good", signed=False) is not None  # not counted
    assert await gate.password(state, "bob", "nope") == Refusal()
    assert await gate.check_key(state, "bob", "bad2", signed=False) == \
        Refusal(disconnect=TOO_MANY_FAILURES)
    assert await gate.password(state, "bob", "right") == Refusal(disconnect=TOO_MANY_FAILURES)
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["auth-max-tries", "auth-max-tries"]
    assert caplog.records[0].reason == TOO_MANY_FAILURES  # type: ignore[attr-defined]


async def test_a_key_query_proves_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kuberun_trio.gateway.login")
    gate = LoginGate(Recorder(), LoginPolicy(free_failures=100))
    state = gate.connection("c3", "192.0.2.3", 1)
    for _ in range(4):
        await gate.password(gate.connection("cx", "192.0.2.3", 2), "carol", "wrong")
    assert await gate.check_key(state, "carol", "good", signed=False) is not None
    assert state.proof is None
    assert gate.completed(state, "carol") is None  # nothing proven: no allow line
    assert gate.limiter.charged("addr:192.0.2.3", 0) == 4
    assert not [r for r in caplog.records if getattr(r, "result", "") == "allow"]


async def test_allow_logged_once_with_method_and_fingerprint(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kuberun_trio.gateway.login")
    gate = LoginGate(Recorder())
    state = gate.connection("c4", "2001:db8::7", 22)
    assert await gate.turn(state, "dave", "publickey") is None
    result = await gate.check_key(state, "dave", "good", signed=True)
    assert isinstance(result, AuthResult)
    gate.proven_key(state, result, "SHA256:abc")
    assert gate.completed(state, "dave") is not None
    allow, = [r for r in caplog.records if getattr(r, "result", "") == "allow"]
    assert allow.getMessage() == "auth allow: user 'dave' from [2001:db8::7]:22 by " \
                                 "publickey SHA256:abc"
    assert (allow.event, allow.method, allow.fingerprint) == (  # type: ignore[attr-defined]
        "auth", "publickey", "SHA256:abc")


# == the hashing queue and the password file ============================================

async def test_hash_queue_one_per_source_and_bounded() -> None:
    queue = HashQueue(threads=1, queue=1)
    release = threading.Event()
    done: list[str] = []

    def slow(name: str) -> str:
        release.wait(10)
        return name

    async def run(source: str) -> None:
        done.append(await queue.run(source, slow, source))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a")
        nursery.start_soon(run, "b")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(HashQueueFull, match="from this address is already running"):
            await queue.run("a", slow, "a")
        with pytest.raises(HashQueueFull, match="too many password checks waiting"):
            await queue.run("c", slow, "c")
        assert queue.statistics() == {"pending": 2, "running": 1, "refused": 2}
        release.set()
    assert sorted(done) == ["a", "b"]


async def test_a_flood_from_one_address_does_not_starve_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix every check queued FIFO behind the flood's (2 threads)."""
    (tmp_path / "pw").write_text(
        "alice:" + bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=8)).decode() + "\n")
    auth = ServerAuthenticator(AuthConfig(password_file=str(tmp_path / "pw"),
                                          password_hashing=PasswordHashingConfig(threads=2)),
                               logger=logging.getLogger("test.hashing"))
    hashed: list[str] = []
    real = passwords.check_password

    def counting(target: str, password: str) -> bool:
        hashed.append(password)
        return real(target, password)

    monkeypatch.setattr(passwords, "check_password", counting)
    hashed_before_legit: list[int] = []

    async def attempt(who: str, password: str, remote: str) -> None:
        result = await auth.check_password(who, "alice", password, remote_address=remote)
        if who == "legit":
            assert result is not None
            hashed_before_legit.append(len(hashed))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(attempt, f"flood{i}", "wrong", f"198.51.100.7:{1000 + i}")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(attempt, "legit", "right", "192.0.2.50:4000")
    # the flood's address had one check running; the others were refused at once
    assert hashed_before_legit[0] <= 2, hashed_before_legit
    assert hashed.count("wrong") == 1


async def test_every_user_costs_one_hash_of_each_class(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix an unknown user cost like the file's first entry only."""
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    (tmp_path / "pw").write_text("\n".join([
        "alice:" + cheap.hash("a"),
        "bob:" + bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=5)).decode(),
        "carol:" + cheap.hash("c"), ""]))
    pw = PasswordFile(str(tmp_path / "pw"), logging.getLogger("test.hashing"))
    seen: list[tuple[Any, ...]] = []
    real = passwords.check_password

    def spy(hashed: str, password: str) -> bool:
        seen.append(cost_class(hashed))
        return real(hashed, password)

    monkeypatch.setattr(passwords, "check_password", spy)
    costs = {}
    for user, password, ok in [("alice", "a", True), ("bob", "b", True), ("bob", "x", False),
                               ("mallory", "a", False), ("carol", "x", False)]:
        seen.clear()
        check = await pw.verify(user, password, source=user)
        assert check.ok is ok
        costs[user] = list(seen)
    assert len(costs["alice"]) == 2
    assert costs["alice"] == costs["bob"] == costs["mallory"] == costs["carol"]
