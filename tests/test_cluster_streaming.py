"""Exec, attach and port-forward over WebSocket against the embedded cluster's handlers.

The handlers run behind the real HTTP server (:mod:`kuberun_trio.cluster.http`) on a
loopback port; exec runs real processes in a real :class:`PodSandbox`. The client is a
small wsproto client written here (so every frame is visible), plus aiohttp through
kubernetes-asyncio for what a real client does.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import secrets
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from kuberun_trio.cluster import EmbeddedCluster, status
from kuberun_trio.cluster.faults import Faults
from kuberun_trio.cluster.http import ApiServer, Routes, serve_api
from kuberun_trio.cluster.httptypes import Reply, Request, Response, Upgrade
from kuberun_trio.cluster.requestlog import RequestLog
from kuberun_trio.cluster.sandbox import PodSandbox
from kuberun_trio.cluster.streaming import StreamingContext, handle_exec

UID = "3f6c2a9e-0000-4000-8000-000000000001"


# -- a cluster with one pod whose container runs in a real sandbox -----------------
@attrs.frozen
class Running:
    sandbox: PodSandbox
    env: dict[str, str]
    working_dir: str | None


class FakeStore:
    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, name: str, containers: Sequence[str] = ("c"), *, node: str = "node-1",
            init: Sequence[str] = ()) -> None:
        self.pods["ns", name] = {
            "metadata": {"name": name, "namespace": "ns", "uid": UID},
            "spec": {"nodeName": node, "containers": [{"name": c} for c in containers],
                     "initContainers": [{"name": c} for c in init]},
        }

    def get_pod(self, ns: str, name: str) -> dict[str, Any]:
        try:
            return self.pods[ns, name]
        except KeyError:
            raise status.not_found("pods", name) from None


class FakeKubelet:
    def __init__(self) -> None:
        self.running: dict[str, Any] = {}
        self.sandbox = "ready"
        self.sandbox_stopped = trio.Event()

    def running_container(self, ns: str, pod: str, container: str) -> Any:
        try:
            return self.running[container]
        except KeyError:
            raise LookupError(container) from None

    def sandbox_state(self, ns: str, pod: str, uid: str) -> str:
        return self.sandbox

    async def wait_sandbox_stopped(self, ns: str, pod: str, uid: str) -> None:
        await self.sandbox_stopped.wait()


@attrs.define
class Endpoint:
    host: str
    port: int
    token: str | None = None
    streams: list[trio.SocketStream] = attrs.Factory(list)


@attrs.define
class Harness:
    host: str
    port: int
    store: FakeStore
    kubelet: FakeKubelet
    faults: Faults
    log: RequestLog
    sandbox: PodSandbox
    streams: list[trio.SocketStream] = attrs.Factory(list)

    def url(self, kind: str, pod: str = "p", **query: Any) -> str:
        pairs = [(k, v) for k, vs in query.items()
                 for v in (vs if isinstance(vs, list) else [vs])]
        return f"/api/v1/namespaces/ns/pods/{pod}/{kind}?{urllib.parse.urlencode(pairs)}"


async def _rest(req: Request) -> Reply:
    return Response(404, b"{}")


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    store, kubelet, faults, log = FakeStore(), FakeKubelet(), Faults(), RequestLog()
    store.add("p")
    sandbox = await PodSandbox.create("p", namespaces=False)
    kubelet.running["c"] = Running(sandbox, {"GREETING": "hello"}, None)
    ctx = StreamingContext(store=store, kubelet=kubelet, faults=faults, request_log=log,
                           idle_timeout=30)

    async def streaming(req: Request, kind: str) -> Reply:
        return await handle_exec(req, ctx, kind)

    server = ApiServer(routes=Routes(rest=_rest, streaming=streaming), request_log=log,
                       faults=faults, token=None)
    try:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(serve_api, server))
            h = Harness(host, port, store, kubelet, faults, log, sandbox)
            try:
                yield h
            finally:
                for stream in h.streams:
                    await trio.aclose_forcefully(stream)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await sandbox.destroy()


# -- a WebSocket client that shows every frame ------------------------------------
@attrs.define
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


class WsClient:
    def __init__(self, stream: trio.SocketStream, headers: dict[str, str], rest: bytes) -> None:
        self.stream, self.headers = stream, headers
        self.conn = Connection(ConnectionType.CLIENT)
        self.conn.receive_data(rest)
        self.messages: list[tuple[str, bytes]] = []
        self.close_code: int | None = None
        self.dropped = False
        self._parts: list[bytes] = []
        self._pending: list[tuple[str, bytes]] = []

    @property
    def protocol(self) -> str | None:
        return self.headers.get("sec-websocket-protocol")

    async def send(self, data: bytes, *, text: bool = False) -> None:
        event = TextMessage(data=data.decode()) if text else BytesMessage(data=data)
        await self.stream.send_all(self.conn.send(event))

    async def ping(self, payload: bytes = b"p") -> None:
        await self.stream.send_all(self.conn.send(Ping(payload=payload)))

    async def next(self) -> tuple[str, bytes] | None:
        """The next message (``("b"|"t", data)``), None at Close or TCP end."""
        while not self._pending:
            if self.close_code is not None or self.dropped:
                return None
            data = await self.stream.receive_some(1 << 20)
            if not data:
                self.dropped = True
                return None
            self.conn.receive_data(data)
            for event in self.conn.events():
                if isinstance(event, (BytesMessage, TextMessage)):
                    raw = event.data.encode() if isinstance(event, TextMessage) else event.data
                    self._parts.append(bytes(raw))
                    if event.message_finished:
                        kind = "t" if isinstance(event, TextMessage) else "b"
                        self._pending.append((kind, b"".join(self._parts)))
                        self._parts = []
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                elif isinstance(event, Pong):
                    self._pending.append(("pong", bytes(event.payload)))
        msg = self._pending.pop(0)
        self.messages.append(msg)
        return msg

    async def collect(self) -> list[tuple[str, bytes]]:
        """Every remaining message until the server closes."""
        with trio.fail_after(20):
            while await self.next() is not None:
                pass
        return self.messages

    def channel(self, ch: int) -> bytes:
        return b"".join(d[1:] for k, d in self.messages if k == "b" and d and d[0] == ch)

    async def close(self) -> None:
        await self.stream.aclose()


async def open_ws(
    h: Harness | Endpoint, path: str, protocols: str | None = "v4.channel.k8s.io", *,
    method: str = "GET", upgrade: bool = True, extra: dict[str, str] | None = None,
) -> WsClient | HttpAnswer:
    stream = await trio.open_tcp_stream(h.host, h.port)
    h.streams.append(stream)
    head = [f"{method} {path} HTTP/1.1", f"Host: {h.host}:{h.port}"]
    if upgrade:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        head += ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                 f"Sec-WebSocket-Key: {key}"]
    if protocols is not None:
        head.append(f"Sec-WebSocket-Protocol: {protocols}")
    if isinstance(h, Endpoint) and h.token:
        head.append(f"Authorization: Bearer {h.token}")
    head += [f"{k}: {v}" for k, v in (extra or {}).items()]
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
    buf = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed during the response head: {buf!r}"
            buf += chunk
    raw_head, rest = buf.split(b"\r\n\r\n", 1)
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    code = int(status_line.split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if code == 101:
        return WsClient(stream, headers, rest)
    length = int(headers.get("content-length", "0"))
    with trio.fail_after(10):
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    await stream.aclose()
    return HttpAnswer(code, headers, rest)


async def ws(h: Harness | Endpoint, path: str, protocols: str | None = "v4.channel.k8s.io",
             **kw: Any) -> WsClient:
    client = await open_ws(h, path, protocols, **kw)
    assert isinstance(client, WsClient), client
    return client


async def answer(h: Harness, path: str, protocols: str | None = "v4.channel.k8s.io",
                 **kw: Any) -> HttpAnswer:
    got = await open_ws(h, path, protocols, **kw)
    assert isinstance(got, HttpAnswer), "expected an HTTP error, got an upgrade"
    return got


def exec_url(h: Harness, *command: str, **opts: Any) -> str:
    return h.url("exec", command=list(command), **opts)


def status_json(msg: bytes) -> dict[str, Any]:
    assert msg[0] == 3
    decoded: dict[str, Any] = json.loads(msg[1:])
    return decoded


SUCCESS = b'\x03{"metadata":{},"status":"Success"}'


async def wait_closed(h: Harness) -> None:
    """Until the last stream is logged as closed (the log records the client's Close
    as it arrives, before the stream's process is cleaned up)."""
    with trio.fail_after(5):
        while h.log.entries[-1].kind != "exec-close":
            await trio.sleep(0.01)


def only_init_left(h: Harness) -> bool:
    return set(h.sandbox.remaining_pids()) <= {h.sandbox.pid}


async def wait_only_init_left(h: Harness) -> bool:
    """Whether the stream's processes are gone within a few seconds."""
    with trio.move_on_after(5):
        while not only_init_left(h):
            await trio.sleep(0.01)
    return only_init_left(h)


# -- pre-upgrade errors ----------------------------------------------------------------
async def test_plain_get_without_upgrade_is_400_status(harness: Harness) -> None:
    got = await answer(harness, exec_url(harness, "true", stdout=True), None, upgrade=False)
    assert got.status == 400 and got.headers["content-type"] == "application/json"
    assert got.body == (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
                        b'"message":"Upgrade request required","reason":"BadRequest","code":400}')


async def test_pod_container_and_node_errors(harness: Harness) -> None:
    h = harness
    got = await answer(h, h.url("exec", pod="nope", command="true", stdout=1))
    assert got.status == 404
    assert json.loads(got.body)["message"] == 'pods "nope" not found'
    assert json.loads(got.body)["details"] == {"name": "nope", "kind": "pods"}

    got = await answer(h, h.url("exec", container="x", command="true", stdout=1))
    assert (got.status, json.loads(got.body)["message"]) == (
        400, "container x is not valid for pod p")

    h.store.add("multi", ["a", "b"], init=["i"])
    got = await answer(h, h.url("attach", pod="multi", stdout=1))
    assert json.loads(got.body)["message"] == (
        "a container name must be specified for pod multi, choose one of: [a b] "
        "or one of the init containers: [i]")

    h.store.add("pending", node="")
    for kind in ("exec", "portforward"):
        got = await answer(h, h.url(kind, pod="pending", command="true", stdout=1, ports=80))
        assert got.status == 400
        assert json.loads(got.body)["message"] == "pod pending does not have a host assigned"


async def test_unsupported_subprotocols_are_403_with_empty_body(harness: Harness) -> None:
    got = await answer(harness, exec_url(harness, "true", stdout=1),
                       "v3.channel.k8s.io, v5.channels.k8s.io")
    assert (got.status, got.body) == (403, b"")
    got = await answer(harness, harness.url("portforward", ports=80), "channel.k8s.io")
    assert (got.status, got.body) == (403, b"")


async def test_kubelet_refusals_on_the_v4_path_are_plain_text(harness: Harness) -> None:
    h = harness
    got = await answer(h, exec_url(h, "true", stderr=True, tty=True))  # tty drops stderr
    assert (got.status, got.body) == (400, b"you must specify at least 1 of stdin, stdout, stderr")
    assert got.headers["content-type"].startswith("text/plain")
    h.store.add("p2", ["c", "stopped"])
    got = await answer(h, h.url("exec", pod="p2", container="stopped", command="x", stdout=1))
    assert (got.status, got.body) == (500, b'container not found ("stopped")')
    got = await answer(h, h.url("portforward"), None)
    assert (got.status, got.body) == (400, b'query parameter "port" is required')
    got = await answer(h, h.url("portforward", ports="80,x"))
    assert got.status == 400 and json.loads(got.body)["message"] == (
        'cannot convert to []int32: strconv.ParseUint: parsing "x": invalid syntax')


async def test_v5_refusals_arrive_after_the_upgrade(harness: Harness) -> None:
    h = harness
    h.store.add("p2", ["c", "stopped"])
    c = await ws(h, h.url("exec", pod="p2", container="stopped", command="x", stdout=1),
                 "v4.channel.k8s.io,v5.channel.k8s.io")
    assert c.protocol == "v5.channel.k8s.io"  # v5 offered anywhere takes the v5 path
    assert await c.collect() == [("b", b"\x01"), ("b", b'\x03{"metadata":{},"status":"Failure",'
        b'"message":"Internal error occurred: unable to upgrade connection: container not '
        b'found (\\"stopped\\")","reason":"InternalError","details":{"causes":[{"message":'
        b'"unable to upgrade connection: container not found (\\"stopped\\")"}]},"code":500}')]
    assert c.close_code == 1000

    c = await ws(h, exec_url(h, "true"), "v5.channel.k8s.io")
    msgs = await c.collect()
    assert msgs[0] == ("b", b"\x03")  # nothing writable requested: ready frame on channel 3
    assert status_json(msgs[1][1])["message"] == ("Internal error occurred: unable to upgrade "
        "connection: you must specify at least 1 of stdin, stdout, stderr")


async def test_handler_refuses_without_network(harness: Harness) -> None:
    """Direct calls: the Upgrade is only returned once every check passed."""
    ctx = StreamingContext(store=harness.store, kubelet=harness.kubelet, faults=Faults(),
                           request_log=RequestLog())
    headers = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-key": "k",
               "sec-websocket-version": "13"}
    req = Request("GET", "/api/v1/namespaces/ns/pods/p/exec", {"command": ["true"],
                  "stdout": ["True"]}, headers)
    assert isinstance(await handle_exec(req, ctx, "exec"), Upgrade)
    req = Request("GET", "/api/v1/namespaces/ns/pods/p/portforward", {"ports": ["0"]}, headers)
    with pytest.raises(status.ApiStatusError) as info:
        await handle_exec(req, ctx, "portforward")
    assert (info.value.code, info.value.body) == (400, b'port "0" must be > 0')
    req = Request("POST", "/api/v1/namespaces/ns/pods/p/exec", {"command": ["true"],
                  "stdout": ["1"]}, headers)
    with pytest.raises(status.ApiStatusError) as info:
        await handle_exec(req, ctx, "exec")  # WebSocket handshakes must be GET
    assert (info.value.code, info.value.body) == (405, b"")


