"""The trio/asyncio crossing in :mod:`kuberun_trio.aio.bridge`."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

import pytest
import trio
import trio.lowlevel

from kuberun_trio.aio.bridge import open_aio_loop, run_aio, run_trio, translate
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.errors import ExecError, KubernetesError, NotFoundError


async def test_round_trip_both_directions() -> None:
    async def aio_double(x: int) -> int:
        await asyncio.sleep(0)
        return await run_trio(trio_add_one, x) * 2

    async def trio_add_one(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x + 1

    async with open_aio_loop():
        assert await run_aio(aio_double, 20) == 42


async def test_callback_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise AttributeError("pipe transport gone")

    async with open_aio_loop() as loop:
        with caplog.at_level(logging.WARNING, logger="kuberun_trio.aio.bridge"):
            loop.call_soon(broken)
            await trio.sleep(0.05)
    assert "pipe transport gone" in caplog.text


async def test_cancellation_crosses_into_asyncio() -> None:
    cancelled = []

    async def sleeper() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async with open_aio_loop():
        with trio.move_on_after(0.05):
            await run_aio(sleeper)
    assert cancelled == [True]


def test_translate_api_exception() -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    exc = ApiException(status=404, reason="Not Found")
    exc.body = '{"kind":"Status","reason":"NotFound","message":"pods \\"p\\" not found"}'
    ours = translate(exc)
    assert isinstance(ours, NotFoundError)
    assert (ours.status, ours.reason, ours.message) == (404, "NotFound", 'pods "p" not found')
    exc500 = ApiException(status=500, reason="Internal Server Error")
    assert type(translate(exc500)) is KubernetesError


def test_translate_handshake_error() -> None:
    import aiohttp

    err = aiohttp.WSServerHandshakeError(None, (), status=403, message="Invalid response status")  # type: ignore[arg-type]
    ours = translate(err)
    assert isinstance(ours, ExecError) and "403" in str(ours)
    assert translate(ValueError("x")) is None


async def test_run_aio_chains_translated_error() -> None:
    from kubernetes_asyncio.client.exceptions import ApiException

    async def fails() -> None:
        raise ApiException(status=409, reason="Conflict")

    async with open_aio_loop():
        with pytest.raises(KubernetesError) as info:
            await run_aio(fails)
    assert isinstance(info.value.__cause__, ApiException)
    assert info.value.status == 409


async def test_idle_tls_connections_do_not_pin_their_read_buffers(
        cluster: EmbeddedCluster) -> None:
    # asyncio's SSLProtocol zero-fills a 256 KiB read buffer per TLS connection; the
    # gateway holds one TLS connection (its exec WebSocket) per SSH connection, so on a
    # plain loop every idle SSH connection pinned > 256 KiB. A loop from open_aio_loop
    # pages the buffer in lazily: an idle connection costs a few KiB.
    assert cluster.ca_file is not None
    host, port = cluster.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    count = 40

    def rss_kib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)

    async def connect_all() -> tuple[int, list[asyncio.StreamWriter]]:
        writers = []
        before = rss_kib()
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
            writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")  # a small read, as an idle session makes
            writers.append(writer)
        return (rss_kib() - before) // count, writers

    async with open_aio_loop():
        per_connection, writers = await run_aio(connect_all)
        for writer in writers:
            writer.close()
    assert per_connection < 128, f"{per_connection} KiB resident per idle TLS connection"
