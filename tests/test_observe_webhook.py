"""The auth webhook's ContainerSSH series: requests and failures by reason."""

from __future__ import annotations

import logging
import socket

from test_webhook import KEY, ok, webhook_server

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.observe import GatewayMetrics
from kuberun_trio.server.auth import ServerAuthenticator
from kuberun_trio.server.authconfig import AuthConfig, WebhookConfig


async def test_webhook_requests_and_failures_are_counted() -> None:
    metrics = GatewayMetrics(process=False)
    async with webhook_server() as hook:
        auth = ServerAuthenticator(AuthConfig(webhook=WebhookConfig(url=hook.url, timeout=0.5)),
                                   logger=logging.getLogger("test.webhook"),
                                   metrics=metrics)
        hook.replies["/auth/password"] = ok()
        assert await auth.check_password("c1", "alice", "pw") is not None
        hook.replies["/auth/password"] = (200, b'{"success": false}')
        assert await auth.check_password("c2", "alice", "pw") is None
        hook.replies["/auth/password"] = (500, b"oops")
        assert await auth.check_password("c3", "alice", "pw") is None
        hook.replies["/auth/password"] = (200, b"not json")
        assert await auth.check_password("c4", "alice", "pw") is None
        hook.replies["/auth/password"] = 2.0  # stalls past the timeout
        assert await auth.check_password("c5", "alice", "pw") is None

    def failures(reason: str) -> float | None:
        return metrics.sample("containerssh_auth_server_failures_total", {
            "type": "hard", "authtype": "password", "retry": "0", "reason": reason})

    assert metrics.sample("containerssh_auth_server_requests_total",
                          {"authtype": "password", "retry": "0"}) == 5
    assert (failures("status"), failures("invalid-response"), failures("timeout")) == (1, 1, 1)
    assert failures("connection") is None  # a refusal is an answer, not a failure


async def test_unreachable_webhook_counts_a_connection_failure() -> None:
    metrics = GatewayMetrics(process=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with open_aio_loop():
        auth = ServerAuthenticator(
            AuthConfig(webhook=WebhookConfig(url=f"http://127.0.0.1:{port}/auth")),
            logger=logging.getLogger("test.webhook"), metrics=metrics)
        assert await auth.check_public_key("c1", "alice", KEY) is None
    assert metrics.sample("containerssh_auth_server_failures_total", {
        "type": "hard", "authtype": "pubkey", "retry": "0", "reason": "connection"}) == 1