# -- exec ------------------------------------------------------------------------------
async def test_exec_v4_frames_status_and_close(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "printf out; printf err >&2; exit 3",
                             stdout="True", stderr="", stdin="false"))
    assert c.protocol == "v4.channel.k8s.io"
    msgs = await c.collect()
    assert msgs[0] == ("b", b"\x01")  # exactly one ready frame, on stdout
    assert sum(1 for k, d in msgs if d == b"\x01") == 1
    assert (c.channel(1), c.channel(2)) == (b"out", b"err")
    assert msgs[-1] == ("b", b'\x03{"metadata":{},"status":"Failure","message":"command '
                        b'terminated with non-zero exit code: error executing command '
                        b'[sh -c printf out; printf err >&2; exit 3], exit code 3",'
                        b'"reason":"NonZeroExitCode","details":{"causes":[{"reason":'
                        b'"ExitCode","message":"3"}]}}')
    assert all(k == "b" for k, _ in msgs) and c.close_code == 1000
    await c.close()  # we never answer the Close: the server does not wait for us
    await wait_closed(h)
    kinds = [e.kind for e in h.log.entries]
    assert kinds == ["http", "exec-open", "exec-close"]
    assert h.log.entries[1].status == 101 and h.log.entries[1].pod == "p"


async def test_exec_v5_exit_code_success_and_env(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "exit 7", stdout=1), "v5.channel.k8s.io")
    st = status_json((await c.collect())[-1][1])
    assert st["message"] == ("command terminated with non-zero exit code: command terminated "
                             "with exit code 7")
    assert st["details"]["causes"][0] == {"reason": "ExitCode", "message": "7"}
    c = await ws(h, exec_url(h, "sh", "-c", 'echo "$GREETING $HOSTNAME"', stdout=1),
                 "v5.channel.k8s.io")
    msgs = await c.collect()
    assert c.channel(1) == b"hello p\n" and msgs[-1] == ("b", SUCCESS)


