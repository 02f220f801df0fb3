"""``gateway/pod.py``: the Warning event that explains a start failure, and log-field merging.

A scripted kube client (the trio-flavoured methods :class:`ConnectionHandler`
calls) makes the pod fail to start on purpose, with or without a Warning event,
and with an events request that fails or hangs.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from kuberun_trio.core.config import KubernetesConfig
from kuberun_trio.errors import KubernetesError, PodStartError
from kuberun_trio.gateway.pod import ConnectionHandler

LOG = logging.getLogger("test.pod.paths")


class ScriptedKube:
    def __init__(self, *, start_error: PodStartError | None = None,
                 events: list[dict[str, Any]] | Exception | None = None,
                 events_hang: bool = False) -> None:
        self.start_error = start_error
        self.events = events or []
        self.events_hang = events_hang
        self.deleted: list[str] = []

    async def create_pod(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"metadata": {"name": "kuberun-abcde", "resourceVersion": "7"}}

    async def wait_for_pod(self, namespace: str, name: str, *,
                           resource_version: str | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if self.start_error is not None:
            raise self.start_error
        return {"metadata": {"name": name}}

    async def events_for_pod(self, namespace: str, name: str) -> list[dict[str, Any]]:
        if self.events_hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if isinstance(self.events, Exception):
            raise self.events
        return self.events

    async def delete_pod(self, namespace: str, name: str) -> None:
        await trio.lowlevel.checkpoint()
        self.deleted.append(name)


def handler(kube: ScriptedKube,
            logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = LOG
            ) -> ConnectionHandler:
    return ConnectionHandler(KubernetesConfig.default(), "conn-9", "127.0.0.1:5000", logger,
                             kube=kube, instance="gw-test")  # type: ignore[arg-type]


def warning(message: str, when: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"type": "Warning", "message": message, "lastTimestamp": when,
            "metadata": {"resourceVersion": "1"}}


CRASH = PodStartError("kuberun-abcde", "CrashLoopBackOff", "back-off restarting failed container")


async def start_failure(kube: ScriptedKube) -> PodStartError:
    with pytest.raises(PodStartError) as info:
        async with handler(kube).connected("alice"):
            pytest.fail("the pod must not start")
    assert kube.deleted == ["kuberun-abcde"]
    return info.value


async def test_the_warning_event_explains_a_start_failure() -> None:
    kube = ScriptedKube(start_error=CRASH, events=[
        {"type": "Normal", "message": "Pulled", "metadata": {}},
        warning("Readiness probe failed: connection refused", "2026-01-01T00:00:01Z"),
        warning("Error: CrashLoopBackOff", "2026-01-01T00:00:02Z"),  # a bare echo: skipped
    ])
    error = await start_failure(kube)
    assert (error.pod, error.reason) == ("kuberun-abcde", "CrashLoopBackOff")
    assert error.message == ("back-off restarting failed container "
                             "(Readiness probe failed: connection refused)")


async def test_a_warning_already_in_the_message_is_not_repeated() -> None:
    kube = ScriptedKube(start_error=CRASH, events=[warning("back-off restarting")])
    assert (await start_failure(kube)).message == CRASH.message


@pytest.mark.parametrize("events", [[], KubernetesError(500, "InternalError", "injected")])
async def test_without_a_warning_the_error_stands(events: Any) -> None:
    kube = ScriptedKube(start_error=CRASH, events=events)
    assert (await start_failure(kube)).message == CRASH.message


async def test_a_hanging_events_request_is_bounded(
        autojump_clock: trio.testing.MockClock) -> None:
    kube = ScriptedKube(start_error=CRASH, events_hang=True)
    started = trio.current_time()
    with trio.fail_after(60):
        assert (await start_failure(kube)).message == CRASH.message
    assert trio.current_time() - started == pytest.approx(2.0)


async def test_a_logger_adapter_keeps_its_fields_and_gains_the_events(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    adapter = logging.LoggerAdapter(LOG, {"client": "127.0.0.1:5000", "tenant": "blue"})
    kube = ScriptedKube()
    async with handler(kube, adapter).connected("alice") as pod:
        assert pod.name == "kuberun-abcde"
    records = [r for r in caplog.records if r.name == LOG.name]
    assert [r.event for r in records] == ["pod-created", "pod-running", "pod-deleted"]
    for record in records:
        assert (record.client, record.tenant) == ("127.0.0.1:5000", "blue")  # kept
        assert (record.connection_id, record.pod) == ("conn-9", "kuberun-abcde")  # added
    assert all(isinstance(r.duration_ms, int) for r in records)


async def test_a_plain_logger_gets_the_event_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    async with handler(ScriptedKube()).connected("alice"):
        pass
    records = [r for r in caplog.records if r.name == LOG.name]
    assert [(r.event, r.connection_id, r.pod) for r in records] == [
        ("pod-created", "conn-9", "kuberun-abcde"), ("pod-running", "conn-9", "kuberun-abcde"),
        ("pod-deleted", "conn-9", "kuberun-abcde")]
