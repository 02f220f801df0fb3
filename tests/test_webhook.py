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

import asyncssh
import attrs
import h11
import pytest
import trio
import trio_asyncio
from gatewaykit import kube_config

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import open_embedded_cluster
from kuberun_trio.cluster.certs import make_certificates
from kuberun_trio.core.podtemplate import (
    ANNOTATION_USERNAME,
    LABEL_USERNAME,
    sanitize_label_value,
)
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway
from kuberun_trio.server.auth import ServerAuthenticator
from kuberun_trio.server.authconfig import AuthConfig, WebhookConfig
from kuberun_trio.server.authwebhook import AuthWebhook, parse_response


@attrs.frozen
class Pieces:
    """A 200 reply whose body is sent in pieces with a pause between them."""

    body: bytes
    chunked: bool
    pause: float = 0.2
    parts: int = 2
    content_length: int | None = None
    """Override the Content-Length header (fixed-length replies only)."""


# (status, body), a number of seconds to stall before answering 200/success, or Pieces.
Reply = tuple[int, bytes] | float | Pieces


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
    if isinstance(reply, Pieces):
        await _send_pieces(stream, reply)
        return
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


async def _send_pieces(stream: trio.abc.Stream, reply: Pieces) -> None:
    size = -(-len(reply.body) // reply.parts)
    pieces = [reply.body[i:i + size] for i in range(0, len(reply.body), size)]
    if reply.chunked:
        head = b"Transfer-Encoding: chunked\r\n"
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    else:
        length = len(reply.body) if reply.content_length is None else reply.content_length
        head = b"Content-Length: %d\r\n" % length
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head
                          + b"Connection: close\r\n\r\n")
    for piece in pieces:
        await trio.sleep(reply.pause)
        await stream.send_all(piece)
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
    return ServerAuthenticator(config, logger=logging.getLogger("test.webhook"))


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


# == the reply read whole, capped ========================================================

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "fixed-length"])
async def test_reply_in_pieces_is_read_whole(chunked: bool) -> None:
    body = json.dumps({"success": True, "environment": {"PAD": "x" * 3000}}).encode()
    async with webhook_server() as hook:
        hook.replies["/auth/password"] = Pieces(body, chunked=chunked, parts=3)
        result = await authenticator(hook).check_password("c", "u", "pw",
                                                          remote_address="1.2.3.4:1")
    assert result is not None and result.environment["PAD"] == "x" * 3000


@pytest.mark.parametrize(("chunked", "declared"), [(True, None), (False, None),
                                                    (False, 2 * 1024 * 1024)],
                         ids=["chunked", "fixed-length", "declared-too-large"])