async def test_exec_start_failure_is_internal_error(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "no-such-binary-xyz", stdout=1))
    st = status_json((await c.collect())[-1][1])
    assert st["reason"] == "InternalError" and st["code"] == 500
    assert st["message"].startswith("Internal error occurred: error executing command in "
                                    "container: failed to exec in container")
    assert st["details"]["causes"][0]["message"] == st["message"].split(": ", 1)[1]
    c = await ws(h, exec_url(h, "no-such-binary-xyz", stdout=1), "v5.channel.k8s.io")
    st5 = status_json((await c.collect())[-1][1])
    assert st5["message"].startswith("Internal error occurred: Internal error occurred: error "
                                     "executing command in container:")


async def test_v5_half_close_then_output_and_status(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "cat; echo after-eof", stdin=1, stdout=1),
                 "v5.channel.k8s.io")
    assert await c.next() == ("b", b"\x01")
    await c.send(b"\x00hello ")
    await c.send(b"\x00")  # zero-length stdin: nothing
    await c.send(b"\x00world\n")
    await c.send(b"\xff\x00")
    msgs = await c.collect()
    assert c.channel(1) == b"hello world\nafter-eof\n"
    assert msgs[-1] == ("b", SUCCESS) and c.close_code == 1000


async def test_v5_malformed_close_frame_ends_session_without_status(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "cat", stdin=1, stdout=1), "v5.channel.k8s.io")
    assert await c.next() == ("b", b"\x01")
    await c.send(b"\xff\x00\x00")
    msgs = await c.collect()
    assert msgs == [("b", b"\x01")] and c.close_code == 1000
    await wait_closed(h)
    assert await wait_only_init_left(h)  # the cat is gone


