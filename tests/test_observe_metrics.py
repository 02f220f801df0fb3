"""Metrics: the series a real gateway exports after real SSH connections, the exposition
format (``promtool check metrics``), and that no label carries a username, address or pod."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncssh
import pytest
import trio
from observekit import aio, http_get, open_observed, samples, value

from kuberun_trio.observe import GatewayMetrics
from kuberun_trio.observe.metrics import label_token

USER = "zed-observer"


async def _settle(check: object, within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not check():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_series_after_real_connections(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        result = await aio(conn.run, "printf hello; printf oops >&2; exit 3")
        assert (result.stdout, result.stderr, result.exit_status) == ("hello", "oops", 3)
        ok = await aio(conn.run, "true")
        assert ok.exit_status == 0
        text = await rig.scrape()
        assert value(text, "containerssh_ssh_connections_total", country="XX") == 1
        assert value(text, "containerssh_ssh_current_connections", country="XX") == 1
        assert value(text, "containerssh_ssh_successful_handshakes_total", country="XX") == 1
        assert value(text, "containerssh_auth_success_total", authtype="pubkey",
                     country="XX") == 1
        assert value(text, "containerssh_backend_requests_total") == 1
        assert value(text, "kuberun_pod_start_seconds_count") == 1
        assert value(text, "kuberun_pods", phase="Running") == 1
        assert value(text, "kuberun_sessions_total", type="exec", result="failure") == 1
        assert value(text, "kuberun_sessions_total", type="exec", result="success") == 1
        assert value(text, "kuberun_sessions_active", type="exec") == 0
        assert value(text, "kuberun_exec_start_seconds_count") == 2
        assert value(text, "kuberun_api_requests_total", verb="create", resource="pods",
                     code="201") == 1
        assert value(text, "kuberun_api_requests_total", verb="create",
                     resource="pods/exec", code="101") == 2
        assert (value(text, "kuberun_bytes_total", direction="out") or 0) >= len("hellooops")
        assert value(text, "process_cpu_seconds_total") is not None
        assert not [s for s in samples(text) if s[0].endswith("_created")]

        conn.close()
        await aio(conn.wait_closed)
        await _settle(lambda: not rig.gateway.connections)
        text = await rig.scrape()
        assert value(text, "containerssh_ssh_current_connections", country="XX") == 0
        assert value(text, "containerssh_backend_errors_total") == 0
        assert value(text, "kuberun_connections_ended_total", reason="client") == 1
        assert value(text, "kuberun_connections_ended_total", reason="error") is None


async def test_refused_requests_counted_by_request(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        with pytest.raises(asyncssh.ChannelOpenError):  # forwarding is off
            await aio(conn.open_connection, "localhost", 80)
        text = await rig.scrape()
        assert value(text, "kuberun_requests_refused_total", request="port-forwarding") == 1
        conn.close()
        await aio(conn.wait_closed)


async def test_stdin_bytes_counted(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        result = await aio(conn.run, "wc -c", input="x" * 5000)
        assert result.stdout.strip() == "5000"
        text = await rig.scrape()
        assert (value(text, "kuberun_bytes_total", direction="in") or 0) >= 5000
        conn.close()


async def test_refused_credentials_and_failed_pod_start(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await rig.connect(USER, client_keys=[stranger])
        rig.cluster.faults.fail_image("*")
        conn = await rig.connect(USER)
        result = await aio(conn.run, "true")
        assert result.exit_status == 255
        conn.close()
        await _settle(lambda: not rig.gateway.connections, 30)
        text = await rig.scrape()
        assert value(text, "containerssh_auth_failures_total", authtype="pubkey",
                     country="XX") == 1
        assert value(text, "containerssh_ssh_failed_handshakes_total", country="XX") == 1
        assert value(text, "kuberun_connections_rejected_total", reason="auth") == 1
        assert value(text, "containerssh_backend_errors_total") == 1
        assert sum(v for n, labels, v in samples(text)
                   if n == "kuberun_pod_start_failures_total") == 1


async def test_no_username_address_or_pod_name_in_labels(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        await aio(conn.run, "true")
        pods = [p["metadata"]["name"] for p in rig.cluster.pods()]
        connection_ids = list(rig.gateway.connections)
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await rig.connect("mallory-probe", client_keys=[stranger])
        text = await rig.scrape()
        conn.close()
    assert pods and connection_ids
    forbidden = [USER, "mallory-probe", "127.0.0.1", *pods, *connection_ids]
    checked = 0
    for name, labels, _ in samples(text):
        for label_value in labels.values():
            checked += 1
            assert not any(word in label_value for word in forbidden), (name, labels)
    assert checked > 50


async def test_exposition_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; tests/run installs it)")
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        await aio(conn.run, "echo hi")
        text = await rig.scrape()
        conn.close()
    done = await trio.run_process([promtool, "check", "metrics"], stdin=text,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"# TYPE kuberun_pod_start_seconds histogram" in text


async def test_metrics_endpoint_paths_and_methods(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        status, _ = await http_get(rig.gateway.endpoints.metrics, "/other")
        assert status == 404
        status, body = await http_get(rig.gateway.endpoints.metrics, "/metrics?x=1")
        assert status == 200 and b"containerssh_ssh_connections_total" in body


def test_two_gateways_count_apart() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.connection_opened()
    assert first.sample("containerssh_ssh_connections_total", {"country": "XX"}) == 1
    assert second.sample("containerssh_ssh_connections_total", {"country": "XX"}) == 0


@pytest.mark.parametrize(("raw", "token"), [
    ("max-startups", "max-startups"), ("ErrImagePull", "ErrImagePull"),
    ("alice@10.0.0.1:22", "other"), ("", "other"), ("x" * 41, "other"), ("a b", "other"),
])
def test_label_token(raw: str, token: str) -> None:
    assert label_token(raw) == token


async def test_session_cut_by_the_client_counts_as_closed(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        conn = await rig.connect(USER)
        process = await aio(conn.create_process, "echo started; sleep 60")
        assert await aio(process.stdout.readline) == "started\n"
        conn.close()
        await _settle(lambda: not rig.gateway.connections, 30)
        text = await rig.scrape()
        assert value(text, "kuberun_sessions_total", type="exec", result="closed") == 1
        assert value(text, "kuberun_sessions_total", type="exec", result="error") is None
        assert value(text, "kuberun_sessions_active", type="exec") == 0


async def test_endpoints_stop_with_the_gateway(tmp_path: Path) -> None:
    async with open_observed(tmp_path) as rig:
        endpoints = rig.gateway.endpoints
        assert (await http_get(endpoints.metrics, "/metrics"))[0] == 200
        assert (await http_get(endpoints.health, "/healthz"))[0] == 200
    for address in (endpoints.metrics, endpoints.health):
        with pytest.raises(OSError):
            await http_get(address, "/")
