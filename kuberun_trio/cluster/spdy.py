"""SPDY/3.1 framing as Kubernetes speaks it: frames, zlib header blocks, the byte reader.

Theory of operation
-------------------
Kubernetes' SPDY peers (moby/spdystream with its ``spdy`` framer, used by the kubelet and
client-go) exchange a byte stream of frames. Every frame starts with 8 bytes:

* control frame: ``1 | version(15) | type(16)``, ``flags(8) | length(24)``, then
  ``length`` bytes of payload (version 3);
* data frame: ``0 | stream-id(31)``, ``flags(8) | length(24)``, then the data. Flag
  ``FIN`` (1) half-closes the sender's side of the stream.

SYN_STREAM (``stream-id, associated-id, priority<<5, slot``), SYN_REPLY and HEADERS
(``stream-id``) carry a header block: ``count`` then ``len name len value`` (all 32-bit
big-endian; several values of one name joined by NUL), **zlib-compressed with the
SPDY/3 dictionary** over one compression context per direction for the whole
connection: every block must be inflated, even of a frame that is then ignored, or the
next one cannot be. Each block the sender writes ends with a zlib sync flush.

:class:`FrameReader` turns received bytes -- in whatever pieces the transport delivers
them (client-go writes each field as its own WebSocket message) -- into
:class:`DataFrame` and :class:`ControlFrame` objects; :class:`HeaderCodec` holds both
zlib contexts; the ``*_frame`` functions build the frames a server sends.

Sources: moby/spdystream ``spdy/{types,read,write}.go`` (the framer, its header
dictionary ``headerDictionary``), the SPDY/3 draft §2.6.10.1 (dictionary text).
"""

from __future__ import annotations

import struct
import zlib

import attrs

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS = 1, 2, 3, 4
PING, GOAWAY, HEADERS, WINDOW_UPDATE = 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
# RST_STREAM status codes
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL = 1, 2, 3, 5
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1

MAX_FRAME = 1 << 24
"""The 24-bit length field's limit; we refuse larger buffers than one such frame."""
MAX_HEADER_BLOCK = 256 * 1024
"""Inflated header blocks larger than this end the connection (a zlib bomb guard)."""

_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range",
    "referer", "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method", "get", "status",
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502"
    "504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad "
    "Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not "
    "Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec "
    "00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,"
    "image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,public"
    "privatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()
"""The SPDY/3 header-compression dictionary: length-prefixed words, then a text tail."""

Headers = dict[str, list[str]]


class SpdyError(Exception):
    """A malformed frame or header block: the connection cannot go on."""


@attrs.frozen
class DataFrame:
    stream_id: int
    flags: int
    data: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@attrs.frozen
class ControlFrame:
    type: int
    flags: int
    payload: bytes

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)

    def stream_id(self) -> int:
        """The first word's stream id (SYN_STREAM, SYN_REPLY, RST, HEADERS, WINDOW_UPDATE)."""
        if len(self.payload) < 4:
            raise SpdyError(f"control frame type {self.type} too short")
        return int.from_bytes(self.payload[:4], "big") & 0x7FFFFFFF

    def word(self, index: int) -> int:
        """The 32-bit big-endian word at ``index`` (PING id, RST status, ...)."""
        raw = self.payload[4 * index:4 * index + 4]
        if len(raw) < 4:
            raise SpdyError(f"control frame type {self.type} too short")
        return int.from_bytes(raw, "big")


Frame = DataFrame | ControlFrame


class FrameReader:
    """Whole frames out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            first, second = struct.unpack_from(">II", self._buf)
            length = second & 0xFFFFFF
            if len(self._buf) < 8 + length:
                break
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            flags = second >> 24
            if first & 0x80000000:
                version = (first >> 16) & 0x7FFF
                if version != VERSION:
                    raise SpdyError(f"unsupported SPDY version {version}")
                frames.append(ControlFrame(first & 0xFFFF, flags, payload))
            else:
                if first == 0:
                    raise SpdyError("stream id zero is disallowed")
                frames.append(DataFrame(first, flags, payload))
        return frames


class HeaderCodec:
    """Both directions' zlib contexts of one connection (SPDY/3 dictionary)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zdict=DICTIONARY)

    def decode(self, block: bytes) -> Headers:
        """Inflate and parse a received header block (names are lower case)."""
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyError(f"header block: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise SpdyError("header block too large")
        return _parse_block(raw)

    def encode(self, headers: Headers) -> bytes:
        """A compressed header block ending in a sync flush."""
        raw = bytearray(struct.pack(">I", len(headers)))
        for name, values in headers.items():
            value = "\x00".join(values).encode()
            raw += struct.pack(">I", len(name)) + name.lower().encode()
            raw += struct.pack(">I", len(value)) + value
        return self._deflate.compress(bytes(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


def _parse_block(raw: bytes) -> Headers:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise SpdyError("truncated header block")
        pos += n
        return raw[pos - n:pos]

    headers: Headers = {}
    (count,) = struct.unpack(">I", take(4))
    for _ in range(count):
        (size,) = struct.unpack(">I", take(4))
        name = take(size).decode("utf-8", "replace").lower()
        (size,) = struct.unpack(">I", take(4))
        headers.setdefault(name, []).extend(take(size).decode("utf-8", "replace").split("\x00"))
    return headers


# -- frames a server sends -------------------------------------------------------------
def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, *, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def syn_reply_frame(codec: HeaderCodec, stream_id: int, headers: Headers | None = None) -> bytes:
    return control_frame(SYN_REPLY, 0,
                         struct.pack(">I", stream_id) + codec.encode(headers or {}))


def rst_stream_frame(stream_id: int, status: int) -> bytes:
    return control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status))


def ping_frame(ping_id: int) -> bytes:
    return control_frame(PING, 0, struct.pack(">I", ping_id))


def goaway_frame(last_good_stream: int, status: int = GOAWAY_OK) -> bytes:
    return control_frame(GOAWAY, 0, struct.pack(">II", last_good_stream, status))


def parse_syn_stream(codec: HeaderCodec, frame: ControlFrame) -> tuple[int, Headers]:
    """``(stream_id, headers)`` of a SYN_STREAM (always inflates its header block)."""
    if len(frame.payload) < 10:
        raise SpdyError("SYN_STREAM too short")
    headers = codec.decode(frame.payload[10:])
    return frame.stream_id(), headers
