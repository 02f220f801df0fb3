"""The ContainerSSH configuration webhook (``configserver``) against a real local HTTP server
(trio + h11), an in-process gateway and the embedded cluster; the pure parts on their own."""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import h11
import pytest
import trio
import trio_asyncio
from gatewaykit import Rig, kube_config, open_rig

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster.certs import make_certificates
from kuberun_trio.core.auth import AuthResult
from kuberun_trio.core.config import KubernetesConfig
from kuberun_trio.core.connsettings import (
    CANNOT_CONFIGURE,
    ConfigRefused,
    ConnectionSettings,
    LoginInfo,
    file_problem,
)
from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.gateway.throttle import LoginPolicy
from kuberun_trio.observe.metrics import GatewayMetrics
from kuberun_trio.server.config import ConfigServerConfig, parse_server_config
from kuberun_trio.server.configwebhook import (
    INVALID_CONFIG,
    ConfigReply,
    ConfigWebhook,
    ReplyError,
    config_request,
    merged_settings,
    parse_reply,
)

# An answer: (status, body), or a number of seconds to stall (then 200 with no config).
Answer = tuple[int, bytes] | float
Answerer = Callable[[dict[str, Any]], Answer | Awaitable[Answer]]


@attrs.define
class ConfigServer:
    url: str
    answer: Answerer
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    paths: list[str] = attrs.field(factory=list)
    redirect: str = "/moved"
    """Where a 3xx answer points."""


def reply(**fields: Any) -> tuple[int, bytes]:
    return 200, json.dumps(fields).encode()