async def test_v4_has_no_half_close_and_drops_unknown_channels(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "cat", stdin=1, stdout=1))
    assert await c.next() == ("b", b"\x01")
    for frame in (b"\xff\x00", b"\x09junk", b"\x03junk", b"\x02junk", b"\x00ping\n"):
        await c.send(frame)
    with trio.fail_after(5):
        assert await c.next() == ("b", b"\x01ping\n")  # still running: 255 was not EOF
    await c.close()  # v4: the only way to end stdin is to drop the socket
    await wait_closed(h)
    assert await wait_only_init_left(h)


async def test_ready_frame_channel(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "echo e >&2", stderr=1))
    msgs = await c.collect()
    assert msgs[0] == ("b", b"\x02") and c.channel(2) == b"e\n"
    c = await ws(h, exec_url(h, "cat", stdin=1))
    assert await c.next() == ("b", b"\x03")


async def test_base64_protocols(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "cat; exit 2", stdin=1, stdout=1),
                 "v4.base64.channel.k8s.io")
    assert await c.next() == ("t", b"1")
    await c.send(b"0" + base64.b64encode(b"\xe2\x82\xac\n"), text=True)
    await c.send(b"0 not base64 !", text=True)  # dropped
    with trio.fail_after(5):
        kind, data = await c.next() or ("", b"")
    assert (kind, data[:1], base64.b64decode(data[1:])) == ("t", b"1", b"\xe2\x82\xac\n")
    await c.close()

    c = await ws(h, exec_url(h, "sh", "-c", "exit 2", stdout=1), "base64.channel.k8s.io")
    msgs = await c.collect()
    assert all(k == "t" for k, _ in msgs)
    assert msgs[-1][1][:1] == b"3"  # v1 status: the plain message, base64 encoded
    assert base64.b64decode(msgs[-1][1][1:]) == (
        b"command terminated with non-zero exit code: error executing command "
        b"[sh -c exit 2], exit code 2")


