"""``gateway/connection.py``'s failure paths, driven on purpose.

A :class:`ConnectionRuntime` runs against a scripted handler (its pod is Ready
when the test says, lost when the test says, or its start fails) and scripted
sessions whose exec is an asyncio coroutine the test controls. Each test drives
one path the end-to-end tests never reach on purpose, and would fail if that
code were removed: the per-session error boundary, the catch-all in ``run``,
``FAILURE_LINGER`` expiring, ``drain`` with nothing or only pending sessions
running, closing after the last session of a drain, a failing or hanging
signal exec, and a signal before the pod is Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from kuberun_trio.aio import sshsession
from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.execstream import ExecResult
from kuberun_trio.core.auth import AuthResult
from kuberun_trio.core.podstate import PodLoss
from kuberun_trio.core.session import SessionConfig, SignalPlan
from kuberun_trio.errors import PodStartError
from kuberun_trio.gateway import connection
from kuberun_trio.gateway.connection import CLOSE_LINGER, FAILURE_LINGER, ConnectionRuntime
from kuberun_trio.gateway.pod import ConnectedPod

Behaviour = Callable[[Any], Awaitable[ExecResult]]
"""An asyncio coroutine function standing in for ``GatewaySession.serve_exec``."""


class ScriptedHandler:
    """The parts of :class:`ConnectionHandler` that :class:`ConnectionRuntime` uses."""

    connection_id = "conn-1"
    client_address = "192.0.2.1:2222"

    def __init__(self, *, fail: BaseException | None = None, signal_timeout: float = 5) -> None:
        self.fail = fail
        self.ready = trio.Event()
        self.lost = trio.Event()
        self.deleted = trio.Event()
        timeouts = SimpleNamespace(signal=signal_timeout, command_start=60.0)
        self.config = SimpleNamespace(timeouts=timeouts, pod=SimpleNamespace(mode="connection"))

    @contextlib.asynccontextmanager
    async def connected(self, username: str, auth: AuthResult) -> AsyncIterator[ConnectedPod]:
        if self.fail is not None:
            raise self.fail
        await self.ready.wait()
        try:
            yield ConnectedPod("default", "pod-1", "shell", {})
        finally:
            self.deleted.set()

    async def wait_lost(self, pod: ConnectedPod) -> PodLoss:
        await self.lost.wait()
        return PodLoss("Deleted", "gone")


class Machine:
    plan = None


class ScriptedSession:
    """The parts of :class:`GatewaySession` the runtime uses; records what it was told."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.machine = Machine()
        self.behaviour = behaviour
        self.failed: list[str] = []
        self.notices: list[str] = []
        self.abort: Callable[[], None] | None = None
        self.result: ExecResult | None = None
        self.recording = None

    def fail(self, reason: str) -> None:
        self.failed.append(reason)

    def notice(self, message: str) -> None:
        self.notices.append(message)

    async def serve_exec(self, target: sshsession.ExecTarget) -> ExecResult:
        self.result = await self.behaviour(target)
        return self.result