async def _serve_one(stream: trio.abc.Stream, server: ConfigServer) -> None:
    conn = h11.Connection(h11.SERVER)
    target, body = b"", b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            target = event.target
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            return
    request = json.loads(body)
    server.paths.append(target.decode())
    server.requests.append(request)
    answer = server.answer(request)
    if inspect.isawaitable(answer):
        answer = await answer
    if isinstance(answer, float):
        await trio.sleep(answer)
        answer = reply()
    status, content = answer
    extra = [("Location", server.redirect)] if 300 <= status < 400 else []
    out = conn.send(h11.Response(status_code=status, headers=[
        ("Content-Type", "application/json"), ("Content-Length", str(len(content))),
        ("Connection", "close"), *extra])) or b""
    out += (conn.send(h11.Data(data=content)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(out)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


@contextlib.asynccontextmanager
async def config_server(answer: Answerer, tls: ssl.SSLContext | None = None,
                        ) -> AsyncIterator[ConfigServer]:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        scheme = "https" if tls is not None else "http"
        server = ConfigServer(f"{scheme}://127.0.0.1:{port}/config?token=s3cret", answer)

        async def handle(stream: trio.SocketStream) -> None:
            wrapped: trio.abc.Stream = stream
            if tls is not None:
                wrapped = trio.SSLStream(stream, tls, server_side=True)
            with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
                await _serve_one(wrapped, server)

        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield server
        nursery.cancel_scope.cancel()


def base_data(rig_kubeconfig: Path) -> dict[str, Any]:
    """The configuration mapping of :func:`gatewaykit.kube_config` (what answers merge over)."""
    return {"kubernetes": {"connection": {"kubeconfig": str(rig_kubeconfig)},
                           "timeouts": {"podStart": "20s", "podStop": "10s"}}}


@contextlib.asynccontextmanager
async def webhook_rig(tmp_path: Path, answer: Answerer, limit: float = 2.0,
                      ) -> AsyncIterator[tuple[Rig, ConfigServer, GatewayMetrics]]:
    metrics = GatewayMetrics()
    async with config_server(answer) as server:
        webhook = ConfigWebhook(ConfigServerConfig(url=server.url, timeout=limit),
                                base_data(tmp_path / "kubeconfig"), metrics=metrics)
        async with open_rig(tmp_path, options={"configure": webhook.configure,
                                               "metrics": metrics}) as rig:
            yield rig, server, metrics


async def run(rig: Rig, command: str, username: str = "alice") -> asyncssh.SSHCompletedProcess:
    conn = await rig.connect(username)
    try:
        result: asyncssh.SSHCompletedProcess = await trio_asyncio.aio_as_trio(conn.run)(
            command)
        return result
    finally:
        conn.close()
        await trio_asyncio.aio_as_trio(conn.wait_closed)()


async def refused(rig: Rig, username: str = "alice") -> str:
    """Log in; the gateway must disconnect with a message: return it."""
    with pytest.raises(asyncssh.DisconnectError) as info:
        await run(rig, "true", username)
    return str(info.value.reason)


def container(image: str) -> dict[str, Any]:
    return {"name": "shell", "image": image,
            "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]}


# == the pure parts ===========================================================================

LOGIN = LoginInfo("c0ffee", "al", "alice", "127.0.0.1:5555", "SSH-2.0-OpenSSH_9.2",
                  AuthResult(metadata={"team": "data", "token": "t0k"},
                             environment={"A": "1", "SECRET": "x"},
                             sensitive_metadata=frozenset({"token"}),
                             sensitive_environment=frozenset({"SECRET"})))


def test_request_leaves_sensitive_values_out_unless_told() -> None:
    request = config_request(LOGIN)
    assert request == {
        "username": "al", "authenticatedUsername": "alice", "remoteAddress": "127.0.0.1:5555",
        "connectionId": "c0ffee", "clientVersion": "SSH-2.0-OpenSSH_9.2",
        "metadata": {"team": {"value": "data", "sensitive": False}},
        "environment": {"A": {"value": "1", "sensitive": False}}, "files": {}}
    full = config_request(LOGIN, transmit_sensitive=True)
    assert full["metadata"]["token"] == {"value": "t0k", "sensitive": True}
    assert full["environment"]["SECRET"] == {"value": "x", "sensitive": True}


@pytest.mark.parametrize(("status", "body", "reason"), [
    (500, b"{}", "status"),
    (200, b"<html>oops</html>", "invalid-response"),
    (200, b"[1, 2]", "invalid-response"),
    (200, b'{"config": "x"}', "invalid-response"),
    (200, b'{"environment": {"A": {"value": 3}}}', "invalid-response"),
])
def test_unusable_replies(status: int, body: bytes, reason: str) -> None:
    with pytest.raises(ReplyError) as info:
        parse_reply(status, body)
    assert info.value.reason == reason


def test_reply_keeps_kubernetes_and_security_and_lists_the_rest() -> None:
    parsed = parse_reply(200, json.dumps({
        "config": {"kubernetes": {"pod": {}}, "security": {}, "docker": {}, "backend": "x"},
        "environment": {"A": {"value": "1", "sensitive": True}, "B": "2"}}).encode())
    assert set(parsed.config) == {"kubernetes", "security"}
    assert parsed.ignored == ("backend", "docker")
    assert parsed.environment == {"A": "1", "B": "2"}


def test_merge_is_deep_and_for_this_connection_only() -> None:
    base = {"kubernetes": {"pod": {"metadata": {"namespace": "users",
                                                "labels": {"team": "none", "keep": "me"}},
                                   "shellCommand": ["/bin/bash"]},
                           "timeouts": {"podStart": "30s"}},
            "security": {"maxSessions": 4}}
    answer = ConfigReply(config={"kubernetes": {"pod": {"metadata": {
        "name": "bob-sandbox", "labels": {"team": "blue"}}}},
        "security": {"maxSessions": 2}}, ignored=(), metadata={}, environment={}, files={})
    settings = merged_settings(answer, base)
    meta = settings.kubernetes.pod.metadata
    assert meta["namespace"] == "users" and meta["name"] == "bob-sandbox"
    assert meta["labels"] == {"team": "blue", "keep": "me"}
    assert list(settings.kubernetes.pod.shell_command) == ["/bin/bash"]
    assert settings.kubernetes.timeouts.pod_start == 30.0
    assert settings.max_sessions == 2
    assert base["kubernetes"]["pod"]["metadata"]["labels"] == {"team": "none", "keep": "me"}
    nulls = ConfigReply(config={"kubernetes": {"pod": {"metadata": None, "shellCommand": None}},
                                "security": None}, ignored=(), metadata={}, environment={},
                        files={})
    kept = merged_settings(nulls, base)
    assert kept.kubernetes.pod.metadata["labels"] == {"team": "none", "keep": "me"}
    assert list(kept.kubernetes.pod.shell_command) == ["/bin/bash"]
    assert kept.max_sessions == 4
    assert parse_server_config(base).kubernetes.pod.metadata.get("name") is None


def test_bob_persistent_mode_and_fixed_pod_name_are_carried() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "bob-sandbox"}, "mode": "persistent"}
    answer = ConfigReply(config={"kubernetes": {"pod": pod}}, ignored=(), metadata={},
                         environment={}, files={})
    settings = merged_settings(answer, {})
    assert settings.kubernetes.pod.metadata["name"] == "bob-sandbox"
    assert settings.kubernetes.pod.mode == "persistent"


async def test_bob_gets_his_own_persistent_pod_from_the_webhook(tmp_path: Path) -> None:
    """The webhook makes bob's pod persistent with a fixed name: it outlives his connection
    and his next connection uses the same pod; alice's connections keep fresh pods."""
    def answer(login: dict[str, Any]) -> Answer:
        if login["username"] == "bob":
            return reply(config={"kubernetes": {"pod": {
                "mode": "persistent", "metadata": {"name": "bob-sandbox"}}}})
        return reply()

    def pods(rig: Rig) -> dict[str, dict[str, Any]]:
        return {p["metadata"]["name"]: p for p in rig.pods()
                if not p["metadata"].get("deletionTimestamp")}

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        first = await run(rig, "echo one", "bob")
        assert first.stdout == "one\n"
        kept = pods(rig)["bob-sandbox"]  # still there after bob left
        assert kept["metadata"]["labels"]["kuberun.trio/mode"] == "persistent"
        assert (await run(rig, "echo two", "bob")).stdout == "two\n"
        again = pods(rig)["bob-sandbox"]
        assert again["metadata"]["uid"] == kept["metadata"]["uid"]  # the same pod
        assert (await run(rig, "echo three", "alice")).stdout == "three\n"
        with trio.fail_after(20):  # alice's pod goes with her connection
            while set(pods(rig)) != {"bob-sandbox"}:
                await trio.sleep(0.1)


def test_invalid_merged_config_names_every_bad_key() -> None:
    answer = ConfigReply(config={"kubernetes": {"timeouts": {"podStart": "soon"},
                                                "connection": {"host": "https://evil"}},
                                 "security": {"maxSessions": 0}},
                         ignored=(), metadata={}, environment={"BAD-NAME": "x"},
                         files={"relative/path": "eA==", "/ok": "not base64!"})
    with pytest.raises(ConfigErrors) as info:
        merged_settings(answer, {})
    paths = {e.path for e in info.value.errors}
    assert {"kubernetes.timeouts.podStart", "kubernetes.connection", "security.maxSessions",
            "environment.BAD-NAME", 'files["relative/path"]', 'files["/ok"]'} <= paths, paths


@pytest.mark.parametrize(("path", "ok"), [
    ("/home/u/.profile", True), ("/etc/motd", True), ("rel/x", False), ("/a/../etc", False),
    ("/a/./b", False), ("//x", False), ("/dir/", False), ("/", False), ("/a\nb", False),
])
def test_file_paths(path: str, ok: bool) -> None:
    assert (file_problem(path) is None) is ok


def test_config_keys_are_checked() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_server_config({"configserver": {"url": "https://x", "allowRedirects": "yes"}})
    assert bad.value.path == "configserver.allowRedirects"
    with pytest.raises(ConfigErrors) as info:
        parse_server_config({"configserver": {"url": "ftp://x", "cert": "c.pem"}})
    paths = {e.path for e in info.value.errors}
    assert paths == {"configserver.url", "configserver.cert", "configserver.key"}, paths
    with pytest.raises(ConfigError) as one:
        parse_server_config({"configserver": {"url": "https://x", "cert": "c.pem"}})
    assert one.value.path == "configserver.key"
    config = parse_server_config({"configserver": {"url": "https://cfg.example/x",
                                                   "timeout": "5s",
                                                   "transmitSensitiveMetadata": True}})
    assert config.configserver.timeout == 5.0
    assert config.configserver.transmit_sensitive_metadata
    assert parse_server_config({}).configserver.url is None


# == against a real HTTP server, with the gateway ============================================

async def test_alice_gets_her_image_namespace_env_and_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "pod-files" / "welcome.txt"

    def answer(login: dict[str, Any]) -> Answer:
        docker = {"docker": {"execution": {}}}  # ContainerSSH's: ignored, said once
        if login["authenticatedUsername"] != "alice":
            return reply(config=docker)
        return reply(config={**docker, "kubernetes": {"pod": {
            "metadata": {"namespace": "team-data"},
            "spec": {"containers": [container("registry.example/data:1")]},
            "exposeAuthMetadataAsLabels": {"team": "example.com/team"}}}},
            metadata={"team": {"value": "data"}},
            environment={"TEAM": {"value": "data"}},
            files={str(target): {"value": base64.b64encode(b"hi alice\n").decode()}})

    async with webhook_rig(tmp_path, answer) as (rig, server, metrics):
        rig.cluster.store.create_namespace({"metadata": {"name": "team-data"}})
        seen: list[dict[str, Any]] = []

        async def alice() -> asyncssh.SSHCompletedProcess:
            conn = await rig.connect("alice")
            try:
                result = await trio_asyncio.aio_as_trio(conn.run)(
                    f'echo "team=$TEAM"; cat {target}; stat -c %a {target}')
                seen.extend(rig.cluster.pods("team-data"))
                return result
            finally:
                conn.close()

        result = await alice()
        other = await run(rig, 'echo "team=$TEAM"', "carol")
        assert metrics.sample("containerssh_config_server_requests_total",
                              {"retry": "0"}) == 2
    assert result.exit_status == 0, result.stderr
    assert result.stdout == "team=data\nhi alice\n600\n"
    (pod,) = seen
    assert pod["spec"]["containers"][0]["image"] == "registry.example/data:1"
    assert pod["metadata"]["labels"]["example.com/team"] == "data"
    ignored = [r for r in caplog.records if getattr(r, "event", "") == "config-ignored"]
    assert len(ignored) == 1 and ignored[0].section == "docker"  # type: ignore[attr-defined]
    assert other.stdout == "team=\n"  # carol: the file's configuration, no TEAM
    first = server.requests[0]
    assert first["username"] == "alice" and first["authenticatedUsername"] == "alice"
    assert first["remoteAddress"].startswith("127.0.0.1:")
    assert first["clientVersion"].startswith("SSH-2.0-")
    assert len(first["connectionId"]) == 16
    assert server.paths[0] == "/config?token=s3cret"  # the URL as given


@pytest.mark.parametrize(("answer", "told", "requests", "failures", "detail"), [
    pytest.param(lambda _: 30.0, CANNOT_CONFIGURE, 1, {("hard", "0", "timeout"): 1},
                 "no usable answer within 1.2 s", id="hangs"),
    pytest.param(lambda _: (500, b"{}"), CANNOT_CONFIGURE, 2,
                 {("soft", "0", "status"): 1, ("hard", "1", "status"): 1},
                 "(2 attempts; last: answered HTTP 500)", id="500"),
    pytest.param(lambda _: (200, b"\x00garbage"), CANNOT_CONFIGURE, 2,
                 {("soft", "0", "invalid-response"): 1, ("hard", "1", "invalid-response"): 1},
                 "the answer is not JSON", id="garbage"),
    pytest.param(lambda _: reply(config={"kubernetes": {"timeouts": {"podStart": -1}}}),
                 INVALID_CONFIG, 1, {("hard", "0", "invalid-config"): 1},
                 "kubernetes.timeouts.podStart", id="invalid-config"),
])
async def test_failures_refuse_the_login_with_a_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: Answerer, told: str,
        requests: int, failures: dict[tuple[str, ...], float], detail: str) -> None:
    caplog.set_level(logging.INFO)
    async with webhook_rig(tmp_path, answer, limit=1.2) as (rig, server, metrics):
        message = await refused(rig)
        assert rig.pods() == []
        counted = dict(_samples(metrics, "containerssh_config_server_failures_total"))
        asked = metrics.sample("containerssh_config_server_requests_total", {"retry": "0"})
        rejected = metrics.sample("kuberun_connections_rejected_total", {"reason": "config"})
    assert message.startswith(f"kuberun: {told}"), message
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "config-refused"]
    assert detail in line.error  # type: ignore[attr-defined]
    assert "s3cret" not in caplog.text  # the URL's query is never logged
    assert len(server.requests) == requests and asked == 1 and rejected == 1
    assert f"(connection {server.requests[0]['connectionId']})" in message, message
    assert counted == failures
    assert not [r for r in caplog.records if getattr(r, "event", "") == "connection-start"]


