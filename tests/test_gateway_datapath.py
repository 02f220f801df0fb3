"""Backpressure through the gateway, both ways, with bounded memory.

The rig runs the cluster, the gateway and the asyncssh client in this one
process, so the RSS measured here is an upper bound for the gateway's own.
Pod → client: 1 GiB from ``head -c`` to a client that stops reading after a few
MiB; the pod's writer must stall (its ``wchar`` in ``/proc/PID/io`` stops
moving) and memory must stay flat, then the whole GiB must arrive once the
client reads again. Client → pod: the pod does not read its stdin for a while;
the client's ``drain()`` must block after a bounded number of bytes, and every
byte must arrive once the pod reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import psutil
import pytest
import trio
import trio_asyncio
from gatewaykit import open_rig

T = TypeVar("T")
GiB = 1024**3
MiB = 1024**2
MEMORY_BUDGET = 64 * MiB
"""How much the process may grow while a GiB is held up or streamed."""


async def aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@contextlib.asynccontextmanager
async def peak_rss() -> AsyncIterator[list[int]]:
    """Sample this process's RSS every 20 ms; yields [peak] (updated live)."""
    peak = [rss()]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss())
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        yield peak
        nursery.cancel_scope.cancel()


async def settled(read: Callable[[], int], *, quiet: float = 1.0, within: float = 30) -> int:
    """The value of a growing counter once it stops moving for ``quiet`` seconds.

    A bounded pipeline stalls: the counter (bytes written, bytes fed) stops.
    Polling for that state rather than sleeping a fixed time keeps a loaded
    machine from failing the test; an unbounded one never settles and fails
    after ``within`` seconds (the counter keeps moving until a GiB is through).
    """
    with trio.fail_after(within):
        value, since = read(), trio.current_time()
        while trio.current_time() - since < quiet:
            await trio.sleep(0.05)
            now = read()
            if now != value:
                value, since = now, trio.current_time()
        return value


def find_process(argv: list[str]) -> psutil.Process:
    """This test's pod process running ``argv`` (a descendant of this process: other test
    runs on the machine may run the same command)."""
    matches = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.cmdline() == argv:
                matches.append(p)
    assert len(matches) == 1, matches
    return matches[0]


def io_counter(proc: psutil.Process, field: str) -> int:
    for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value)
    raise AssertionError(f"no {field} in /proc/{proc.pid}/io")


class StallingSession(asyncssh.SSHClientSession[bytes]):
    """Counts stdout; stops reading once ``stall_after`` bytes arrived."""

    def __init__(self, stall_after: int) -> None:
        self.received = 0
        self.stall_after = stall_after
        self.stalled = asyncio.Event()
        self.closed = asyncio.Event()
        self.exit_status: int | None = None
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.received += len(data)
        if self.received >= self.stall_after and not self.stalled.is_set():
            assert self.chan is not None
            self.chan.pause_reading()
            self.stalled.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


@pytest.mark.slow
async def test_slow_client_slows_the_pod_with_bounded_memory(tmp_path: Path) -> None:
    argv = ["head", "-c", str(GiB), "/dev/zero"]
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        before = rss()

        async def start() -> StallingSession:
            _, session = await conn.create_session(
                lambda: StallingSession(8 * MiB), " ".join(argv), encoding=None)
            await session.stalled.wait()
            return session

        async with peak_rss() as peak:
            with trio.fail_after(20):
                session = await aio(start)
            writer = find_process(argv)
            # every buffer on the way fills up, then the pod's writer blocks
            written = await settled(lambda: io_counter(writer, "wchar"))
            assert written < 8 * MiB + MEMORY_BUDGET
            assert peak[0] - before < MEMORY_BUDGET

            assert session.chan is not None
            session.chan.resume_reading()
            with trio.fail_after(240):  # a hang guard for a loaded machine, not a speed check
                await aio(session.closed.wait)
        assert (session.received, session.exit_status) == (GiB, 0)
        assert peak[0] - before < MEMORY_BUDGET, f"grew by {(peak[0] - before) / MiB:.0f} MiB"
        conn.close()
        await aio(conn.wait_closed)


@pytest.mark.slow
async def test_slow_pod_slows_the_client_with_bounded_memory(tmp_path: Path) -> None:
    total = 512 * MiB
    chunk = os.urandom(256 * 1024)
    gate = tmp_path / "gate"
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()
        before = rss()
        progress = [0]

        async def start() -> asyncssh.SSHClientProcess[bytes]:
            # The pod does not read stdin until the gate file exists.
            return await conn.create_process(
                f"while [ ! -e {gate} ]; do sleep 0.05; done; exec wc -c", encoding=None)

        async def feed(process: asyncssh.SSHClientProcess[bytes]) -> None:
            while progress[0] < total:
                process.stdin.write(chunk)
                await process.stdin.drain()
                progress[0] += len(chunk)
            process.stdin.write_eof()

        async def finish(process: asyncssh.SSHClientProcess[bytes]) -> tuple[bytes, int | None]:
            out = await process.stdout.read()
            await process.wait()
            return out, process.exit_status

        async with peak_rss() as peak, trio.open_nursery() as nursery:
            with trio.fail_after(20):
                process = await aio(start)
            nursery.start_soon(aio, feed, process)
            stuck = await settled(lambda: progress[0])  # the client's drain() blocks
            assert stuck < MEMORY_BUDGET
            assert peak[0] - before < MEMORY_BUDGET
            gate.touch()
            with trio.fail_after(240):  # a hang guard for a loaded machine, not a speed check
                out, status = await aio(finish, process)
        assert (out.strip(), status) == (str(total).encode(), 0)
        assert peak[0] - before < MEMORY_BUDGET, f"grew by {(peak[0] - before) / MiB:.0f} MiB"
        conn.close()
        await aio(conn.wait_closed)