async def test_v1_protocol_sends_nothing_on_success(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "echo", "hi", stdout=1), "channel.k8s.io")
    assert await c.collect() == [("b", b"\x01"), ("b", b"\x01hi\n")]
    c = await ws(h, exec_url(h, "echo", "hi", stdout=1), None)  # no header: "" (v1 rules)
    assert "sec-websocket-protocol" not in c.headers
    assert await c.collect() == [("b", b"\x01"), ("b", b"\x01hi\n")]


async def test_output_chunks_split_utf8_and_interleave(harness: Harness) -> None:
    h = harness
    script = ("printf '\\342'; sleep 0.1; printf '\\202\\254' >&2; sleep 0.1; "
              "printf '\\202\\254'; sleep 0.1; printf x >&2")
    c = await ws(h, exec_url(h, "sh", "-c", script, stdout=1, stderr=1))
    msgs = await c.collect()
    data = [d for k, d in msgs[1:-1]]
    assert data == [b"\x01\xe2", b"\x02\x82\xac", b"\x01\x82\xac", b"\x02x"]


async def test_tty_resize_json_and_merged_stderr(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "read a; stty size; echo err >&2; read b; stty size",
                             stdin=1, stdout=1, stderr=1, tty=1), "v5.channel.k8s.io")
    assert await c.next() == ("b", b"\x01")
    await c.send(b'\x04{"Width":100,')
    await c.send(b'\x04"height":30}\n')
    await c.send(b"\x00go\n")
    out = b""
    with trio.fail_after(10):
        while b"30 100" not in out:
            out += (await c.next() or ("", b"\x01"))[1][1:]
    await c.send(b'\x04{"Width":1,"Height":2}{"WIDTH":120,"HEIGHT":40}')
    await c.send(b"\x00go\n")
    msgs = await c.collect()
    assert b"40 120" in c.channel(1) and b"err" in c.channel(1)
    assert c.channel(2) == b"" and msgs[-1] == ("b", SUCCESS)


