"""``aio/execstream.py`` on its own: status parsing, writer failure, the close bound, framing.

A scripted stand-in for aiohttp's ``ClientWebSocketResponse`` (the few members
:class:`ExecStream` uses) runs on a plain asyncio loop (``asyncio.run`` inside
a synchronous test), so each failure path is driven on purpose rather than
hoped for from a real server.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import pytest

from kuberun_trio.aio import execstream
from kuberun_trio.aio.execstream import MAX_FRAME, ExecResult, ExecStream, parse_status
from kuberun_trio.errors import ExecError


class ScriptedWebSocket:
    """Yields the messages the test pushes; records what the stream sends."""

    def __init__(self, *, send_fails: bool = False, close_hangs: bool = False) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.sent_changed = asyncio.Event()
        self.send_fails = send_fails
        self.close_hangs = close_hangs
        self.close_called = False
        self._waiting = False  # aiohttp's flag: a receive() is pending

    def push(self, channel: int, data: bytes) -> None:
        self.inbox.put_nowait(bytes([channel]) + data)

    def end(self) -> None:
        self.inbox.put_nowait(None)

    def __aiter__(self) -> ScriptedWebSocket:
        return self

    async def __anext__(self) -> aiohttp.WSMessage:
        self._waiting = True
        try:
            data = await self.inbox.get()
        finally:
            self._waiting = False
        if data is None:
            raise StopAsyncIteration
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.sleep(0)
        if self.send_fails:
            self.end()  # a broken connection ends the read side too
            raise ConnectionResetError("peer reset")
        self.sent.append(bytes(data))
        self.sent_changed.set()

    async def close(self) -> None:
        self.close_called = True
        if self.close_hangs:
            await asyncio.Event().wait()  # a server that never answers the Close
        self.end()


class Sink:
    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""

    def write_stdout(self, data: bytes) -> None:
        self.stdout += data

    def write_stderr(self, data: bytes) -> None:
        self.stderr += data

    async def wait_writable(self) -> None:
        await asyncio.sleep(0)


def stream(ws: ScriptedWebSocket, protocol: str = execstream.V5) -> ExecStream:
    fake: Any = ws
    return ExecStream(fake, protocol)


# -- the exit status ------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    # channel.k8s.io (v1) and some proxies write a plain-text error instead of a Status
    (b"error: container not found (\"c\")",
     ExecResult(None, "error: container not found (\"c\")", "Error")),
    (b"\xff\xfe not utf-8", ExecResult(None, "\ufffd\ufffd not utf-8", "Error")),
    (b'{"status": "Failure", "reason"', ExecResult(None, '{"status": "Failure", "reason"',
                                                   "Error")),
    # well-formed JSON, malformed exit code: no number is made up
    (json.dumps({"status": "Failure", "reason": "NonZeroExitCode", "message": "m",
                 "details": {"causes": [{"reason": "ExitCode", "message": "seven"}]}}).encode(),
     ExecResult(None, "m", "NonZeroExitCode")),
    (json.dumps({"status": "Failure", "reason": "NonZeroExitCode", "message": "m",
                 "details": {"causes": [{"reason": "ExitCode", "message": "7"}]}}).encode(),
     ExecResult(7, "m", "NonZeroExitCode")),
    (b"", ExecResult(None, "the exec stream ended without an exit status", "StreamEnded")),
])
def test_parse_status_plain_text_and_malformed(raw: bytes, expected: ExecResult) -> None:
    assert parse_status(raw) == expected


def test_output_and_status_through_run() -> None:
    async def main() -> tuple[ExecResult, Sink]:
        ws = ScriptedWebSocket()
        ws.push(1, b"")  # the ready frame: skipped
        ws.push(1, b"out")
        ws.push(2, b"err")
        ws.push(3, b'{"status": "Success"}')
        ws.end()
        sink = Sink()
        return await stream(ws).run(sink), sink

    result, sink = asyncio.run(main())
    assert (result, sink.stdout, sink.stderr) == (ExecResult(0), b"out", b"err")


# -- writer failure -------------------------------------------------------------------------------

def test_a_failing_writer_raises_exec_error() -> None:
    async def main() -> None:
        ws = ScriptedWebSocket(send_fails=True)
        exec_stream = stream(ws)
        exec_stream.send_stdin(b"keystrokes")
        await asyncio.wait_for(exec_stream.run(Sink()), 10)

    with pytest.raises(ExecError, match="writing to the exec stream failed") as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, ConnectionResetError)


# -- the close bound ------------------------------------------------------------------------------

def test_close_handshake_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execstream, "CLOSE_TIMEOUT", 0.2)

    async def main() -> tuple[ExecResult, float, bool]:
        ws = ScriptedWebSocket(close_hangs=True)
        ws.push(3, b'{"status": "Success"}')
        ws.end()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # without the bound, close() never returns and this times out
        result = await asyncio.wait_for(stream(ws).run(Sink()), 20)
        return result, loop.time() - started, ws.close_called

    result, took, closed = asyncio.run(main())
    assert result == ExecResult(0) and closed
    assert took >= 0.2  # it did wait for the Close, up to the bound


def test_cancelled_run_with_a_hanging_close_still_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execstream, "CLOSE_TIMEOUT", 0.2)

    async def main() -> bool:
        ws = ScriptedWebSocket(close_hangs=True)  # and no message ever arrives
        task = asyncio.ensure_future(stream(ws).run(Sink()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        return ws.close_called

    assert asyncio.run(main())


# -- stdin framing -----------------------------------------------------------------------------

def test_queued_stdin_frames_are_joined_in_order_around_control_frames() -> None:
    rng = random.Random(16)
    chunks = [rng.randbytes(rng.randint(1, 40_000)) for _ in range(60)]
    later = [rng.randbytes(rng.randint(1, 5_000)) for _ in range(20)]

    async def main() -> list[bytes]:
        ws = ScriptedWebSocket()
        exec_stream = stream(ws)
        for chunk in chunks:  # all queued before the writer runs: arbitrary chunking
            exec_stream.send_stdin(chunk)
        exec_stream.resize(80, 24)
        for chunk in later:
            exec_stream.send_stdin(chunk)
        exec_stream.close_stdin()
        exec_stream.send_stdin(b"after EOF: dropped")
        task = asyncio.ensure_future(exec_stream.run(Sink()))
        while not ws.sent or ws.sent[-1] != b"\xff\x00":
            ws.sent_changed.clear()
            await asyncio.wait_for(ws.sent_changed.wait(), 10)
        ws.push(3, b'{"status": "Success"}')
        ws.end()
        assert await task == ExecResult(0)
        return ws.sent

    sent = asyncio.run(main())
    resize = b"\x04" + json.dumps({"Width": 80, "Height": 24}).encode()
    cut = sent.index(resize)
    before, after, eof = sent[:cut], sent[cut + 1:-1], sent[-1]
    assert eof == b"\xff\x00"
    for group, payload in ((before, chunks), (after, later)):
        assert all(m[0] == 0 for m in group)
        assert b"".join(m[1:] for m in group) == b"".join(payload)  # every byte, in order
        assert all(len(m) - 1 < MAX_FRAME + 40_000 for m in group)  # bounded messages
    assert len(before) < len(chunks) // 4  # joined: far fewer messages than chunks
    assert len(after) == 1
