"""Attach: several clients sharing a container's main process stdio.

Theory of operation
-------------------
:meth:`RunningContainer.attach` (what :mod:`.streaming` gets from
``Kubelet.running_container``) adds an :class:`Attachment` to the container.
The container's output pump hands every chunk to each attachment
(:meth:`Attachment.deliver`, ``(1 | 2, data)``); a slow attacher slows the
pump, as the kubelet's attach does. When the main process exits the
container ends every attachment's output (:meth:`Attachment.end`).

Stdin is shared: writes from different attachers are serialized by the
container's lock, and an attacher's EOF is the process's EOF only with
``stdinOnce`` -- otherwise detaching just stops that attacher's input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from .sandbox import ContainerProcess, ContainerSandbox

if TYPE_CHECKING:
    from .container import Container


class _AttachStdin(trio.abc.SendStream):
    def __init__(self, target: trio.abc.SendStream, lock: trio.Lock, once: bool) -> None:
        self._target, self._lock, self._once = target, lock, once
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("detached")
        async with self._lock:
            await self._target.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._target.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        if self._once:  # stdinOnce: the first attacher's EOF is the container's
            await self._target.aclose()
        else:
            await trio.lowlevel.checkpoint()


class Attachment:
    """One attacher of a container's main process."""

    def __init__(self, container: Container, process: ContainerProcess) -> None:
        self._container, self._process = container, process
        self._send, self.output = trio.open_memory_channel[tuple[int, bytes]](16)
        """``(1 | 2, data)`` from now on; ends when the main process exits."""
        self.stdin: trio.abc.SendStream | None = None
        if process.stdin is not None:
            once = bool(container.spec.get("stdinOnce"))
            self.stdin = _AttachStdin(process.stdin, container.stdin_lock, once)

    def resize(self, width: int, height: int) -> None:
        self._process.resize(width, height)

    async def deliver(self, channel: int, data: bytes) -> None:
        """Hand output to this attacher (waits while its buffer is full)."""
        await self._send.send((channel, data))

    def end(self) -> None:
        """The main process exited: this attacher's output ends."""
        self._send.close()

    async def aclose(self) -> None:
        self._container.attachments.discard(self)
        self.output.close()
        if self.stdin is not None:
            await self.stdin.aclose()
        await trio.lowlevel.checkpoint()


@attrs.frozen
class RunningContainer:
    """A running container, for exec and attach."""

    sandbox: ContainerSandbox
    """Exec runs here (the container's root; execs end when the container ends)."""
    env: dict[str, str]
    """The container's environment (HOSTNAME and PATH included)."""
    working_dir: str | None
    name: str
    process: ContainerProcess
    _container: Container

    async def attach(self) -> Attachment:
        attachment = Attachment(self._container, self.process)
        self._container.attachments.add(attachment)
        await trio.lowlevel.checkpoint()
        return attachment
