"""The embedded cluster's WebSocket layer: handshake, messages, close, framing, resize JSON."""

from __future__ import annotations

import base64

import pytest
import trio
import trio.testing
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from kuberun_trio.cluster import websocket
from kuberun_trio.cluster.websocket import (
    PORTFORWARD_PROTOCOLS,
    REMOTECOMMAND_V4_PROTOCOLS,
    ChannelCodec,
    ResizeDecoder,
    WebSocket,
    accept_key,
    choose_protocol,
    handshake_problem,
    handshake_response,
    is_upgrade_request,
    is_websocket_request,
    offered_protocols,
)

# -- handshake -------------------------------------------------------------------


def test_accept_key_rfc6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_response_bytes() -> None:
    assert handshake_response("dGhlIHNhbXBsZSBub25jZQ==", "v4.channel.k8s.io") == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    )
    assert b"Sec-WebSocket-Protocol" not in handshake_response("x", "")


@pytest.mark.parametrize(
    ("header", "supported", "expected"),
    [
        (None, REMOTECOMMAND_V4_PROTOCOLS, ""),
        ("v4.channel.k8s.io", REMOTECOMMAND_V4_PROTOCOLS, "v4.channel.k8s.io"),
        ("foo, channel.k8s.io,v4.channel.k8s.io", REMOTECOMMAND_V4_PROTOCOLS, "channel.k8s.io"),
        ("base64.channel.k8s.io", REMOTECOMMAND_V4_PROTOCOLS, "base64.channel.k8s.io"),
        ("v2.channel.k8s.io, v3.channel.k8s.io", REMOTECOMMAND_V4_PROTOCOLS, None),
        ("v5.channels.k8s.io", REMOTECOMMAND_V4_PROTOCOLS, None),
        ("channel.k8s.io", PORTFORWARD_PROTOCOLS, None),
        ("portforward.k8s.io, v4.base64.channel.k8s.io", PORTFORWARD_PROTOCOLS,
         "v4.base64.channel.k8s.io"),
        (None, PORTFORWARD_PROTOCOLS, ""),
    ],
)
def test_protocol_negotiation(header: str | None, supported: tuple[str, ...],
                              expected: str | None) -> None:
    headers = {} if header is None else {"sec-websocket-protocol": header}
    assert choose_protocol(offered_protocols(headers), supported) == expected


def test_upgrade_detection_and_handshake_problems() -> None:
    ws = {"connection": "keep-alive, Upgrade", "upgrade": "WebSocket",
          "sec-websocket-version": "13", "sec-websocket-key": "abc"}
    assert is_upgrade_request(ws) and is_websocket_request(ws)
    assert not is_upgrade_request({"upgrade": "websocket"})
    assert not is_websocket_request({"connection": "upgrade", "upgrade": "SPDY/3.1"})
    assert handshake_problem("GET", ws) is None
    assert handshake_problem("POST", ws) == 405
    assert handshake_problem("GET", {**ws, "sec-websocket-version": "8"}) == 400
    assert handshake_problem("GET", {**ws, "sec-websocket-key": ""}) == 400


# -- channel framing ---------------------------------------------------------------


def test_binary_codec() -> None:
    codec = ChannelCodec.for_protocol("v4.channel.k8s.io")
    assert not codec.base64
    assert codec.encode(1, b"hi") == b"\x01hi"
    assert codec.encode(3, b"") == b"\x03"
    assert codec.decode(b"\x00data") == (0, b"data")
    assert codec.decode(b"\x04") == (4, b"")
    assert codec.decode(b"") is None


def test_base64_codec() -> None:
    codec = ChannelCodec.for_protocol("base64.channel.k8s.io")
    assert codec.base64 and ChannelCodec.for_protocol("v4.base64.channel.k8s.io").base64
    assert codec.encode(1, b"\xe2\x82\xac") == b"1" + base64.b64encode(b"\xe2\x82\xac")
    assert codec.encode(1, b"") == b"1"
    assert codec.decode(b"0" + base64.b64encode(b"stdin")) == (0, b"stdin")
    assert codec.decode(b"0!!not base64") is None
    assert codec.decode(b"/") == (255, b"")  # '/' - '0' wraps like a Go byte


# -- resize JSON ---------------------------------------------------------------------


def test_resize_split_and_concatenated() -> None:
    dec = ResizeDecoder()
    assert dec.feed(b'{"Wid') == []
    assert dec.feed(b'th":80,"Height"') == []
    assert dec.feed(b':24}\n{"width":100,"HEIGHT":30}{"Width":1') == [(80, 24), (100, 30)]
    assert dec.feed(b',"Height":2}') == [(1, 2)]


def test_resize_zero_null_unknown_keys_and_strings() -> None:
    dec = ResizeDecoder()
    assert dec.feed(b'{"Width":0,"Height":5} null {"Width":7,"Height":null}') == []
    assert dec.feed(b'{"x":"}{","Width":9,"Height":9,"extra":[1,{"a":2}]}') == [(9, 9)]
    assert not dec.failed


