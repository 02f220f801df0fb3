"""Server-side WebSocket over a trio stream, plus Kubernetes channel framing.

Theory of operation
-------------------
The HTTP server (:mod:`.http`) parses the upgrade request with h11 and hands
the raw stream over. From there this module does what golang.org/x/net's
``websocket`` server does for the kubelet and the API server:

* **Handshake.** :func:`offered_protocols` reads the client's
  ``Sec-WebSocket-Protocol`` list in the client's order, :func:`choose_protocol`
  picks the first supported entry (``""`` stands for "no header"), and
  :meth:`WebSocket.accept` writes the ``101`` with the RFC 6455 accept hash and
  the chosen protocol (no protocol header when it is ``""``). Refusals (403 with
  an empty body and so on) are plain HTTP responses decided by the caller.
* **Messages.** :class:`WebSocket` wraps a sans-IO :class:`wsproto.Connection`.
  :meth:`~WebSocket.receive` returns one whole message (fragments reassembled,
  text frames as UTF-8 bytes), answers pings on the way and returns ``None``
  once the peer has closed or gone away. It reads from the socket only when the
  caller asks for the next message and no complete one is buffered, so a slow
  consumer pushes back on the TCP connection instead of growing a queue.
  Sends from several tasks are serialised by a lock.
* **Close.** :meth:`~WebSocket.close` sends a Close frame (1000), then reads and
  discards what the peer still sends for at most ``linger`` seconds (so our
  unread bytes do not turn the close into a TCP reset that would destroy the
  status frame on its way) and drops the connection; a peer that never answers
  the Close does not hold it up. :meth:`~WebSocket.abort` drops TCP without a
  Close frame (fault injection).
* **Channels.** :class:`ChannelCodec` is the ``[channel][payload]`` framing of
  the ``*.channel.k8s.io`` protocols: one raw channel byte and binary frames,
  or, for the base64 protocols, an ASCII digit and a standard-base64 payload in
  text frames. :class:`ResizeDecoder` reads channel 4 (terminal sizes) the way
  Go's streaming JSON decoder does.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import collections
import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
V1_BASE64 = "base64.channel.k8s.io"
V1 = "channel.k8s.io"

REMOTECOMMAND_V4_PROTOCOLS = (V4, V4_BASE64, V1_BASE64, V1, "")
"""What the kubelet/CRI streaming server accepts for exec and attach (the v4 path)."""
PORTFORWARD_PROTOCOLS = ("", V4, V4_BASE64)
"""What the kubelet accepts for WebSocket port-forward."""
BASE64_PROTOCOLS = frozenset({V4_BASE64, V1_BASE64})

MAX_MESSAGE = 32 << 20
"""x/net/websocket's ``DefaultMaxPayloadBytes``."""
_RECEIVE_SIZE = 65536
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- handshake --------------------------------------------------------------
def is_upgrade_request(headers: Mapping[str, str]) -> bool:
    """apimachinery ``IsUpgradeRequest``: ``Connection`` mentions ``upgrade``."""
    return "upgrade" in headers.get("connection", "").lower()


def is_websocket_request(headers: Mapping[str, str]) -> bool:
    """wsstream ``IsWebSocketRequest``: an upgrade to ``websocket``."""
    return is_upgrade_request(headers) and headers.get("upgrade", "").lower() == "websocket"


def offered_protocols(headers: Mapping[str, str]) -> list[str]:
    """The client's subprotocols in its order; ``[""]`` when it offers none."""
    raw = headers.get("sec-websocket-protocol", "").strip()
    if not raw:
        return [""]
    return [p.strip() for p in raw.split(",")]


def choose_protocol(offered: list[str], supported: Collection[str]) -> str | None:
    """The first of ``offered`` that is ``supported`` (client's order), else None."""
    for protocol in offered:
        if protocol in supported:
            return protocol
    return None


def handshake_problem(method: str, headers: Mapping[str, str]) -> int | None:
    """The status x/net/websocket answers a malformed handshake with, or None if fine."""
    if method != "GET":
        return 405
    key = headers.get("sec-websocket-key", "")
    if headers.get("sec-websocket-version", "").strip() != "13" or not key.strip():
        return 400
    return None