class Gate:
    """A session that runs until the test opens its gate (asyncio side)."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None
        self.started = trio.Event()

    async def __call__(self, target: Any) -> ExecResult:
        self.event = asyncio.Event()
        self.started.set()
        await self.event.wait()
        return ExecResult(0)

    def open(self) -> None:
        assert self.event is not None
        self.event.set()


def runtime(handler: ScriptedHandler) -> tuple[ConnectionRuntime, list[str]]:
    closes: list[str] = []
    rt = ConnectionRuntime(
        handler,  # type: ignore[arg-type]
        SessionConfig(), username="alice", auth=AuthResult(),
        make_target=lambda pod: sshsession.ExecTarget(None, pod.namespace, pod.name,
                                                      pod.container),
        close_connection=lambda: closes.append("closed"))
    return rt, closes


def submit(rt: ConnectionRuntime, session: ScriptedSession) -> None:
    rt.submit(session)  # type: ignore[arg-type]


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "event", "") for r in caplog.records]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


# -- the per-session error boundary -----------------------------------------------------------

async def test_one_session_crashing_leaves_its_siblings_and_the_connection(
        aio_loop: None, caplog: pytest.LogCaptureFixture) -> None:
    async def crash(target: Any) -> ExecResult:
        raise RuntimeError("boom")

    handler = ScriptedHandler()
    rt, closes = runtime(handler)
    sibling_gate = Gate()
    crashing, sibling = ScriptedSession(crash), ScriptedSession(sibling_gate)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        submit(rt, sibling)
        submit(rt, crashing)
        handler.ready.set()
        with trio.fail_after(10):
            await sibling_gate.started.wait()
            while "session-error" not in events(caplog):
                await trio.sleep(0.01)
        assert crashing.failed == ["internal error in the gateway (connection conn-1)"]
        sibling_gate.open()
        with trio.fail_after(10):
            while sibling.result is None:
                await trio.sleep(0.01)
        assert sibling.failed == [] and sibling.result == ExecResult(0)
        assert not handler.deleted.is_set() and closes == []  # the connection lives on
        rt.closed()
    assert handler.deleted.is_set()
    assert events(caplog).count("session-exit") == 2


# -- the catch-all in run ---------------------------------------------------------------------

async def test_an_unexpected_error_in_run_is_contained_and_told(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    rt, closes = runtime(ScriptedHandler(fail=RuntimeError("bug")))
    waiting = ScriptedSession(Gate())
    submit(rt, waiting)  # opened before the pod: pending
    with trio.fail_after(60):
        await rt.run()  # does not raise
    assert waiting.failed == ["internal error in the gateway (connection conn-1)"]
    assert closes == ["closed"] and rt.finished.is_set()
    crashed = [r for r in caplog.records if getattr(r, "event", "") == "connection-error"]
    assert crashed and crashed[0].exc_info is not None  # the traceback is in the log


# -- FAILURE_LINGER ---------------------------------------------------------------------------

async def test_a_failed_connection_lingers_for_a_session_then_closes(
        autojump_clock: trio.testing.MockClock) -> None:
    rt, closes = runtime(ScriptedHandler(fail=PodStartError("pod-1", "ErrImagePull", "nope")))
    started = trio.current_time()
    with trio.fail_after(60):  # without the bound it would wait forever for a session
        await rt.run()
    assert trio.current_time() - started == pytest.approx(FAILURE_LINGER + CLOSE_LINGER)
    assert closes == ["closed"]


async def test_a_session_opened_during_the_linger_hears_why(
        autojump_clock: trio.testing.MockClock) -> None:
    rt, closes = runtime(ScriptedHandler(fail=PodStartError("pod-1", "ErrImagePull", "nope")))
    late = ScriptedSession(Gate())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        await trio.sleep(1)  # virtual: the client opens its session a second later
        submit(rt, late)
        started = trio.current_time()
        await rt.finished.wait()
    assert late.failed == ["ErrImagePull: nope"]
    assert trio.current_time() - started < FAILURE_LINGER  # told: no need to wait longer
    assert closes == ["closed"]


# -- drain ------------------------------------------------------------------------------------

async def test_drain_with_no_sessions_closes_at_once(aio_loop: None) -> None:
    handler = ScriptedHandler()
    rt, closes = runtime(handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        handler.ready.set()
        with trio.fail_after(10):
            while rt._nursery is None:
                await trio.sleep(0.01)
        rt.drain("the gateway is shutting down")
        with trio.fail_after(10):
            await rt.finished.wait()
    assert closes == ["closed"] and handler.deleted.is_set()


async def test_drain_with_only_pending_sessions_tells_them_and_closes() -> None:
    handler = ScriptedHandler()  # the pod never gets Ready
    rt, closes = runtime(handler)
    pending = ScriptedSession(Gate())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        submit(rt, pending)
        await trio.testing.wait_all_tasks_blocked()
        rt.drain("the gateway is shutting down")
        with trio.fail_after(10):
            await rt.finished.wait()
    assert pending.notices == ["the gateway is shutting down"]
    assert pending.failed == ["the gateway is shutting down"]
    assert closes == ["closed"]


async def test_drain_closes_once_the_last_running_session_ends(aio_loop: None) -> None:
    handler = ScriptedHandler()
    rt, closes = runtime(handler)
    gates = [Gate(), Gate()]
    sessions = [ScriptedSession(g) for g in gates]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        for s in sessions:
            submit(rt, s)
        handler.ready.set()
        with trio.fail_after(10):
            for g in gates:
                await g.started.wait()
        rt.drain("draining")
        assert [s.notices for s in sessions] == [["draining"], ["draining"]]
        refused = ScriptedSession(Gate())
        submit(rt, refused)  # no new sessions while draining
        gates[0].open()
        with trio.fail_after(10):
            while sessions[0].result is None:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert closes == [] and not rt.finished.is_set()  # one session still runs
        gates[1].open()
        with trio.fail_after(10):
            await rt.finished.wait()
    assert closes == ["closed"] and handler.deleted.is_set()
    assert refused.failed == ["draining"]
    assert [s.failed for s in sessions] == [[], []]  # both ended on their own


# -- signals ----------------------------------------------------------------------------------

PLAN = SignalPlan("TERM", ("kill", "-TERM", "1"), None)


async def ready_runtime(handler: ScriptedHandler, nursery: trio.Nursery) -> ConnectionRuntime:
    rt, _ = runtime(handler)
    nursery.start_soon(rt.run)
    handler.ready.set()
    with trio.fail_after(10):
        while rt._nursery is None:
            await trio.sleep(0.01)
    return rt


@pytest.mark.parametrize("how", ["non-zero", "raises"])
async def test_a_failing_signal_exec_is_logged_and_harmless(
        aio_loop: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    calls: list[tuple[str, ...]] = []

    async def run_command(target: Any, argv: tuple[str, ...], container: Any) -> ExecResult:
        calls.append(argv)
        if how == "raises":
            raise ConnectionResetError("the exec stream broke")
        return ExecResult(1, "kill: (1) - No such process", "NonZeroExitCode")

    monkeypatch.setattr(sshsession, "run_command", run_command)
    handler = ScriptedHandler()
    async with trio.open_nursery() as nursery:
        rt = await ready_runtime(handler, nursery)
        rt.send_signal(None, PLAN)  # type: ignore[arg-type]
        with trio.fail_after(10):
            while "signal-failed" not in events(caplog):
                await trio.sleep(0.01)
        assert calls == [PLAN.argv]
        assert not rt.finished.is_set()  # the connection is unharmed
        rt.closed()
    failed = [r for r in caplog.records if getattr(r, "event", "") == "signal-failed"]
    assert failed[0].levelno >= logging.WARNING
    if how == "raises":
        assert failed[0].exc_info is not None


async def test_a_hanging_signal_exec_is_bounded(
        aio_loop: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cancelled = trio.Event()

    async def run_command(target: Any, argv: tuple[str, ...], container: Any) -> ExecResult:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(sshsession, "run_command", run_command)
    handler = ScriptedHandler(signal_timeout=0.2)
    async with trio.open_nursery() as nursery:
        rt = await ready_runtime(handler, nursery)
        rt.send_signal(None, PLAN)  # type: ignore[arg-type]
        with trio.fail_after(10):  # timeouts.signal (0.2 s) gave up on it
            await cancelled.wait()
        assert not rt.finished.is_set()
        rt.closed()


async def test_a_signal_before_the_pod_is_ready_is_dropped(
        aio_loop: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    async def run_command(target: Any, argv: tuple[str, ...], container: Any) -> ExecResult:
        calls.append(argv)
        return ExecResult(0)

    monkeypatch.setattr(sshsession, "run_command", run_command)
    handler = ScriptedHandler()
    rt, _ = runtime(handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        rt.send_signal(None, PLAN)  # type: ignore[arg-type]  # no pod, no process: nothing
        handler.ready.set()
        with trio.fail_after(10):
            while rt._nursery is None:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert calls == []
        rt.send_signal(None, PLAN)  # type: ignore[arg-type]
        with trio.fail_after(10):
            while not calls:
                await trio.sleep(0.01)
        rt.closed()
    assert calls == [PLAN.argv]


def test_the_linger_constants_are_what_the_tests_assume() -> None:
    assert connection.FAILURE_LINGER > 1 > connection.CLOSE_LINGER > 0