@pytest.mark.parametrize("bad", [b"[1,2]", b'"text"', b"42 ", b'{"Width":-1}',
                                 b'{"Width":70000}', b'{"Width":80.0}', b'{"Width":"80"}',
                                 b'{"Width":NaN}', b"{oops}"])
def test_resize_malformed_stops_for_good(bad: bytes) -> None:
    dec = ResizeDecoder()
    assert dec.feed(b'{"Width":10,"Height":10}' + bad) == [(10, 10)]
    assert dec.failed
    assert dec.feed(b'{"Width":20,"Height":20}') == []


def test_resize_utf8_split_inside_key() -> None:
    dec = ResizeDecoder()
    data = '{"Wé":1,"Width":3,"Height":4}'.encode()
    cut = data.index(b"\xc3") + 1
    assert dec.feed(data[:cut]) == []
    assert dec.feed(data[cut:]) == [(3, 4)]


# -- the connection over memory streams -------------------------------------------


class Client:
    """A wsproto client on the other end of a stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(ConnectionType.CLIENT)

    async def send(self, event: BytesMessage | TextMessage | Ping | CloseConnection) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def events(self) -> list[object]:
        data = await self.stream.receive_some(65536)
        self.conn.receive_data(data or None)
        return list(self.conn.events())


def pair() -> tuple[WebSocket, Client]:
    server, client = trio.testing.memory_stream_pair()
    return WebSocket(server, "v4.channel.k8s.io"), Client(client)


async def test_fragmented_messages_are_reassembled() -> None:
    ws, client = pair()
    await client.send(BytesMessage(data=b"\x00he", message_finished=False))
    await client.send(BytesMessage(data=b"ll", message_finished=False))
    await client.send(BytesMessage(data=b"o", message_finished=True))
    await client.send(TextMessage(data="0aGk=", message_finished=True))
    assert await ws.receive() == b"\x00hello"
    assert await ws.receive() == b"0aGk="


async def test_ping_is_answered_and_messages_sent() -> None:
    ws, client = pair()
    await client.send(Ping(payload=b"beat"))
    await client.send(BytesMessage(data=b"\x00x"))
    assert await ws.receive() == b"\x00x"
    await ws.send_bytes(b"\x01out")
    await ws.send_text("1b3V0")
    events = await client.events()
    assert isinstance(events[0], Pong) and events[0].payload == b"beat"
    assert isinstance(events[1], BytesMessage) and events[1].data == b"\x01out"
    assert isinstance(events[2], TextMessage) and events[2].data == "1b3V0"
    assert ws.bytes_sent == 9


async def test_peer_close_ends_receive_and_is_answered() -> None:
    ws, client = pair()
    await client.send(BytesMessage(data=b"\x00last"))
    await client.send(CloseConnection(code=1000))
    assert await ws.receive() == b"\x00last"
    assert await ws.receive() is None
    assert ws.closed
    events = await client.events()
    assert isinstance(events[0], CloseConnection) and events[0].code == 1000
    with pytest.raises(trio.BrokenResourceError):
        await ws.send_bytes(b"\x01late")


async def test_eof_without_close_ends_receive() -> None:
    ws, client = pair()
    await client.stream.aclose()
    assert await ws.receive() is None


async def test_close_does_not_wait_for_a_silent_peer(autojump_clock: trio.abc.Clock) -> None:
    ws, client = pair()
    start = trio.current_time()
    await ws.close(1000, linger=1.0)
    assert 0.99 <= trio.current_time() - start <= 1.01
    events = await client.events()
    assert isinstance(events[0], CloseConnection) and events[0].code == 1000
    assert await client.stream.receive_some(10) == b""  # dropped


async def test_close_returns_as_soon_as_peer_answers(autojump_clock: trio.abc.Clock) -> None:
    ws, client = pair()

    async def answer() -> None:
        for event in await client.events():
            if isinstance(event, CloseConnection):
                await client.send(event.response())
                await client.stream.aclose()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        await ws.close()
    assert trio.current_time() - start < 0.01


async def test_abort_sends_no_close_frame() -> None:
    ws, client = pair()
    await ws.send_bytes(b"\x01partial")
    await ws.abort()
    events = await client.events()
    assert [type(e) for e in events] == [BytesMessage]
    assert await client.stream.receive_some(10) == b""


async def test_receive_reads_only_on_demand() -> None:
    """Backpressure: a message not asked for stays in the peer's send path."""
    server, client_stream = trio.testing.lockstep_stream_pair()
    ws, client = WebSocket(server), Client(client_stream)
    big = b"\x00" + b"x" * 200_000
    sent = trio.Event()

    async def send_two() -> None:
        await client.send(BytesMessage(data=b"\x00first"))
        await client.send(BytesMessage(data=big))
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_two)
        assert await ws.receive() == b"\x00first"
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()  # nobody asked for the second message: nothing read
        assert await ws.receive() == big
    assert sent.is_set()


async def test_oversized_message_closes_with_1009(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websocket, "MAX_MESSAGE", 1000)
    ws, client = pair()
    await client.send(BytesMessage(data=b"\x00" + b"y" * 2000))
    assert await ws.receive() is None
    events = await client.events()
    assert isinstance(events[0], CloseConnection) and events[0].code == 1009
