"""Recording session channels to asciicast v2 files, off the data path.

Theory of operation
-------------------
One :class:`Recorder` per gateway runs one writer task (:meth:`Recorder.run`, in the
gateway's nursery). Each recorded session channel has a :class:`SessionRecording`,
opened by the connection when the channel's exec starts and closed when it ends.

The data path (the SSH channel callbacks, on trio's thread) only calls
:meth:`SessionRecording.stdout` / :meth:`~SessionRecording.stderr` /
:meth:`~SessionRecording.stdin` / :meth:`~SessionRecording.resize`: one clock read and
one list append per chunk, nothing else -- no encoding, no I/O, no await. The buffer is
bounded (:attr:`RecordingOptions.buffer_bytes` per channel): a chunk that does not fit
is dropped and counted, never waited for, so a slow or full disk cannot slow or block a
session. The writer notes each gap in the file as a marker event (``recording
incomplete: N bytes not recorded``) and logs ``recording-incomplete`` once per channel.
The writer thread also has a CPU budget (:attr:`RecordingOptions.cpu_share`): decoding
and JSON-encoding a flood of binary output costs about as much CPU as relaying it, and
the thread holds the GIL meanwhile; what is left of a batch past the budget is
counted and marked the same way, not written.

The writer wakes every :attr:`RecordingOptions.flush_interval` seconds (sooner when a
buffer is half full), swaps out every channel's pending events on trio's thread, and
hands them to one worker thread that decodes them (UTF-8, incrementally: a character
split across chunks stays whole), writes and flushes the files. A crash loses at most
that interval. Files are ``<directory>/<UTC date>/<connection_id>/<n>-<kind>.cast``,
created with mode 0600 (directories 0700), never overwritten. A file that cannot be
written is logged (``recording-failed``) and given up; the session goes on.

Subsystems (sftp) are binary protocols: only the header and, at the end, a marker with
the byte counts in each direction are written.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import trio

from . import asciicast

log = logging.getLogger(__name__)

Kind = Literal["shell", "exec", "subsystem"]
_Event = tuple[float, str, Any]


@attrs.frozen
class RecordingOptions:
    """Where and what to record (the server's ``audit.*`` keys)."""

    directory: str
    """Root directory of the recordings (``audit.file.directory``)."""
    stdin: bool = False
    """Record client input (``audit.intercept.stdin``; off: typed passwords are input)."""
    stdout: bool = True
    """Record output (``audit.intercept.stdout``)."""
    stderr: bool = True
    """Record the error stream (``audit.intercept.stderr``; with a pty it is stdout)."""
    buffer_bytes: int = 4 * 1024 * 1024
    """Pending bytes per channel before chunks are dropped (the recording is incomplete)."""
    flush_interval: float = 0.5
    """Longest time between two writes (and flushes) of a file."""
    cpu_share: float = 0.1
    """CPU time the writer thread may spend per second (decoding, JSON): beyond it, the
    rest of a batch is not recorded (marked incomplete), so recording a flood of binary
    output cannot take the gateway's CPU (and GIL) from the sessions."""


class SessionRecording:
    """One session channel's recording: the data path appends here (see the module doc)."""

    def __init__(self, recorder: Recorder, path: str, header: str, *, binary: bool,
                 fields: Mapping[str, Any]) -> None:
        options = recorder.options
        self.path = path
        self.fields = dict(fields)
        """Log fields (``connection_id``, ``session_id``, ...)."""
        self.binary = binary
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0
        """Bytes not recorded because the buffer was full (all so far)."""
        self.skipped = 0
        """Bytes not recorded because the writer was over its CPU share (all so far)."""
        self.closed = False
        self.failed = False
        self._recorder = recorder
        self._limit = options.buffer_bytes
        self._in, self._out, self._err = options.stdin, options.stdout, options.stderr
        self._events: list[_Event] = []
        self._pending = 0
        # writer-side state (used only by the writer thread after the first flush)
        self._header: str | None = header
        self._file: Any = None
        self._decoders = {code: codecs.getincrementaldecoder("utf-8")("replace")
                          for code in ("o", "i")}
        self._reported = 0
        self.logged_incomplete = False

    def __repr__(self) -> str:
        return (f"<SessionRecording {self.path} pending={self._pending} dropped={self.dropped}"
                f"{' closed' if self.closed else ''}>")

    # -- the data path: O(1), never blocks -----------------------------------------
    def stdout(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._out and not self.binary:
            self._add("o", data)

    def stderr(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._err and not self.binary:
            self._add("o", data)

    def stdin(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._in and not self.binary:
            self._add("i", data)

    def resize(self, width: int, height: int) -> None:
        if not self.binary:
            self._add("r", f"{width}x{height}")

    def _add(self, code: str, data: Any) -> None:
        if self.closed or self.failed:
            return
        size = len(data)
        if self._pending + size > self._limit:
            self.dropped += size
            self._recorder.wake()
            return
        self._events.append((time.monotonic(), code, data))
        self._pending += size
        if self._pending > self._limit // 2:
            self._recorder.wake()

    def close(self) -> None:
        """The channel ended: the writer writes the rest and closes the file."""
        self.closed = True
        self._recorder.wake()

    # -- the writer ----------------------------------------------------------------
    def take(self) -> tuple[list[_Event], int, bool]:
        """(pending events, bytes dropped since the last take, closed); on trio's thread."""
        events, self._events, self._pending = self._events, [], 0
        dropped, self._reported = self.dropped - self._reported, self.dropped
        return events, dropped, self.closed

    def write(self, events: list[_Event], dropped: int, closing: bool,
              cpu_deadline: float = math.inf) -> None:
        """Append ``events`` to the file (in the writer thread). Events left when the
        thread's CPU time passes ``cpu_deadline`` are counted, not written."""
        if self._file is None:
            if self._header is None:
                return  # failed earlier
            self._file = _create(self.path)
            self._file.write(self._header)
            self._header = None
        lines = []
        skipped = 0
        for at, code, data in events:
            if skipped or time.thread_time() > cpu_deadline:
                skipped += len(data) if code != "r" else 0
                continue
            if code in self._decoders:
                data = self._decoders[code].decode(data)
                if not data:
                    continue
            lines.append(asciicast.event(at - self.started, code, data))
        now = time.monotonic() - self.started
        if skipped:
            for decoder in self._decoders.values():
                decoder.reset()  # a character split at the gap is lost with it
            self.skipped += skipped
        if dropped or skipped:
            lines.append(asciicast.event(now, "m", f"recording incomplete: {dropped + skipped} "
                                         f"bytes not recorded (the recorder did not keep up)"))
        if closing:
            for code, decoder in self._decoders.items():
                if rest := decoder.decode(b"", final=True):
                    lines.append(asciicast.event(now, code, rest))
            if self.binary:
                lines.append(asciicast.event(now, "m", f"subsystem: {self.bytes_in} bytes in, "
                                             f"{self.bytes_out} bytes out (not recorded)"))
        self._file.write("".join(lines))
        self._file.flush()
        if closing:
            self._file.close()

    def abandon(self) -> None:
        """Writing failed: record nothing more (in the writer thread)."""
        self.failed = True
        self._header = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()


def _create(path: str) -> Any:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o600), "w", encoding="utf-8")


class Recorder:
    """Opens recordings and runs the writer (see the module docstring). Trio-flavoured."""

    def __init__(self, options: RecordingOptions) -> None:
        self.options = options
        self._open: list[SessionRecording] = []
        self._wake = trio.Event()
        self._allowance = options.cpu_share  # CPU seconds the writer may use now
        self._last: float | None = None

    def __repr__(self) -> str:
        return f"<Recorder {self.options.directory} open={len(self._open)}>"

    def open(self, *, connection_id: str, number: int, kind: Kind, width: int, height: int,
             env: Mapping[str, str], title: str, fields: Mapping[str, Any]) -> SessionRecording:
        """A new recording for session channel ``number`` of ``connection_id``."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        path = os.path.join(self.options.directory, day, connection_id, f"{number}-{kind}.cast")
        header = asciicast.header(width=width, height=height, timestamp=int(time.time()),
                                  env=env, title=title)
        recording = SessionRecording(self, path, header, binary=kind == "subsystem",
                                     fields=fields)
        self._open.append(recording)
        log.info("recording %s", path, extra={"event": "recording-start", **fields,
                                              "path": path})
        self.wake()
        return recording

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Write recordings until cancelled; then write what is left (bounded)."""
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.options.flush_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.move_on_after(5, shield=True):
                for recording in self._open:
                    recording.closed = True
                await self.flush()

    async def flush(self) -> None:
        """Write every recording's pending events once."""
        batch = [(recording, *recording.take()) for recording in self._open]
        self._open = [r for r, _, _, closing in batch if not closing]
        if batch:
            # a token bucket of CPU seconds: cpu_share per second, at most one second's worth
            share, now = self.options.cpu_share, trio.current_time()
            if self._last is not None:
                self._allowance = min(self._allowance + share * (now - self._last), share)
            self._last = now
            used = await trio.to_thread.run_sync(_write_all, batch, max(self._allowance, 0.0))
            self._allowance -= used
        for recording, _, _, closing in batch:
            if (recording.dropped or recording.skipped) and not recording.logged_incomplete:
                recording.logged_incomplete = True
                log.warning("recording %s is incomplete: the recorder does not keep up",
                            recording.path, extra={"event": "recording-incomplete",
                                                   **recording.fields, "path": recording.path})
            if closing and not recording.failed:
                log.info("recording %s closed", recording.path, extra={
                    "event": "recording-end", **recording.fields, "path": recording.path,
                    "bytes_not_recorded": recording.dropped + recording.skipped})


def _write_all(batch: list[tuple[SessionRecording, list[_Event], int, bool]],
               budget: float = math.inf) -> float:
    """Write every recording's events within ``budget`` CPU seconds; the CPU time used."""
    started = time.thread_time()
    deadline = started + budget
    for recording, events, dropped, closing in batch:
        if recording.failed:
            continue
        try:
            recording.write(events, dropped, closing, deadline)
        except (OSError, ValueError) as exc:
            recording.abandon()
            log.error("cannot write recording %s: %s", recording.path, exc,
                      extra={"event": "recording-failed", **recording.fields,
                             "path": recording.path, "error": str(exc)})
    return time.thread_time() - started
