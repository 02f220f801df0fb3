"""kubectl's SPDY port-forward against the embedded cluster's handler, frame by frame.

A small SPDY client (built on :mod:`kuberun_trio.cluster.spdy`) drives the tunnelled
(``SPDY/3.1+portforward.k8s.io`` in WebSocket) and the plain (``Upgrade: SPDY/3.1``)
paths: stream pairs, echo through a TCP server standing in for the pod, the kubelet's
error texts, PING, RST, refusals before the upgrade, and the sandbox stopping.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import zlib
from collections.abc import Awaitable, Callable

import pytest
import test_cluster_streaming
import trio
from test_cluster_streaming import UID, Harness, HttpAnswer, WsClient, answer, open_ws, ws

from kuberun_trio.cluster import EmbeddedCluster, spdy, spdyforward

TUNNEL = "SPDY/3.1+portforward.k8s.io"
harness = test_cluster_streaming.harness  # the fixture: a fake kubelet, real sandbox


class SpdyClient:
    """The client end: creates stream pairs as client-go does and records every frame."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]],
                 receive: Callable[[], Awaitable[bytes]]) -> None:
        self._send, self._receive = send, receive
        self.codec, self.reader = spdy.HeaderCodec(), spdy.FrameReader()
        self.next_id = 1
        self.data: dict[int, bytes] = {}
        self.fin: set[int] = set()
        self.replies: set[int] = set()
        self.resets: dict[int, int] = {}
        self.pings: list[int] = []
        self.eof = False

    async def send(self, frame: bytes) -> None:
        # client-go writes field by field: cut every frame in pieces
        for piece in (frame[:4], frame[4:8], frame[8:]):
            await self._send(piece)

    async def syn(self, fin: bool = False, **headers: str) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        block = self.codec.encode({k: [v] for k, v in headers.items()})
        head = struct.pack(">IIBB", sid, 0, 0, 0)
        await self.send(spdy.control_frame(
            spdy.SYN_STREAM, spdy.FLAG_FIN if fin else 0, head + block))
        return sid

    async def pair(self, port: int, request: str) -> tuple[int, int]:
        """error stream (half-closed at once, as kubectl does), then data stream."""
        err = await self.syn(streamtype="error", port=str(port), requestid=request)
        await self.send(spdy.data_frame(err, b"", fin=True))
        data = await self.syn(streamtype="data", port=str(port), requestid=request)
        return err, data

    async def pump(self) -> bool:
        """Read and record frames; False at EOF."""
        chunk = await self._receive()
        if not chunk:
            self.eof = True
            return False
        for frame in self.reader.feed(chunk):
            if isinstance(frame, spdy.DataFrame):
                self.data[frame.stream_id] = self.data.get(frame.stream_id, b"") + frame.data
                if frame.fin:
                    self.fin.add(frame.stream_id)
            elif frame.type == spdy.SYN_REPLY:
                self.replies.add(frame.stream_id())
                self.codec.decode(frame.payload[4:])
            elif frame.type == spdy.RST_STREAM:
                self.resets[frame.stream_id()] = frame.word(1)
            elif frame.type == spdy.PING:
                self.pings.append(frame.word(0))
        return True

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not done():
                assert await self.pump(), "the server closed the connection"


async def tunnel_client(h: Harness) -> tuple[SpdyClient, WsClient]:
    c = await ws(h, h.url("portforward"), TUNNEL)
    assert c.protocol == TUNNEL

    async def receive() -> bytes:
        msg = await c.next()
        if msg is None:
            return b""
        assert msg[0] == "b", "the tunnel carries binary messages only"
        return msg[1]

    return SpdyClient(c.send, receive), c