async def test_reply_over_one_mib_is_refused_as_too_large(
        chunked: bool, declared: int | None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.webhook")
    big = b'{"success": true, "pad": "' + b"x" * (1024 * 1024) + b'"}'
    async with webhook_server() as hook:
        hook.replies["/auth/password"] = Pieces(big, chunked=chunked, parts=4, pause=0.05,
                                                content_length=declared)
        assert await authenticator(hook).check_password(
            "c", "u", "pw", remote_address="1.2.3.4:1") is None
    decision, = [r for r in caplog.records if getattr(r, "event", "") == "auth"]
    assert "response too large" in decision.reason  # type: ignore[attr-defined]


# == credentials in the URL ==============================================================

async def test_credentials_in_url_are_sent_but_never_shown(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with webhook_server() as hook:
        url = hook.url.replace("http://", "http://hookuser:hunter2pw@") + "?token=sekrit77"
        hook.replies["/auth/password?token=sekrit77"] = (500, b"")
        auth = ServerAuthenticator(AuthConfig(webhook=WebhookConfig(url=url, timeout=2.0)),
                                   logger=logging.getLogger("test.webhook"))
        assert await auth.check_password("c", "u", "pw", remote_address="1.2.3.4:1") is None
        (path, headers, _), = hook.requests
        assert path == "/auth/password?token=sekrit77"
        assert headers["authorization"] == "Basic " + base64.b64encode(
            b"hookuser:hunter2pw").decode()
        assert "hunter2pw" not in repr(auth.webhook) and "sekrit77" not in repr(auth.webhook)
    with trio.socket.socket() as sock:  # an error message that names the URL
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with open_aio_loop():
            verdict = await AuthWebhook(WebhookConfig(
                url=f"http://hookuser:hunter2pw@127.0.0.1:{port}/a?token=sekrit77",
                timeout=0.5)).check_password("c", "u", "1.2.3.4:1", "pw")
            slow = await AuthWebhook(WebhookConfig(
                url="http://hookuser:hunter2pw@192.0.2.1:9/a?token=sekrit77",
                timeout=0.2)).check_password("c", "u", "1.2.3.4:1", "pw")
    for reason in (verdict.reason, slow.reason):
        assert not verdict.success and "***@" in reason
        assert "hunter2pw" not in reason and "sekrit77" not in reason
    for text in (caplog.text, *(str(r.__dict__) for r in caplog.records)):
        assert "hunter2pw" not in text and "sekrit77" not in text


@pytest.mark.parametrize(("url", "warned"), [
    ("http://auth.example.com/hook", True),
    ("http://10.1.2.3:8080", True),
    ("http://127.0.0.1:8080", False),
    ("http://localhost:8080", False),
    ("http://[::1]:8080", False),
    ("https://auth.example.com", False),
])
def test_plain_http_to_remote_host_warns(url: str, warned: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    ServerAuthenticator(AuthConfig(webhook=WebhookConfig(url=url)),
                        logger=logging.getLogger("test.webhook"))
    warnings = [r for r in caplog.records if "plain http://" in r.getMessage()]
    assert bool(warnings) is warned
    assert all(r.levelno == logging.WARNING for r in warnings)


@pytest.mark.parametrize("name", ["", "x" * 256, "bad\nname", 7])
def test_invalid_authenticated_username_refuses(name: object) -> None:
    verdict = parse_response(200, json.dumps({"success": True,
                                              "authenticatedUsername": name}).encode())
    assert verdict.success is (name == "")
    assert verdict.authenticated_username is None


# == authenticatedUsername end to end ====================================================

async def test_authenticated_username_names_the_pod_and_the_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before the fix the pod and the logs carried the SSH username the client typed."""
    caplog.set_level(logging.INFO)
    async with webhook_server() as hook, open_embedded_cluster(
            https=True, kubeconfig_path=tmp_path / "kubeconfig") as cluster:
        hook.replies["/auth/password"] = ok(authenticatedUsername="alice@corp")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        options = GatewayOptions(kubernetes=kube_config(cluster), authenticator=authenticator(hook),
                                 host_keys=(host_key.export_private_key("openssh"),),
                                 port=0, instance="webhook-gw")
        async with open_gateway(options) as gateway:
            async def session() -> list[Any]:
                async with asyncssh.connect(
                        "127.0.0.1", gateway.address[1], username="al", password="pw",
                        known_hosts=None, agent_path=None, client_keys=None,
                        preferred_auth="password") as conn:
                    await conn.run("true", check=True)
                    return cluster.pods()

            pods = await trio_asyncio.aio_as_trio(session)()
    meta = pods[0]["metadata"]
    assert meta["labels"][LABEL_USERNAME] == sanitize_label_value("alice@corp")
    assert meta["annotations"][ANNOTATION_USERNAME] == "alice@corp"
    allow, = [r for r in caplog.records if getattr(r, "result", "") == "allow"]
    assert allow.username == "al"  # type: ignore[attr-defined]
    assert allow.authenticated_username == "alice@corp"  # type: ignore[attr-defined]
    start, = [r for r in caplog.records if getattr(r, "event", "") == "connection-start"]
    assert start.username == "alice@corp"  # type: ignore[attr-defined]
