"""The session time-limit watch (idle, max duration) on trio's mock clock, and its config."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from kuberun_trio.core.audit import ConnectionAudit, ConnectionEnd
from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.gateway.timelimits import (
    IDLE_MESSAGE,
    MAX_DURATION_MESSAGE,
    SessionTimeLimits,
    TimeLimitWatch,
)
from kuberun_trio.server.config import parse_server_config


class Target:
    """Records what the watch did, with the (mock) time."""

    def __init__(self, audit: ConnectionAudit) -> None:
        self.audit = audit
        self.calls: list[tuple[float, str, str]] = []

    def warn(self, message: str) -> None:
        self.calls.append((trio.current_time(), "warn", message))
        self.audit.bytes_to_client += len(message)  # as GatewaySession.notice does

    def limit_reached(self, message: str, kind: ConnectionEnd) -> None:
        self.calls.append((trio.current_time(), "limit", message))

    def close(self, message: str, kind: ConnectionEnd) -> None:
        self.calls.append((trio.current_time(), "close", kind.value))


async def _watch(limits: SessionTimeLimits, activity: float | None = None,
                 ) -> tuple[list[tuple[float, str, str]], float]:
    audit = ConnectionAudit("c0", "127.0.0.1:1")
    target = Target(audit)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        if activity is not None:
            async def busy() -> None:
                while True:
                    audit.bytes_from_client += 1  # a keystroke
                    await trio.sleep(activity)
            nursery.start_soon(busy)
        await TimeLimitWatch(limits, audit, target).run()
        nursery.cancel_scope.cancel()
    return [(round(t - start, 1), what, text) for t, what, text in target.calls], start


async def test_idle_warns_then_terminates_then_closes(
        autojump_clock: trio.testing.MockClock) -> None:
    calls, _ = await _watch(SessionTimeLimits(idle_timeout=10, timeout_warning=3,
                                              timeout_grace_period=2))
    (t_warn, warn, text), limit, close = calls
    assert warn == "warn" and 7 <= t_warn <= 7.5 and "idle" in text and "3 s" in text
    assert limit[1:] == ("limit", IDLE_MESSAGE) and 10 <= limit[0] <= 10.5
    assert close[1:] == ("close", "idle") and close[0] == pytest.approx(limit[0] + 2, abs=0.1)


async def test_a_busy_connection_is_never_idle(autojump_clock: trio.testing.MockClock) -> None:
    with trio.move_on_after(60):
        calls, _ = await _watch(SessionTimeLimits(idle_timeout=2, timeout_warning=1), 0.5)
        raise AssertionError(f"the watch ended a busy connection: {calls}")


async def test_max_duration_ends_a_busy_connection(
        autojump_clock: trio.testing.MockClock) -> None:
    calls, _ = await _watch(SessionTimeLimits(max_session_duration=30, idle_timeout=5,
                                              timeout_warning=4, timeout_grace_period=1), 0.5)
    assert [what for _, what, _ in calls] == ["warn", "limit", "close"]
    assert 26 <= calls[0][0] <= 26.5 and "time limit of 30 s" in calls[0][2]
    assert calls[1][2] == MAX_DURATION_MESSAGE and calls[2][2] == "max-duration"


async def test_activity_after_the_idle_warning_rearms_it(
        autojump_clock: trio.testing.MockClock) -> None:
    audit = ConnectionAudit("c0", "127.0.0.1:1")
    target = Target(audit)
    limits = SessionTimeLimits(idle_timeout=10, timeout_warning=3, timeout_grace_period=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(TimeLimitWatch(limits, audit, target).run)
        await trio.sleep(8)  # warned at 7
        audit.bytes_from_client += 1  # the user typed: 10 more seconds
        await trio.sleep(30)
    kinds = [what for _, what, _ in target.calls]
    assert kinds == ["warn", "warn", "limit", "close"], target.calls
    assert 18 <= target.calls[2][0] <= 18.6


async def test_the_warning_is_at_most_half_the_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    calls, _ = await _watch(SessionTimeLimits(idle_timeout=4))  # default warning 60 s
    assert calls[0][1] == "warn" and 2 <= calls[0][0] <= 2.5


def test_active_deadline_and_checks() -> None:
    assert SessionTimeLimits().active_deadline(60) is None
    assert not SessionTimeLimits().enabled
    assert SessionTimeLimits(max_session_duration=100.5, timeout_grace_period=10) \
        .active_deadline(60) == 171
    with pytest.raises(ValueError, match="idle_timeout"):
        SessionTimeLimits(idle_timeout=0)


def _ssh(**keys: Any) -> Any:
    return parse_server_config({"ssh": keys}, instance="t").ssh


def test_config_keys() -> None:
    ssh = _ssh()
    assert ssh.time_limits == SessionTimeLimits()  # off, warning 60 s, grace 10 s
    ssh = _ssh(idleTimeout="15m", maxSessionDuration="8h", timeoutWarning="30s",
               timeoutGracePeriod=0)
    assert ssh.time_limits == SessionTimeLimits(idle_timeout=900, max_session_duration=28800,
                                                timeout_warning=30, timeout_grace_period=0)
    assert _ssh(idleTimeout="0s", maxSessionDuration=None).time_limits.enabled is False


def test_config_errors_name_the_keys() -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse_server_config({"ssh": {"idleTimeout": "5x", "maxSessionDuration": -3,
                                     "timeoutWarning": True}}, instance="t")
    text = str(caught.value)
    for key in ("ssh.idleTimeout", "ssh.maxSessionDuration", "ssh.timeoutWarning"):
        assert key in text, text
    with pytest.raises(ConfigError, match=r"ssh\.timeoutGracePeriod"):
        parse_server_config({"ssh": {"timeoutGracePeriod": "soon"}}, instance="t")