async def test_exec_ends_when_the_container_stops(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "sh", "-c", "echo up; exec sleep 30", stdout=1))
    assert await c.next() == ("b", b"\x01")
    assert await c.next() == ("b", b"\x01up\n")
    await h.sandbox.destroy()
    with trio.fail_after(5):
        msgs = await c.collect()
    assert status_json(msgs[-1][1])["details"]["causes"][0]["message"] == "137"


async def test_exec_cut_fault_drops_tcp_without_status(harness: Harness) -> None:
    h = harness
    h.faults.cut_exec("p", after_bytes=5)
    c = await ws(h, exec_url(h, "sh", "-c", "printf 0123; sleep 0.1; printf 456789", stdout=1))
    msgs = await c.collect()
    assert c.channel(1) == b"01234" and c.dropped and c.close_code is None
    assert not any(d[:1] == b"\x03" for _, d in msgs)
    c = await ws(h, exec_url(h, "echo", "next", stdout=1))  # one cut only
    assert (await c.collect())[-1] == ("b", SUCCESS)


async def test_ping_is_answered(harness: Harness) -> None:
    h = harness
    c = await ws(h, exec_url(h, "cat", stdin=1, stdout=1))
    assert await c.next() == ("b", b"\x01")
    await c.ping(b"beat")
    with trio.fail_after(5):
        assert await c.next() == ("pong", b"beat")
    await c.close()


async def test_idle_timeout_ends_the_session(harness: Harness) -> None:
    h = harness
    ctx = StreamingContext(store=h.store, kubelet=h.kubelet, faults=h.faults,
                           request_log=h.log, idle_timeout=0.3)
    headers = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-key": "k",
               "sec-websocket-version": "13"}
    req = Request("GET", "/api/v1/namespaces/ns/pods/p/exec",
                  {"command": ["sleep", "30"], "stdout": ["1"]}, headers)
    up = await handle_exec(req, ctx, "exec")
    assert isinstance(up, Upgrade)
    server, client = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await up.run(server, req)
    raw = b""
    while chunk := await client.receive_some(65536):
        raw += chunk
    assert raw.startswith(b"HTTP/1.1 101 ") and raw.endswith(b"\x82\x01\x01")  # no status
    assert await wait_only_init_left(h)