def _samples(metrics: GatewayMetrics, name: str) -> list[tuple[tuple[str, ...], float]]:
    out = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out.append((tuple(sample.labels[k] for k in ("type", "retry", "reason")),
                            sample.value))
    return out


async def test_a_slow_webhook_holds_no_other_login_of_the_user(tmp_path: Path) -> None:
    """The login limiter's keys are reset once the credential is proven, not after the
    webhook: a second login of the same user from the same address (which, with no free
    attempts, waits for the first one to prove itself) is not held behind it."""
    second_asked = trio.Event()
    held: list[bool] = []

    async def answer(login: dict[str, Any]) -> Answer:
        if not second_asked.is_set() and not held:
            held.append(False)
            with trio.move_on_after(4):
                await second_asked.wait()
            held[0] = second_asked.is_set()
        else:
            second_asked.set()
        return reply()

    metrics = GatewayMetrics()
    async with config_server(answer) as server:
        webhook = ConfigWebhook(ConfigServerConfig(url=server.url, timeout=10),
                                base_data(tmp_path / "kubeconfig"), metrics=metrics)
        policy = LoginPolicy(free_failures=0, delay=5.0, max_delay=10.0)
        async with open_rig(tmp_path, options={"configure": webhook.configure,
                                               "login": policy}) as rig, \
                trio.open_nursery() as nursery:
            results: list[str] = []

            async def login() -> None:
                results.append((await run(rig, "echo ok")).stdout)

            nursery.start_soon(login)
            while not server.requests:
                await trio.sleep(0.01)
            nursery.start_soon(login)
    assert held == [True]  # the second login reached the webhook while the first waited
    assert results == ["ok\n", "ok\n"]


