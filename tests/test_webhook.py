"""The ContainerSSH auth webhook client against a real local HTTP(S) server (trio + h11)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster.certs import make_certificates
from kuberun_trio.server.auth import ServerAuthenticator, ThrottlePolicy
from kuberun_trio.server.authwebhook import AuthWebhook, parse_response
from kuberun_trio.server.config import AuthConfig, WebhookConfig

# (status, body) or a number of seconds to stall before answering 200/success.
Reply = tuple[int, bytes] | float
NO_THROTTLE = ThrottlePolicy(base=0.0, cap=0.0)


@attrs.define
class Hook:
    url: str
    replies: dict[str, Reply] = attrs.field(factory=dict)
    requests: list[tuple[str, dict[str, str], Any]] = attrs.field(factory=list)


def ok(**fields: Any) -> tuple[int, bytes]:
    return 200, json.dumps({"success": True, **fields}).encode()


async def _serve_one(stream: trio.abc.Stream, hook: Hook) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
            if not data:
                return
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            return
    assert request is not None
    path = request.target.decode()
    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
    hook.requests.append((path, headers, json.loads(body)))
    reply = hook.replies.get(path, ok())
    if isinstance(reply, float):
        await trio.sleep(reply)
        reply = ok()
    status, content = reply
    data = conn.send(h11.Response(status_code=status, headers=[
        ("Content-Type", "application/json"), ("Content-Length", str(len(content))),
        ("Connection", "close")]))
    assert data is not None
    await stream.send_all(data + (conn.send(h11.Data(data=content)) or b"")
                          + (conn.send(h11.EndOfMessage()) or b""))
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


@contextlib.asynccontextmanager
async def webhook_server(tls: ssl.SSLContext | None = None) -> AsyncIterator[Hook]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        hook = Hook(f"{'https' if tls else 'http'}://127.0.0.1:{port}/auth")

        async def handle(stream: trio.SocketStream) -> None:
            wrapped: trio.abc.Stream = stream
            if tls is not None:
                wrapped = trio.SSLStream(stream, tls, server_side=True)
            with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
                await _serve_one(wrapped, hook)

        nursery.start_soon(trio.serve_listeners, handle, listeners)
        async with open_aio_loop():
            yield hook
        nursery.cancel_scope.cancel()


def authenticator(hook: Hook, timeout: float = 2.0, **kw: Any) -> ServerAuthenticator:
    config = AuthConfig(webhook=WebhookConfig(url=hook.url, timeout=timeout, **kw))
    return ServerAuthenticator(config, logger=logging.getLogger("test.webhook"),
                               throttle=NO_THROTTLE)


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


async def test_password_request_and_metadata_flow_into_result() -> None:
    async with webhook_server() as hook:
        hook.replies["/auth/password"] = ok(
            authenticatedUsername="alice@corp",
            metadata={"team": {"value": "blue", "sensitive": False},
                      "token": {"value": "s3cret", "sensitive": True}, "plain": "x"},
            environment={"GREETING": {"value": "hi there", "sensitive": False}})
        auth = authenticator(hook)
        assert auth.methods() == {"publickey", "password"}
        result = await auth.check_password("c0ffee", "alice", "pä:ss", remote_address="[::1]:4022")
        assert result is not None and result.method == "password"
        assert dict(result.metadata) == {"team": "blue", "token": "s3cret", "plain": "x"}
        assert dict(result.environment) == {"GREETING": "hi there"}
        (path, headers, body), = hook.requests
        assert path == "/auth/password"
        assert headers["content-type"] == "application/json"
        assert body == {"username": "alice", "remoteAddress": "[::1]:4022",
                        "connectionId": "c0ffee",
                        "passwordBase64": base64.b64encode("pä:ss".encode()).decode()}


async def test_pubkey_request_sends_authorized_keys_form() -> None:
    async with webhook_server() as hook:
        hook.replies["/auth/pubkey"] = ok(environment={"KEYUSER": "yes"})
        auth = authenticator(hook)
        result = await auth.check_public_key("cid1", "bob", f"{KEY} bob@laptop",
                                             remote_address="127.0.0.1:5555")
        assert result is not None and dict(result.environment) == {"KEYUSER": "yes"}
        # asyncssh asks twice for an accepted key; the second answer is cached.
        again = await auth.check_public_key("cid1", "bob", KEY, remote_address="127.0.0.1:5555")
        assert again == result
        (path, _, body), = hook.requests
        assert path == "/auth/pubkey"
        assert body == {"username": "bob", "remoteAddress": "127.0.0.1:5555",
                        "connectionId": "cid1", "publicKey": KEY}


@pytest.mark.parametrize(("reply", "reason"), [
    ((200, b'{"success": false}'), "webhook refused"),
    ((500, b'{"success": true}'), "HTTP 500"),
    ((403, b""), "HTTP 403"),
    ((200, b"<html>"), "not JSON"),
    ((200, b'{"ok": true}'), "no boolean 'success'"),
    ((200, b'{"success": true, "environment": {"A": {"value": 1}}}'), "expected a string"),
])
async def test_refusals(reply: Reply, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.webhook")
    async with webhook_server() as hook:
        hook.replies["/auth/password"] = reply
        auth = authenticator(hook)
        assert await auth.check_password("cid2", "eve", "guess", remote_address="1.2.3.4:1") \
            is None
        assert len(hook.requests) == 1
    decision, = [r for r in caplog.records if getattr(r, "event", "") == "auth"]
    assert decision.result == "deny" and reason in decision.reason  # type: ignore[attr-defined]
    assert "guess" not in caplog.text


async def test_timeout_denies_in_time() -> None:
    async with webhook_server() as hook:
        hook.replies["/auth/password"] = 5.0
        auth = authenticator(hook, timeout=0.3)
        start = trio.current_time()
        assert await auth.check_password("cid3", "slow", "pw", remote_address="1.2.3.4:1") is None
        assert 0.25 < trio.current_time() - start < 2.0


async def test_unreachable_webhook_denies() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        async with open_aio_loop():
            hook = WebhookConfig(url=f"http://127.0.0.1:{port}", timeout=2.0)
            verdict = await AuthWebhook(hook).check_password("c", "u", "1.2.3.4:1", "pw")
    assert not verdict.success and "127.0.0.1" in verdict.reason


async def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: would fail
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with webhook_server() as hook:
        assert await authenticator(hook).check_password("c", "u", "pw") is not None


async def test_https_with_cacert(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    async with webhook_server(server_ctx) as hook:
        trusted = authenticator(hook, cacert=str(certs.ca_file))
        assert await trusted.check_password("c", "u", "pw") is not None
        untrusted = AuthWebhook(WebhookConfig(url=hook.url, timeout=2.0))
        verdict = await untrusted.check_password("c", "u", "1.2.3.4:1", "pw")
        assert not verdict.success and "certificate" in verdict.reason.lower()


@pytest.mark.parametrize(("status", "body", "check"), [
    (200, b'{"success": true, "files": {"/x": {"value": "YQ=="}}}',
     lambda v: v.success and "files" in v.warnings[0]),
    (200, b'{"success": true, "environment": {"BAD-NAME": "x", "OK": "y"}}',
     lambda v: v.success and dict(v.environment) == {"OK": "y"} and len(v.warnings) == 1),
    (200, b'{"success": true, "metadata": []}', lambda v: not v.success),
    (200, b'[true]', lambda v: not v.success),
    (200, b'{"success": "yes"}', lambda v: not v.success),
    (200, b'{"success": true, "authenticatedUsername": "root"}',
     lambda v: v.success and v.authenticated_username == "root"),
    (204, b'{"success": true}', lambda v: not v.success),
])
def test_parse_response(status: int, body: bytes, check: Callable[[Any], bool]) -> None:
    assert check(parse_response(status, body))
