"""Time limits through the embedding API (``GatewayOptions.time_limits``) with an asyncssh
client, and the one-word end of every connection (``connection-end`` ``end=``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from gatewaykit import open_rig

from kuberun_trio.gateway.timelimits import SessionTimeLimits

LIMITS = SessionTimeLimits(idle_timeout=1.5, timeout_warning=0.5, timeout_grace_period=0.5)


def _ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.__dict__["end"] for r in caplog.records
            if r.__dict__.get("event") == "connection-end"]


async def _until(check: Any, within: float = 20) -> None:
    with trio.fail_after(within):
        while not check():
            await trio.sleep(0.05)


async def test_idle_connection_ends_with_255_and_its_pod_is_deleted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_rig(tmp_path, options={"time_limits": LIMITS}) as rig:
        conn = await rig.connect()

        async def run() -> Any:
            return await conn.run("echo hi; exec sleep 100", check=False)

        result = await trio_asyncio.aio_as_trio(run)()
        assert result.exit_status == 255
        assert result.stdout == "hi\n"
        assert "kuberun: this connection is idle; it will be closed in 1 s" in result.stderr
        assert result.stderr.count("session idle time limit reached") == 1, result.stderr
        await _until(lambda: not rig.pods())
        await _until(lambda: _ends(caplog) == ["idle"])
        limit_lines = [r for r in caplog.records if r.__dict__.get("event") == "time-limit"]
        assert limit_lines and limit_lines[0].__dict__["reason"] == "idle"


async def test_every_end_has_one_word(tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        result = await trio_asyncio.aio_as_trio(conn.run)("echo hi", check=False)
        assert result.exit_status == 0
        conn.close()
        await _until(lambda: _ends(caplog) == ["client"])
        await rig.connect()  # open when the gateway shuts down
        await _until(lambda: len(rig.pods()) == 1)
    assert _ends(caplog) == ["client", "shutdown"]


async def test_max_duration_sets_the_pods_active_deadline(tmp_path: Path) -> None:
    limits = SessionTimeLimits(max_session_duration=3600, timeout_grace_period=5)
    async with open_rig(tmp_path, options={"time_limits": limits}) as rig:
        conn = await rig.connect()
        result = await trio_asyncio.aio_as_trio(conn.run)("echo hi", check=False)
        assert result.exit_status == 0
        (pod,) = rig.pods()
        assert pod["spec"]["activeDeadlineSeconds"] == 3600 + 5 + 10  # podStop: 10s
        conn.close()