def accept_key(key: str) -> str:
    """RFC 6455 ``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.strip().encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_response(key: str, protocol: str) -> bytes:
    """The ``101 Switching Protocols`` head, byte for byte as x/net/websocket writes it."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- channel framing --------------------------------------------------------
@attrs.frozen
class ChannelCodec:
    """``[channel][payload]`` framing of one ``*.channel.k8s.io`` protocol."""

    base64: bool
    """Base64 protocols: ASCII-digit channel, base64 payload, text frames."""

    @classmethod
    def for_protocol(cls, protocol: str) -> ChannelCodec:
        return cls(base64=protocol in BASE64_PROTOCOLS)

    def encode(self, channel: int, payload: bytes) -> bytes:
        """One message for ``channel``; send it as text when :attr:`base64` is set."""
        if self.base64:
            return bytes((48 + channel,)) + base64.b64encode(payload)
        return bytes((channel,)) + payload

    def decode(self, message: bytes) -> tuple[int, bytes] | None:
        """``(channel, payload)`` of a client message; None if empty or undecodable.

        As in wsstream, the base64 channel is ``byte - '0'`` modulo 256, and a
        payload that is not valid base64 drops the message.
        """
        if not message:
            return None
        if not self.base64:
            return message[0], message[1:]
        try:
            payload = base64.b64decode(message[1:], validate=True)
        except (binascii.Error, ValueError):
            return None
        return (message[0] - 48) & 0xFF, payload