# -- attach -------------------------------------------------------------------------------
class ProcessAttachment:
    """Attach to a real process: its stdout as the container output."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stdin: trio.abc.SendStream | None = proc.stdin
        send, self.output = trio.open_memory_channel[tuple[int, bytes]](0)
        self._send = send
        self.resized: list[tuple[int, int]] = []

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        async with self._send:
            async for chunk in self.proc.stdout:
                await self._send.send((1, bytes(chunk)))

    def resize(self, width: int, height: int) -> None:
        self.resized.append((width, height))

    async def aclose(self) -> None:
        pass


@attrs.define
class AttachableRunning:
    sandbox: PodSandbox
    env: dict[str, str]
    working_dir: str | None
    attachment: ProcessAttachment
    nursery: trio.Nursery

    async def attach(self) -> ProcessAttachment:
        self.nursery.start_soon(self.attachment.pump)
        return self.attachment


async def test_attach_reports_success_even_for_nonzero_exit(harness: Harness) -> None:
    h = harness
    proc = await trio.lowlevel.open_process(
        ["sh", "-c", "read line; echo got $line; exit 7"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        async with trio.open_nursery() as nursery:
            h.kubelet.running["c"] = AttachableRunning(h.sandbox, {}, None,
                                                       ProcessAttachment(proc), nursery)
            c = await ws(h, h.url("attach", stdin=1, stdout=1, tty=1))
            assert await c.next() == ("b", b"\x01")
            await c.send(b'\x04{"Width":90,"Height":20}')
            await c.send(b"\x00hi\n")
            msgs = await c.collect()
        assert c.channel(1) == b"got hi\n" and msgs[-1] == ("b", SUCCESS)
        assert h.kubelet.running["c"].attachment.resized == [(90, 20)]
        assert await proc.wait() == 7
    finally:
        proc.kill()
        await proc.wait()


async def test_attach_without_runtime_support_is_internal_error(harness: Harness) -> None:
    c = await ws(harness, harness.url("attach", stdout=1))
    st = status_json((await c.collect())[-1][1])
    assert st["reason"] == "InternalError"
    assert st["message"].startswith("Internal error occurred: error attaching to container: ")


# -- port-forward ---------------------------------------------------------------------
async def _echo_once(stream: trio.SocketStream) -> None:
    async with stream:
        data = await stream.receive_some(65536)
        await stream.send_all(b"echo:" + data)


async def test_portforward_framing_echo_and_dial_error(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, _echo_once, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        probe.close()
        c = await ws(h, h.url("portforward", ports=f"{port},{closed}"))
        first = [await c.next() for _ in range(4)]
        lp, lc = port.to_bytes(2, "little"), closed.to_bytes(2, "little")
        assert first == [("b", b"\x00" + lp), ("b", b"\x01" + lp),
                         ("b", b"\x02" + lc), ("b", b"\x03" + lc)]
        await c.send(b"\x00hello")
        await c.send(b"\x01ignored")
        msgs = await c.collect()
        nursery.cancel_scope.cancel()
    assert c.channel(0) == lp + b"echo:hello" and c.close_code == 1000
    assert c.channel(3) == lc + (
        f"error forwarding port {closed} to pod {UID}, uid : failed to execute portforward in "
        f'network namespace "/var/run/netns/cni-{UID}": failed to connect to '
        f'localhost:{closed} inside namespace "{UID}", IPv4: dial tcp4 127.0.0.1:{closed}: '
        f"connect: connection refused IPv6 dial tcp6 [::1]:{closed}: connect: connection "
        "refused ").encode()
    assert all(k == "b" for k, _ in msgs)


async def test_portforward_base64_and_repeated_ports(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, _echo_once, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        c = await ws(h, h.url("portforward", ports=[str(port), str(port)]),
                     "v4.base64.channel.k8s.io")
        lp = base64.b64encode(port.to_bytes(2, "little"))
        assert [await c.next() for _ in range(4)] == [
            ("t", b"0" + lp), ("t", b"1" + lp), ("t", b"2" + lp), ("t", b"3" + lp)]
        await c.send(b"2" + base64.b64encode(b"two"), text=True)
        await c.send(b"0" + base64.b64encode(b"one"), text=True)
        msgs = await c.collect()
        nursery.cancel_scope.cancel()
    payloads = {d[:1]: base64.b64decode(d[1:]) for _, d in msgs[4:]}
    assert payloads == {b"0": b"echo:one", b"2": b"echo:two"}


# -- volume -----------------------------------------------------------------------------
async def test_64_mib_out_and_16_mib_in_hash(harness: Harness) -> None:
    h = harness
    size = 64 << 20
    c = await ws(h, exec_url(h, "sh", "-c", f"head -c {size} /dev/urandom | tee /dev/stderr "
                             "| sha256sum >&2", stdout=1, stderr=1), "v5.channel.k8s.io")
    digest, total, biggest = hashlib.sha256(), 0, 0
    start = trio.current_time()
    with trio.fail_after(25):
        while (msg := await c.next()) is not None:
            if msg[1][:1] == b"\x02" and total < size:
                chunk = msg[1][1:][: size - total]
                digest.update(chunk)
                total += len(chunk)
                biggest = max(biggest, len(msg[1]) - 1)
    elapsed = trio.current_time() - start
    assert total == size and biggest <= 32 * 1024
    assert c.channel(2)[size:].split()[0].decode() == digest.hexdigest()
    print(f"64 MiB out in {elapsed:.2f}s ({size / elapsed / 2**20:.0f} MiB/s)")

    data = os.urandom(16 << 20)
    c = await ws(h, exec_url(h, "sha256sum", stdin=1, stdout=1), "v5.channel.k8s.io")
    assert await c.next() == ("b", b"\x01")
    view = memoryview(data)
    for i in range(0, len(data), 32 * 1024):
        await c.send(b"\x00" + view[i:i + 32 * 1024])
    await c.send(b"\xff\x00")
    msgs = await c.collect()
    assert c.channel(1).split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert msgs[-1] == ("b", SUCCESS)


# -- a real client: kubernetes-asyncio (aiohttp) through trio-asyncio ------------------
async def _k8s_exec(url: str, script: str, *, v5: bool, heartbeat: float | None
                    ) -> dict[str, Any]:
    """asyncio-flavoured: one exec with kubernetes-asyncio's WsApiClient."""
    import aiohttp
    from kubernetes_asyncio.client import Configuration, CoreV1Api
    from kubernetes_asyncio.stream import WsApiClient

    config = Configuration(host=url)
    async with WsApiClient(configuration=config, heartbeat=heartbeat) as api_client:
        api = CoreV1Api(api_client=api_client)
        extra = {"_headers": {"sec-websocket-protocol": "v5.channel.k8s.io"}} if v5 else {}
        command = ["sh", "-c", script]
        channels: dict[int, bytes] = {}
        async with await api.connect_get_namespaced_pod_exec(
            "p", "ns", command=command, stdin=True, stdout=True, stderr=True, tty=False,
            _preload_content=False, **extra,
        ) as sock:
            await sock.send_bytes(b"\x00from stdin\n")
            if v5:
                await sock.send_bytes(b"\xff\x00")
            async for msg in sock:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                channels[msg.data[0]] = channels.get(msg.data[0], b"") + msg.data[1:]
            close_code = sock.close_code
        return {"channels": channels, "close": close_code, "protocol": sock.protocol,
                "exit": WsApiClient.parse_error_data(channels.get(3, b"{}").decode())}


