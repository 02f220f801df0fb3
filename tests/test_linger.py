"""Lingering close (aio/linger.py) against real sockets.

The server side pauses reading so that the client's bytes are unread when it
closes: an abort then answers with a TCP reset, a lingering close does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import trio
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.linger import Lingering


class _Refuser(asyncio.Protocol):
    def __init__(self, close: Callable[[asyncio.Transport], None]) -> None:
        self._close = close
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()  # what the client sends stays unread

    def refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(b"refused: why\n")
        self._close(self.transport)


async def _talk_to(close: Callable[[asyncio.Transport], None]) -> tuple[bytes, str]:
    """Connect, send, let the server refuse, send again, read to the end."""
    refusers: list[_Refuser] = []

    def factory() -> _Refuser:
        refusers.append(_Refuser(close))
        return refusers[-1]

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)

    server = await trio_asyncio.aio_as_trio(start)()
    port = server.sockets[0].getsockname()[1]
    received, outcome = b"", "read"
    try:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(bytes(64 * 1024))
            while not refusers or refusers[0].transport is None:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            refusers[0].refuse()
            await trio.sleep(0.3)
            try:
                await stream.send_all(b"\0" * 1024)  # a client that writes before it reads
                while not received.endswith(b"\n"):
                    if not (chunk := await stream.receive_some()):
                        outcome = "eof"
                        break
                    received += chunk
            except trio.BrokenResourceError as exc:
                outcome = f"reset: {exc.__cause__!r}"
            await stream.aclose()  # what a client does once it has read why
    finally:
        server.close()
    return received, outcome


async def test_an_abort_over_unread_bytes_resets_the_client() -> None:
    """The defect the lingering close fixes, shown with a plain abort."""
    async with open_aio_loop():
        _received, outcome = await _talk_to(lambda t: t.abort())
    assert outcome.startswith("reset"), outcome


async def test_a_lingering_close_lets_the_client_read_why() -> None:
    lingering = Lingering(seconds=5)
    async with open_aio_loop():
        received, outcome = await _talk_to(lingering.close)
        assert (received, outcome) == (b"refused: why\n", "read")
        await _until_empty(lingering)  # closed when the client closed, not after 5 s


@contextlib.asynccontextmanager
async def _accepting(count: int) -> AsyncIterator[list[asyncio.Transport]]:
    """``count`` accepted connections: their server-side transports."""
    servers: list[asyncio.Transport] = []

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            servers.append(transport)

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(Keep, "127.0.0.1", 0)

    server = await trio_asyncio.aio_as_trio(start)()
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        with trio.fail_after(5):
            while len(servers) < count:
                await trio.sleep(0.01)
        yield servers
        for client in clients:  # the server side has gone
            client.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(10) == b""
    finally:
        server.close()
        for client in clients:
            client.close()


async def _until_empty(lingering: Lingering) -> None:
    with trio.fail_after(5):
        while len(lingering):
            await trio.sleep(0.01)


async def test_lingering_is_bounded_in_time_and_number() -> None:
    lingering = Lingering(seconds=0.2, max_sockets=1)
    async with open_aio_loop(), _accepting(2) as servers:
        for transport in servers:
            lingering.close(transport)
        assert len(lingering) == 1  # the second was aborted at once
        await _until_empty(lingering)  # a silent client is dropped after `seconds`


async def test_abort_all_drops_what_lingers() -> None:
    lingering = Lingering(seconds=60)
    async with open_aio_loop(), _accepting(1) as servers:
        lingering.close(servers[0])
        assert len(lingering) == 1
        lingering.abort_all()
        await _until_empty(lingering)
