"""Container output for ``kubectl logs``: bounded per-instance buffers and their readers.

Theory of operation
-------------------
The kubelet pumps each container instance's stdout and stderr into one
:class:`LogBuffer` (keyed by containerID). A buffer keeps at most ``limit``
bytes -- whole chunks, oldest first, go -- and wakes its followers on every
append and on close (the instance ended). :meth:`LogBuffer.read` returns a
plain async iterator (safe to abandon: nothing to finalize) over what is kept,
which with ``follow`` goes on with new output until the buffer closes.

:func:`select_log` is the kubelet's ``validateContainerLogStatus``: the
current instance once it has started, else the previous one; ``previous=true``
needs a terminated previous instance; a container that never started is a 400
``is waiting to start`` with the waiting reason in the kubelet's words.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from . import status as api_status


class LogBuffer:
    """The output of one container instance: bounded (oldest bytes go), followable."""

    def __init__(self, limit: int = 10 * 1024 * 1024) -> None:
        self._chunks: deque[bytes] = deque()
        self._start = 0
        self._end = 0
        self._limit = limit
        self._changed = trio.Event()
        self.closed = False

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._end += len(data)
        while self._end - self._start > self._limit and len(self._chunks) > 1:
            self._start += len(self._chunks.popleft())
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _since(self, pos: int) -> bytes:
        offset, parts = self._start, []
        for chunk in self._chunks:
            if offset + len(chunk) > pos:
                parts.append(chunk[max(0, pos - offset) :])
            offset += len(chunk)
        return b"".join(parts)

    def read(self, *, follow: bool) -> _LogReader:
        """Everything kept so far; with ``follow``, then new output until the instance ends."""
        return _LogReader(self, follow)


class _LogReader:
    """An async iterator over a :class:`LogBuffer` (a plain class: safe to abandon)."""

    def __init__(self, buffer: LogBuffer, follow: bool) -> None:
        self._buffer, self._follow = buffer, follow
        self._pos = buffer._start

    def __aiter__(self) -> _LogReader:
        return self

    async def __anext__(self) -> bytes:
        buffer = self._buffer
        while True:
            self._pos = max(self._pos, buffer._start)
            data = buffer._since(self._pos)
            if data:
                self._pos += len(data)
                await trio.lowlevel.checkpoint()
                return data
            if not self._follow or buffer.closed:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await buffer._changed.wait()


def select_log(
    logs: Mapping[str, LogBuffer],
    *,
    pod: str,
    name: str,
    state: dict[str, Any],
    last_state: dict[str, Any],
    container_id: str,
    previous: bool,
) -> LogBuffer:
    """The kubelet's ``validateContainerLogStatus`` choice of instance (400 if none)."""
    last = last_state.get("terminated") or {}
    if previous:
        if not last.get("containerID") or last["containerID"] not in logs:
            raise api_status.bad_request(
                f'previous terminated container "{name}" in pod "{pod}" not found'
            )
        return logs[last["containerID"]]
    if "running" in state or "terminated" in state:
        return logs[container_id]
    if last.get("containerID") in logs:
        return logs[last["containerID"]]
    reason = state.get("waiting", {}).get("reason", "ContainerCreating")
    reason = {
        "ErrImagePull": "image can't be pulled",
        "ImagePullBackOff": "trying and failing to pull image",
    }.get(reason, reason)
    raise api_status.bad_request(f'container "{name}" in pod "{pod}" is waiting to start: {reason}')