# -- resize (channel 4) ------------------------------------------------------------
class ResizeDecoder:
    """Go's ``json.Decoder`` over channel 4, decoding ``TerminalSize`` objects.

    Objects may be split across or concatenated within frames; keys match
    case-insensitively; a malformed value stops resize handling for good (as the
    kubelet's ``handleResizeEvents`` loop breaks). Zero sizes are dropped, as
    ``HandleResizing`` does.
    """

    MAX_PENDING = 64 * 1024

    def __init__(self) -> None:
        self._text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.failed = False

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Sizes ``(width, height)`` completed by ``data``."""
        if self.failed:
            return []
        self._text += self._utf8.decode(data)
        sizes: list[tuple[int, int]] = []
        while True:
            text = self._text.lstrip(" \t\r\n")
            self._text = text
            if not text:
                return sizes
            if text[0] != "{":
                if text.startswith("null"):  # decodes into nothing: a zero size
                    self._text = text[4:]
                    continue
                self.failed = not "null".startswith(text)
                return sizes
            end = _object_end(text)
            if end is None:
                self.failed = len(text) > self.MAX_PENDING
                return sizes
            self._text = text[end:]
            size = _terminal_size(text[:end])
            if size is None:
                self.failed = True
                return sizes
            if size[0] > 0 and size[1] > 0:
                sizes.append(size)


def _object_end(text: str) -> int | None:
    """Index just past the JSON object starting at ``text[0]``, or None if incomplete."""
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _terminal_size(text: str) -> tuple[int, int] | None:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    size = {"width": 0, "height": 0}
    for key, value in obj.items():
        field = key.lower()
        if field not in size or value is None:
            continue
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            return None
        size[field] = value
    return size["width"], size["height"]


# -- the connection -----------------------------------------------------------
class WebSocket:
    """The server end of one WebSocket connection (after the 101)."""

    def __init__(self, stream: trio.abc.Stream, protocol: str = "") -> None:
        self.stream = stream
        self.protocol = protocol
        """The negotiated subprotocol (``""`` for none)."""
        self._conn = Connection(ConnectionType.SERVER)
        self._send_lock = trio.Lock()
        self._ready: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes] = []
        self._part_size = 0
        self._peer_gone = False
        self._closed = False
        self.on_peer_gone: Callable[[], None] | None = None
        """Called once when the peer's Close frame (or EOF) arrives: the moment the
        client closed the stream, which the request log records."""
        self.bytes_sent = 0
        """Payload bytes sent in data messages so far."""

    @classmethod
    async def accept(
        cls, stream: trio.abc.Stream, headers: Mapping[str, str], protocol: str
    ) -> WebSocket:
        """Write the 101 response for ``headers`` and return the open connection."""
        await stream.send_all(handshake_response(headers.get("sec-websocket-key", ""), protocol))
        return cls(stream, protocol)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "peer-gone" if self._peer_gone else "open"
        return f"<WebSocket {self.protocol or '-'} {state} sent={self.bytes_sent}>"

    @property
    def closed(self) -> bool:
        """True once we closed or the peer is gone: sends would fail."""
        return self._closed or self._peer_gone

    # -- sending --------------------------------------------------------------
    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message. Raises :class:`trio.BrokenResourceError` once closed."""
        await self._send(BytesMessage(data=data), len(data))

    async def send_text(self, data: str) -> None:
        """Send one text message (``data`` must be the whole message)."""
        await self._send(TextMessage(data=data), len(data))

    async def send_message(self, data: bytes, *, text: bool) -> None:
        """Send ``data`` as a text (ASCII/UTF-8 payload) or a binary message."""
        if text:
            await self.send_text(data.decode("utf-8"))
        else:
            await self.send_bytes(data)

    async def _send(self, event: BytesMessage | TextMessage, size: int) -> None:
        async with self._send_lock:
            if self.closed or self._conn.state is not ConnectionState.OPEN:
                raise trio.BrokenResourceError("WebSocket is closed")
            await self.stream.send_all(self._conn.send(event))
            self.bytes_sent += size

    # -- receiving ------------------------------------------------------------
    async def receive(self) -> bytes | None:
        """The next whole message, or None once the peer closed or went away."""
        while not self._ready:
            if self._peer_gone or self._closed:
                return None
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._mark_peer_gone()
                return None
            self._conn.receive_data(bytes(data))
            await self._process_events()
        return self._ready.popleft()

    async def _process_events(self) -> None:
        for event in self._conn.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                chunk = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
                self._parts.append(chunk)
                self._part_size += len(chunk)
                if self._part_size > MAX_MESSAGE:
                    await self._fail(1009)
                    return
                if event.message_finished:
                    self._ready.append(b"".join(self._parts))
                    self._parts, self._part_size = [], 0
            elif isinstance(event, Ping):
                await self._send_control(event.response())
            elif isinstance(event, CloseConnection):
                self._mark_peer_gone()
                if self._conn.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_control(event.response())
                else:  # a protocol error wsproto reports as a close
                    await self._send_control(CloseConnection(code=event.code))
                self._peer_gone = True
                return

    def _mark_peer_gone(self) -> None:
        if not self._peer_gone:
            self._peer_gone = True
            if self.on_peer_gone is not None:
                self.on_peer_gone()

    async def _fail(self, code: int) -> None:
        await self._send_control(CloseConnection(code=code))
        self._peer_gone = True

    async def _send_control(self, event: Pong | CloseConnection) -> None:
        async with self._send_lock:
            if self._closed:
                return
            try:
                await self.stream.send_all(self._conn.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._peer_gone = True

    # -- closing --------------------------------------------------------------
    async def close(self, code: int = 1000, *, linger: float = 1.0) -> None:
        """Send a Close frame, wait at most ``linger`` s for the peer, drop the connection."""
        if self._closed:
            return
        try:
            with trio.move_on_after(linger, shield=True):
                async with self._send_lock:
                    self._closed = True
                    if self._conn.state is ConnectionState.OPEN:
                        await self.stream.send_all(self._conn.send(CloseConnection(code=code)))
                while not self._peer_gone and await self.stream.receive_some(_RECEIVE_SIZE):
                    pass  # discard: a reset would destroy what we sent last
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            await trio.aclose_forcefully(self.stream)

    async def abort(self) -> None:
        """Drop the TCP connection without a Close frame."""
        self._closed = True
        await trio.aclose_forcefully(self.stream)