async def test_per_connection_session_limit(tmp_path: Path) -> None:
    def answer(login: dict[str, Any]) -> Answer:
        return reply(config={"security": {"maxSessions": 1}})

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        conn = await rig.connect("alice")
        try:
            first = await trio_asyncio.aio_as_trio(conn.create_process)("sleep 5")
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await trio_asyncio.aio_as_trio(conn.run)("true")
            first.close()
        finally:
            conn.close()
    assert "too many sessions on this connection (limit 1)" in info.value.reason


async def test_a_file_that_cannot_be_written_ends_the_connection_with_a_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    def answer(login: dict[str, Any]) -> Answer:
        return reply(files={f"{blocker}/f": base64.b64encode(b"x").decode()})

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        result = await run(rig, "echo never")
        with trio.fail_after(15):  # and the pod is deleted
            while rig.pods():
                await trio.sleep(0.05)
    assert result.exit_status == 255 and result.stdout == ""
    assert "cannot start your pod" in result.stderr, result.stderr
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "connection-error"]
    assert f"cannot write {blocker}/f into the pod" in line.error  # type: ignore[attr-defined]


async def test_a_hook_that_raises_refuses_only_that_login(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An embedder's own hook: a bug in it refuses the login, the gateway goes on."""
    calls: list[str] = []
    kubernetes: list[KubernetesConfig] = []

    async def configure(login: LoginInfo) -> ConnectionSettings:
        calls.append(login.authenticated_username)
        if login.authenticated_username == "alice":
            raise KeyError("no such team")
        return ConnectionSettings(kubernetes=kubernetes[0],
                                  environment={"WHO": login.authenticated_username})

    async with open_rig(tmp_path, options={"configure": configure}) as rig:
        kubernetes.append(kube_config(rig.cluster))
        message = await refused(rig, "alice")
        other = await run(rig, "echo $WHO", "bob")
    assert message.startswith(f"kuberun: {CANNOT_CONFIGURE}")
    assert other.stdout == "bob\n" and calls == ["alice", "bob"]
    assert any(getattr(r, "event", "") == "config-error" for r in caplog.records)


def client_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed client certificate (clientAuth) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kuberun-gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "client.crt", folder / "client.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_mutual_tls(tmp_path: Path) -> None:
    """``cacert`` checks the server; ``cert``/``key`` prove the gateway to a server that
    requires a client certificate (without them the request fails and is retried)."""
    certs = make_certificates(tmp_path / "server")
    cert, key = client_certificate(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cert)
    async with config_server(lambda _: reply(environment={"A": "1"}), tls=server_ctx) as server, \
            open_aio_loop():
        config = ConfigServerConfig(url=server.url, timeout=0.5, cacert=str(certs.ca_file),
                                    cert=str(cert), key=str(key))
        settings = await ConfigWebhook(config, {}).configure(LOGIN)
        assert dict(settings.environment) == {"A": "1"}
        without = ConfigWebhook(attrs.evolve(config, cert=None, key=None), {})
        with pytest.raises(ConfigRefused) as info:
            await without.configure(LOGIN)
    assert info.value.client_message == CANNOT_CONFIGURE
    assert "s3cret" not in info.value.detail and server.url.startswith("https://")


@pytest.mark.parametrize("allow", [False, True])
async def test_redirects_are_followed_only_when_allowed(allow: bool) -> None:
    def answer(login: dict[str, Any]) -> Answer:
        return (307, b"") if not server.paths[-1].startswith("/moved") else reply(
            environment={"MOVED": "yes"})

    async with config_server(answer) as server, open_aio_loop():
        config = ConfigServerConfig(url=server.url, timeout=0.5, allow_redirects=allow)
        webhook = ConfigWebhook(config, {})
        if allow:
            settings = await webhook.configure(LOGIN)
            assert dict(settings.environment) == {"MOVED": "yes"}
            assert server.paths == ["/config?token=s3cret", "/moved"]
            assert server.requests[1] == server.requests[0]  # 307 keeps the POST body
        else:
            with pytest.raises(ConfigRefused) as info:
                await webhook.configure(LOGIN)
            assert "answered HTTP 307" in info.value.detail
            assert all(p.startswith("/config") for p in server.paths)


async def test_reply_over_one_mib_is_refused() -> None:
    big = reply(environment={"BIG": "x" * (1024 * 1024)})
    async with config_server(lambda _: big) as server, open_aio_loop():
        metrics = GatewayMetrics()
        webhook = ConfigWebhook(ConfigServerConfig(url=server.url, timeout=0.5), {},
                                metrics=metrics)
        with pytest.raises(ConfigRefused) as info:
            await webhook.configure(LOGIN)
    assert "too large" in info.value.detail
    assert dict(_samples(metrics, "containerssh_config_server_failures_total")) == {
        ("hard", "0", "connection"): 1}


@pytest.mark.parametrize(("url", "warned"), [
    ("http://10.1.2.3/config", True), ("http://cfg.internal/", True),
    ("http://127.0.0.1:8080/", False), ("http://localhost/x", False),
    ("https://10.1.2.3/config", False),
])
def test_plain_http_to_remote_host_warns(url: str, warned: bool, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from kuberun_trio.server.demo import StateDir
    from kuberun_trio.server.main import config_hook
    from kuberun_trio.server.settings import Settings

    data = {"configserver": {"url": url}}
    settings = Settings(config=parse_server_config(data), cluster="config",
                        state=StateDir(tmp_path), data=data)
    assert config_hook(settings) is not None
    assert any("plain http://" in r.getMessage() for r in caplog.records) is warned
    off = Settings(config=parse_server_config({}), cluster="config", state=StateDir(tmp_path))
    assert config_hook(off) is None


def test_auth_webhook_sensitive_flags_reach_the_login() -> None:
    from kuberun_trio.server.authwebhook import parse_response

    verdict = parse_response(200, json.dumps({
        "success": True, "metadata": {"tok": {"value": "x", "sensitive": True}, "team": "a"},
        "environment": {"PW": {"value": "y", "sensitive": True}}}).encode())
    assert verdict.sensitive == {"metadata.tok", "environment.PW"}
    from kuberun_trio.server.auth import ServerAuthenticator
    from kuberun_trio.server.authconfig import AuthConfig

    auth = ServerAuthenticator(AuthConfig(), logger=logging.getLogger("test"))
    result = auth._from_webhook(verdict, "password", "c1")
    assert result.sensitive_metadata == {"tok"} and result.sensitive_environment == {"PW"}
    login = attrs.evolve(LOGIN, auth=result)
    assert set(config_request(login)["metadata"]) == {"team"}
    assert config_request(login)["environment"] == {}


async def test_client_gone_while_the_webhook_thinks(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The client leaves during the webhook call: no pod, one pre-auth-end, nothing left."""
    caplog.set_level(logging.INFO)
    release = trio.Event()

    async def answer(login: dict[str, Any]) -> Answer:
        with trio.move_on_after(5):
            await release.wait()
        return reply()

    async with webhook_rig(tmp_path, answer, limit=10) as (rig, server, _):
        async def attempt() -> None:
            with contextlib.suppress(Exception):
                await rig.connect("alice")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt)
            while not server.requests:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # the client vanishes mid-login
        await trio.sleep(0.3)
        release.set()
        await trio.sleep(0.5)
        assert rig.pods() == [] and rig.gateway.connections == {}
    ends = [r for r in caplog.records if getattr(r, "event", "") == "pre-auth-end"]
    assert len(ends) == 1
    assert not [r for r in caplog.records if getattr(r, "event", "") == "connection-start"]


async def test_file_paths_are_never_parsed_by_a_shell(tmp_path: Path) -> None:
    evil = tmp_path / "odd dir" / "a $(touch pwned) 'b' `c`;d.txt"
    content = bytes(range(256)) * 3  # every byte value, NULs included

    def answer(login: dict[str, Any]) -> Answer:
        return reply(files={str(evil): {"value": base64.b64encode(content).decode()}})

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        result = await run(rig, "true")
    assert result.exit_status == 0, result.stderr
    _check_written(evil, content, tmp_path)


def _check_written(path: Path, content: bytes, tmp_path: Path) -> None:
    assert path.read_bytes() == content
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert not list(tmp_path.rglob("pwned")) and not list(Path.cwd().glob("pwned"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


async def test_files_are_written_without_stdin_eof_too(tmp_path: Path) -> None:
    """An API server that speaks only v4 exec cannot signal stdin EOF: the writer stops
    at the announced size instead of waiting for one."""
    target = tmp_path / "v4" / "f"

    def answer(login: dict[str, Any]) -> Answer:
        return reply(files={str(target): base64.b64encode(b"v4 ok\n").decode()})

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        rig.cluster.faults.serve_v4_only()
        with trio.fail_after(15):
            result = await run(rig, f"cat {target}")
    assert result.stdout == "v4 ok\n", result.stderr


async def test_per_connection_forwarding(tmp_path: Path) -> None:
    """``security.forwarding`` in a reply applies to that connection only: alice may
    ``ssh -L`` (nothing listens, so her open fails for that reason), bob may not."""
    def answer(login: dict[str, Any]) -> Answer:
        if login["username"] == "alice":
            return reply(config={"security": {"forwarding": {"forwardingMode": "enable"}}})
        return reply()

    async def forward(rig: Rig, username: str) -> asyncssh.ChannelOpenError:
        conn = await rig.connect(username)
        try:
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                with trio.fail_after(30):
                    await trio_asyncio.aio_as_trio(conn.open_connection)("localhost", 9)
            return info.value
        finally:
            conn.close()
            await trio_asyncio.aio_as_trio(conn.wait_closed)()

    async with webhook_rig(tmp_path, answer) as (rig, _, _):
        alice, bob = await forward(rig, "alice"), await forward(rig, "bob")
    assert alice.code == asyncssh.OPEN_CONNECT_FAILED, alice.reason
    assert "cannot connect to port 9 in the pod" in alice.reason
    assert bob.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, bob.reason