async def test_kubernetes_asyncio_v4_and_v5(harness: Harness) -> None:
    import trio_asyncio

    from kuberun_trio.aio.bridge import open_aio_loop

    url = f"http://{harness.host}:{harness.port}"
    async with open_aio_loop():
        with trio.fail_after(15):
            v5 = await trio_asyncio.aio_as_trio(_k8s_exec)(
                url, "sleep 0.5; cat; echo to-err >&2; exit 4", v5=True, heartbeat=0.2)
            v4 = await trio_asyncio.aio_as_trio(_k8s_exec)(
                url, "read line; echo got $line; exit 0", v5=False, heartbeat=None)
    # v5: the half-close gives cat its EOF; heartbeat pings (every 0.2 s) are answered
    assert v5["channels"] == {1: b"from stdin\n", 2: b"to-err\n", 3: v5["channels"][3]}
    assert v5["exit"] == 4 and v5["close"] == 1000
    # v4 (the default): stdout, the Success status (exit code 0), a clean close
    assert v4["channels"] == {1: b"got from stdin\n", 3: b'{"metadata":{},"status":"Success"}'}
    assert v4["exit"] == 0 and v4["close"] == 1000


# -- with the real kubelet --------------------------------------------------------------
async def _running_pod(cluster: EmbeddedCluster, name: str, container: dict[str, Any]) -> None:
    cluster.store.create_pod("default", {"metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", **container}]}})
    with trio.fail_after(15):
        while True:
            try:
                cluster.kubelet.running_container("default", name, "c")
                return
            except LookupError:
                await trio.sleep(0.02)


def _endpoint(cluster: EmbeddedCluster) -> Endpoint:
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    return Endpoint(host, int(port), cluster.token)


async def test_real_kubelet_attach_and_exec_end_with_the_container(
        http_cluster: EmbeddedCluster) -> None:
    cluster = http_cluster
    ep = _endpoint(cluster)
    try:
        await _running_pod(cluster, "att", {"command": ["sh", "-c", "read x; echo got $x; "
                                                        "exec sleep 30"], "stdin": True})
        base = "/api/v1/namespaces/default/pods/att"
        attach = await ws(ep, f"{base}/attach?stdin=true&stdout=true", "v5.channel.k8s.io")
        execd = await ws(ep, f"{base}/exec?command=sleep&command=30&stdout=1")
        assert await attach.next() == ("b", b"\x01")
        assert await execd.next() == ("b", b"\x01")
        await attach.send(b"\x00hi\n")
        with trio.fail_after(10):
            assert await attach.next() == ("b", b"\x01got hi\n")
        await cluster.faults.kill("default", "att")  # the container stops ...
        assert (await attach.collect())[-1] == ("b", SUCCESS)  # attach: always Success
        st = status_json((await execd.collect())[-1][1])  # ... and takes the exec with it
        assert st["status"] == "Failure"
        opened = [e for e in cluster.request_log.for_pod("default", "att")
                  if e.kind == "exec-open"]
        assert len(opened) == 2
        got = await open_ws(ep, f"{base}/exec?command=true&stdout=1")
        assert isinstance(got, HttpAnswer) and got.status == 500
        assert got.body == b'container not found ("c")'
    finally:
        for stream in ep.streams:
            await trio.aclose_forcefully(stream)