async def plain_client(h: Harness) -> SpdyClient:
    stream = await trio.open_tcp_stream(h.host, h.port)
    h.streams.append(stream)
    await stream.send_all((
        f"POST {h.url('portforward')} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        "X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n").encode())
    buf = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"Upgrade: SPDY/3.1" in head and b"X-Stream-Protocol-Version: portforward.k8s.io" in head
    pending = [rest] if rest else []

    async def receive() -> bytes:
        if pending:
            return pending.pop()
        return bytes(await stream.receive_some(65536))

    return SpdyClient(stream.send_all, receive)


async def _echo_once(stream: trio.SocketStream) -> None:
    async with stream:
        data = await stream.receive_some(65536)
        await stream.send_all(b"echo:" + data)


async def _hold(stream: trio.SocketStream) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # a cut forward may reset it
            await stream.send_all(b"hi")  # connected
            while await stream.receive_some(65536):
                pass


async def _serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
                 ) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def refused_text(port: int) -> bytes:
    """containerd + kubelet, as kubectl prints it from a real cluster."""
    return (
        f"error forwarding port {port} to pod {UID}, uid : failed to execute portforward in "
        f'network namespace "/var/run/netns/cni-{UID}": failed to connect to localhost:{port} '
        f'inside namespace "{UID}", IPv4: dial tcp4 127.0.0.1:{port}: connect: connection '
        f"refused IPv6 dial tcp6 [::1]:{port}: connect: connection refused ").encode()


# -- framing ------------------------------------------------------------------------------
def test_dictionary_is_the_one_go_uses() -> None:
    # kubectl 1.33's first header block starts 78 F9 E3 C6 A7 C2: zlib with FDICT and the
    # dictionary's Adler-32 -- Go computed it over moby/spdystream's headerDictionary.
    assert len(spdy.DICTIONARY) == 1423 and zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    client, server = spdy.HeaderCodec(), spdy.HeaderCodec()
    for headers in ({"streamtype": ["error"], "port": ["80"]}, {"a": ["1", "2"]}, {}):
        assert server.decode(client.encode(headers)) == headers  # one context per direction


def test_frame_reader_reassembles_and_rejects() -> None:
    frames = spdy.ping_frame(7) + spdy.data_frame(3, b"abc", fin=True)
    reader = spdy.FrameReader()
    got = [f for i in range(len(frames)) for f in reader.feed(frames[i:i + 1])]
    assert got == [spdy.ControlFrame(spdy.PING, 0, b"\x00\x00\x00\x07"),
                   spdy.DataFrame(3, spdy.FLAG_FIN, b"abc")]
    with pytest.raises(spdy.SpdyError, match="version 2"):
        spdy.FrameReader().feed(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01")
    with pytest.raises(spdy.SpdyError, match="header block"):
        spdy.HeaderCodec().decode(b"not zlib at all")


# -- sessions -------------------------------------------------------------------------------
async def test_tunnel_echo_refused_ping_and_rejected_stream(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        port, closed = await _serve(nursery, _echo_once), _closed_port()
        c, wsc = await tunnel_client(h)
        await c.send(spdy.ping_frame(1))
        await c.until(lambda: c.pings == [1])
        err, data = await c.pair(port, "0")
        await c.until(lambda: {err, data} <= c.replies)
        await c.send(spdy.data_frame(data, b"hello", fin=True))
        await c.until(lambda: {err, data} <= c.fin)
        assert c.data.get(data) == b"echo:hello" and c.data.get(err, b"") == b""
        err2, data2 = await c.pair(closed, "1")
        await c.until(lambda: {err2, data2} <= c.fin)
        assert c.data[err2] == refused_text(closed) and c.data.get(data2, b"") == b""
        bad = await c.syn(streamtype="data", requestid="2")  # no port header
        other = await c.syn(streamtype="stdin", port="80", requestid="3")
        await c.until(lambda: {bad, other} <= set(c.resets))
        assert c.resets == {bad: spdy.CANCEL, other: spdy.CANCEL}
        await wsc.close()
        nursery.cancel_scope.cancel()


async def test_plain_upgrade_many_concurrent_pairs(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, _echo_once)
        c = await plain_client(h)
        pairs = [await c.pair(port, str(i)) for i in range(12)]
        for i, (_, data) in enumerate(pairs):  # interleaved with the stream creation above
            await c.send(spdy.data_frame(data, f"n{i}".encode()))
        await c.until(lambda: all(d in c.fin and e in c.fin for e, d in pairs))
        assert [c.data[d] for _, d in pairs] == [f"echo:n{i}".encode() for i in range(12)]
        assert all(c.data.get(e, b"") == b"" for e, _ in pairs)
        nursery.cancel_scope.cancel()


async def test_ipv6_only_listener_is_reached_over_tcp6(harness: Harness) -> None:
    async with trio.open_nursery() as nursery:  # containerd dials tcp4, then tcp6
        listeners = await nursery.start(functools.partial(
            trio.serve_tcp, _echo_once, 0, host="::1"))
        port = listeners[0].socket.getsockname()[1]
        c = await plain_client(harness)
        err, data = await c.pair(port, "0")
        await c.send(spdy.data_frame(data, b"six"))
        await c.until(lambda: {err, data} <= c.fin)
        assert c.data[data] == b"echo:six" and c.data.get(err, b"") == b""
        nursery.cancel_scope.cancel()


async def test_duplicate_stream_type_is_reported(harness: Harness) -> None:
    c, wsc = await tunnel_client(harness)
    err = await c.syn(streamtype="error", port="80", requestid="7")
    await c.syn(streamtype="error", port="80", requestid="7")
    await c.until(lambda: err in c.data)
    assert c.data[err] == b"error processing stream for request 7: error stream already assigned"
    await wsc.close()


async def test_data_on_an_error_stream_is_dropped(harness: Harness) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, _echo_once)
        c, wsc = await tunnel_client(harness)
        err = await c.syn(streamtype="error", port=str(port), requestid="0")
        for _ in range(40):  # more than a stream's queue: must not stall the reader
            await c.send(spdy.data_frame(err, b"junk"))
        data = await c.syn(streamtype="data", port=str(port), requestid="0")
        await c.send(spdy.data_frame(data, b"x"))
        await c.until(lambda: data in c.fin)
        assert c.data[data] == b"echo:x"
        await wsc.close()
        nursery.cancel_scope.cancel()


async def test_incomplete_pair_times_out(harness: Harness, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(spdyforward, "STREAM_CREATION_TIMEOUT", 0.2)
    c, wsc = await tunnel_client(harness)
    err = await c.syn(streamtype="error", port="80", requestid="5")
    await c.until(lambda: err in c.fin)
    assert c.data[err] == b"(conn=spdy, request=5) timed out waiting for streams"
    await wsc.close()


async def test_sandbox_stop_ends_forwards_then_new_ones_fail(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, _hold)
        c, wsc = await tunnel_client(h)
        err, data = await c.pair(port, "0")
        await c.until(lambda: {err, data} <= c.replies)
        await c.send(spdy.data_frame(data, b"held"))
        await trio.sleep(0.1)
        assert not c.fin
        h.kubelet.sandbox = "missing"  # the pod was deleted
        h.kubelet.sandbox_stopped.set()
        await c.until(lambda: {err, data} <= c.fin)
        assert c.data.get(err, b"") == b""  # a vanished pod network is not an error
        err2, data2 = await c.pair(port, "1")
        await c.until(lambda: {err2, data2} <= c.fin)
        assert c.data[err2] == (f"error forwarding port {port} to pod {UID}, uid : failed to find "
                                f'sandbox "{UID}" in store: not found').encode()
        await wsc.close()
        nursery.cancel_scope.cancel()


async def test_v4_websocket_ends_when_the_sandbox_stops(harness: Harness) -> None:
    h = harness
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, _hold)
        c = await ws(h, h.url("portforward", ports=port))
        assert len([await c.next() for _ in range(2)]) == 2
        await c.send(b"\x00held")
        h.kubelet.sandbox_stopped.set()
        await c.collect()
        nursery.cancel_scope.cancel()
    assert c.close_code == 1000 and c.channel(1) == port.to_bytes(2, "little")


# -- refusals before the upgrade -----------------------------------------------------------
@pytest.mark.parametrize(("state", "text"), [
    ("stopped", "rpc error: code = Unknown desc = sandbox container is not running"),
    ("missing", f"failed to find sandboxID for pod p_ns({UID})"),
])
async def test_no_ready_sandbox_is_the_kubelets_500(harness: Harness, state: str, text: str
                                                    ) -> None:
    harness.kubelet.sandbox = state
    for path, protocol in ((harness.url("portforward"), TUNNEL),
                           (harness.url("portforward", ports=80), "v4.channel.k8s.io")):
        got = await answer(harness, path, protocol)
        assert (got.status, got.body) == (500, text.encode())


async def test_spdy_negotiation_refusals(harness: Harness) -> None:
    h = harness
    got = await answer(h, h.url("portforward"), "SPDY/3.1+portforward.example.com")
    assert (got.status, got.body) == (
        400, b"unable to upgrade: no tunneling spdy protocols provided")
    got = await answer(h, h.url("portforward"), "SPDY/3.1+v9.portforward.k8s.io")
    assert got.status == 403 and got.body == (
        b"unable to upgrade: unable to negotiate protocol: client supports "
        b"[v9.portforward.k8s.io], server accepts [portforward.k8s.io]")
    plain = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    got = await answer(h, h.url("portforward"), None, method="POST", upgrade=False, extra=plain)
    assert (got.status, got.body) == (
        400, b"unable to upgrade: X-Stream-Protocol-Version is required")
    # a plain WebSocket still needs ?ports= (the v4 protocol)
    got = await answer(h, h.url("portforward"))
    assert isinstance(got, HttpAnswer) and got.body == b'query parameter "port" is required'
    assert isinstance(await open_ws(h, h.url("portforward", ports=80)), WsClient)


# -- with the real kubelet ------------------------------------------------------------------
async def test_real_kubelet_many_forwards_then_pod_deletion_ends_them(
        http_cluster: EmbeddedCluster) -> None:
    """16 concurrent v4 WebSockets and 16 SPDY pairs to one pod; deleting the pod ends every
    open forward even though the listener (on the host) outlives the pod's processes."""
    cluster = http_cluster
    ep = test_cluster_streaming._endpoint(cluster)
    await test_cluster_streaming._running_pod(cluster, "pf", {"command": ["sleep", "60"]})
    try:
        await _many_then_delete(cluster, ep)
    finally:
        for stream in ep.streams:
            await trio.aclose_forcefully(stream)


async def _many_then_delete(cluster: EmbeddedCluster, ep: test_cluster_streaming.Endpoint
                            ) -> None:
    async with trio.open_nursery() as nursery:
        echo, hold = await _serve(nursery, _echo_once), await _serve(nursery, _hold)
        base = "/api/v1/namespaces/default/pods/pf/portforward"
        sockets = [await ws(ep, f"{base}?ports={echo}") for _ in range(16)]
        for i, c in enumerate(sockets):
            await c.send(b"\x00" + str(i).encode())
        for i, c in enumerate(sockets):
            await c.collect()
            assert c.channel(0)[2:] == f"echo:{i}".encode() and c.close_code == 1000
        tunnel = await ws(ep, base, TUNNEL)

        async def receive() -> bytes:
            msg = await tunnel.next()
            return msg[1] if msg is not None else b""

        c = SpdyClient(tunnel.send, receive)
        pairs = [await c.pair(echo, str(i)) for i in range(16)]
        for i, (_, data) in enumerate(pairs):
            await c.send(spdy.data_frame(data, str(i).encode()))
        await c.until(lambda: all({e, d} <= c.fin for e, d in pairs))
        assert [c.data[d] for _, d in pairs] == [f"echo:{i}".encode() for i in range(16)]
        held_ws = await ws(ep, f"{base}?ports={hold}")
        err, data = await c.pair(hold, "held")
        await c.until(lambda: c.data.get(data) == b"hi")
        assert len([await held_ws.next() for _ in range(3)]) == 3  # port, port, "hi"
        cluster.store.delete_pod("default", "pf", grace_period_seconds=0)
        await c.until(lambda: {err, data} <= c.fin)
        await held_ws.collect()
        assert held_ws.close_code == 1000 and c.data.get(err, b"") == b""
        await tunnel.close()
        nursery.cancel_scope.cancel()
