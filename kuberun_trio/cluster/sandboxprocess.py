"""The processes of a pod sandbox: pty streams, waiting, signals, and the sandbox errors.

Theory of operation
-------------------
A :class:`SandboxProcess` wraps the ``trio.Process`` that :class:`~.sandbox.PodSandbox`
spawned (in namespace mode that is the ``nsenter`` in front of the real process; ``pid``
is the real one, held through a pidfd so that signals never hit a reused PID).
:class:`ContainerProcess` is a container's main process, :class:`ExecProcess` an exec.

Streams are trio ``FdStream``\\ s over pipes or the pty master: the kernel's
pipe/pty buffers are the only buffering, so a slow reader blocks a fast writer.
With a tty, output is merged into ``stdout`` (``stderr`` is None), the pty's
EIO at the end is reported as EOF, and closing ``stdin`` sends the terminal's
VEOF character (twice if the last byte sent was not a newline, so a pending
partial line is flushed first) -- the usual way to say EOF through a terminal.
:meth:`SandboxProcess.wait` returns the exit code, or ``128 + N`` when the
process was killed by signal N (containerd's convention); ``.signal`` keeps N.
:meth:`SandboxProcess.aclose` reaps the process and tells its sandbox to forget it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import termios
from typing import TYPE_CHECKING

import trio

from ..errors import ClusterError
from .proctools import parent_pid

if TYPE_CHECKING:
    from .sandbox import PodSandbox


class SandboxError(ClusterError):
    """A sandbox could not be created or used."""


class ContainerStartError(SandboxError):
    """A container could not be started; ``reason`` is the kubelet's (e.g. ``StartError``)."""

    def __init__(self, reason: str, message: str, exit_code: int = 128) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.exit_code = exit_code


class ExecStartError(SandboxError):
    """An exec could not be started; ``message`` is containerd's error text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message



class _PtyStdin(trio.abc.SendStream):
    """Writes to the pty master; ``aclose()`` sends VEOF instead of closing it."""

    def __init__(self, master: trio.lowlevel.FdStream) -> None:
        self._master = master
        self._closed = False
        self._at_line_start = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stdin was closed")
        await self._master.send_all(data)
        if len(data):
            self._at_line_start = bytes(data[-1:]) in (b"\n", b"\r")

    async def wait_send_all_might_not_block(self) -> None:
        await self._master.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            veof = bytes([termios.tcgetattr(self._master.fileno())[6][termios.VEOF][0]])
            await self._master.send_all(veof if self._at_line_start else veof * 2)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.lowlevel.checkpoint()


class _PtyStdout(trio.abc.ReceiveStream):
    """Reads the pty master; the EIO after the last slave fd closed is EOF."""

    def __init__(self, master: trio.lowlevel.FdStream) -> None:
        self._master = master

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self._master.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EIO:
                return b""
            raise

    async def aclose(self) -> None:
        await self._master.aclose()


class SandboxProcess:
    """A process running in a sandbox (a container's main process or an exec)."""

    def __init__(
        self,
        process: trio.Process,
        pid: int | None,
        *,
        master: trio.lowlevel.FdStream | None,
        sandbox: PodSandbox,
    ) -> None:
        self._process = process
        self._sandbox = sandbox
        self.pid: int = pid if pid is not None else process.pid
        """Host PID of the process itself (not of the nsenter in front of it)."""
        self._pidfd: int | None = None
        if pid is not None:
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:
                self._pidfd = None
            if self._pidfd is not None and parent_pid(pid) not in (process.pid, os.getpid()):
                os.close(self._pidfd)  # gone and its number reused
                self._pidfd = None
        self._master = master
        self.stdin: trio.abc.SendStream | None
        self.stdout: trio.abc.ReceiveStream | None
        self.stderr: trio.abc.ReceiveStream | None
        if master is not None:
            self.stdin, self.stdout, self.stderr = _PtyStdin(master), _PtyStdout(master), None
        else:
            self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr
        self.tty = master is not None
        self.exit_code: int | None = None
        """Set by :meth:`wait`: the exit code, 128+N for signal N."""
        self.signal: int | None = None
        """Set by :meth:`wait`: the signal that killed the process, if one did."""

    @property
    def running(self) -> bool:
        return self._process.returncode is None

    def resize(self, width: int, height: int) -> None:
        """Set the pty's window size (the process group gets SIGWINCH); no-op without a tty."""
        if self._master is None:
            return
        try:
            size = struct.pack("HHHH", height, width, 0, 0)
            fcntl.ioctl(self._master.fileno(), termios.TIOCSWINSZ, size)
        except (OSError, ValueError):
            pass  # already closed

    async def wait(self) -> int:
        """Wait for the exit; the exit code, or 128+N if killed by signal N."""
        rc = await self._process.wait()
        if rc < 0:
            self.signal, self.exit_code = -rc, 128 - rc
        else:
            self.exit_code = rc
        return self.exit_code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process (idempotent; nothing happens once it is gone)."""
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and every process still in its process group."""
        self.kill(sig)
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, sig)

    def close_streams(self) -> None:
        """Close our ends of the pipes / the pty master."""
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if isinstance(stream, trio.lowlevel.FdStream):
                stream.close()
        if self._master is not None:
            self._master.close()

    async def aclose(self) -> None:
        """Close the streams, SIGKILL the process group if still running, and reap it."""
        self.close_streams()
        if self.running:
            self.kill_group()
        with trio.CancelScope(shield=True):
            await self.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._sandbox._forget(self)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.exit_code}"
        return f"<{type(self).__name__} pid={self.pid} {state}{' tty' if self.tty else ''}>"


class ContainerProcess(SandboxProcess):
    """The main process of a container; ``name`` is the container's name."""

    name: str = ""


class ExecProcess(SandboxProcess):
    """A process started by :meth:`PodSandbox.exec`."""
