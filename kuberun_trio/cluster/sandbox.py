"""Pod sandboxes: the real processes behind the embedded cluster's pods.

Theory of operation
-------------------
A pod is one :class:`PodSandbox`. Where Linux namespaces are permitted (root,
checked once with :func:`namespaces_supported`), creating it starts::

    unshare --pid --fork --mount --uts --ipc --mount-proc --kill-child -- sh -c INIT NAME

whose forked child is the sandbox *init*: PID 1 of a fresh PID namespace, with
its own mount (a fresh ``/proc``), UTS (hostname = pod name) and IPC
namespaces. The init is a few lines of ``sh`` that reap orphans forever, like
the ``pause`` container. Containers and execs enter it with ``nsenter --target
<init> --pid --mount --uts --ipc``; nsenter forks the real process inside and
stays outside as its waiting parent, passing its exit status (or signal) on.
Destroying the pod SIGKILLs the init; the kernel then kills every process of
the PID namespace, and :meth:`PodSandbox.destroy` waits and checks ``/proc``
until no process of that namespace is left. The init's stdin is a *lifeline*
pipe whose write end only this process holds: if the owner dies without
cleaning up (even SIGKILL), the init sees EOF and takes the pod down with it.

Without namespaces (not root, or ``namespaces=False``) each process becomes the
leader of its own session and process group instead, and destroy is a
``killpg`` of every group the sandbox started. Processes that leave their group
(``setsid``) escape that fallback; a warning says so.

Every process is started through a tiny Python helper (``_HELPER``, run with
``python -I -S``) that becomes a session leader, takes the pty as controlling
terminal when there is one, restores default signal dispositions, ``chroot``s to
the container's root if its image maps to one, ``chdir``s to the working
directory and ``execvp``s the command. The sandbox resolves the executable and
the working directory *before* spawning, so a missing one is a
:class:`ContainerStartError` / :class:`ExecStartError` with containerd's wording
rather than an exit code.

Streams are trio ``FdStream``\\ s over pipes or the pty master: the kernel's
pipe/pty buffers are the only buffering, so a slow reader blocks a fast writer.
With a tty, output is merged into ``stdout`` (``stderr`` is None), the pty's
EIO at the end is reported as EOF, and closing ``stdin`` sends the terminal's
VEOF character (twice if the last byte sent was not a newline, so a pending
partial line is flushed first) -- the usual way to say EOF through a terminal.
:meth:`SandboxProcess.wait` returns the exit code, or ``128 + N`` when the
process was killed by signal N (containerd's convention); ``.signal`` keeps N.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import trio

from ..errors import ClusterError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH of a process whose environment has none (containerd's default)."""

_UNSHARE_FLAGS = ("--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc", "--kill-child")
_NSENTER_FLAGS = ("--pid", "--mount", "--uts", "--ipc")

_INIT = (
    'echo "$0" > /proc/sys/kernel/hostname || exit 1; '
    "trap 'exit 0' TERM; exec 3<&0; "
    "(while read -r _; do :; done <&3; kill -TERM 1) & "
    "echo ready; exec 3<&- </dev/null >/dev/null 2>&1; "
    "while :; do sleep 2147483647 & wait; done"
)
"""The pod's PID 1: sets the hostname, reaps orphans, and ends the pod when its stdin
(the *lifeline* pipe, whose write end only the creating process holds) reaches EOF --
so a sandbox cannot outlive a crashed or SIGKILLed owner."""

_HELPER = r"""
import os, signal, sys
tty, root, cwd, argv = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4:]
for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
    signal.signal(s, signal.SIG_DFL)
try:
    os.setsid()
except OSError:
    pass
if tty:
    import fcntl, termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
try:
    if root:
        os.chroot(root)
    os.chdir(cwd)
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"exec: {argv[0]!r}: {e.strerror}\n")
    os._exit(127 if e.errno == 2 else 126)
"""


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


_ns_support: bool | None = None
_P = TypeVar("_P", bound="SandboxProcess")


async def namespaces_supported() -> bool:
    """Whether ``unshare``/``nsenter`` namespaces work here (tried once, then cached)."""
    global _ns_support
    if _ns_support is None:
        unshare = shutil.which("unshare")
        if unshare is None or shutil.which("nsenter") is None:
            _ns_support = False
        else:
            result = await trio.run_process(
                [unshare, *_UNSHARE_FLAGS, "--", "true"],
                check=False,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
            )
            _ns_support = result.returncode == 0
        if not _ns_support:
            log.warning(
                "Linux namespaces are not permitted here: pod sandboxes fall back to "
                "process groups (no PID/mount/UTS/IPC isolation, the hostname is the host's)"
            )
    return _ns_support


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
            if self._pidfd is not None and _parent_pid(pid) not in (process.pid, os.getpid()):
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


class PodSandbox:
    """One pod: a set of namespaces (or process groups) holding its processes."""

    def __init__(
        self,
        name: str,
        *,
        namespaces: bool,
        init: trio.Process,
        pid: int,
        image_roots: Mapping[str, str],
    ) -> None:
        self.name = name
        self.namespaces = namespaces
        self.pid = pid
        """Host PID of the sandbox init (PID 1 of the pod's PID namespace)."""
        self.pid_namespace = os.readlink(f"/proc/{pid}/ns/pid") if namespaces else None
        """``pid:[inode]`` of the pod's PID namespace (None in fallback mode)."""
        self._init = init
        self._init_pidfd = os.pidfd_open(pid)
        self._lifeline: int | None = None
        self._image_roots = dict(image_roots)
        self._procs: set[SandboxProcess] = set()
        self._groups: set[int] = {pid}
        self._destroyed = False
        self._destroy_done = trio.Event()
        self._nsenter = shutil.which("nsenter") or "nsenter"

    @classmethod
    async def create(
        cls,
        name: str,
        *,
        namespaces: bool | None = None,
        image_roots: Mapping[str, str] | None = None,
    ) -> PodSandbox:
        """Start the sandbox of pod ``name``.

        ``namespaces``: None detects (:func:`namespaces_supported`), False forces the
        process-group fallback. ``image_roots`` maps image globs to root directories.
        """
        if namespaces is None:
            namespaces = await namespaces_supported()
        elif not namespaces:
            log.warning("pod %s: namespaces disabled, sandbox uses process groups only", name)
        lifeline: int | None = None
        if namespaces:
            init, pid, lifeline = await _start_ns_init(name)
        else:
            init = await trio.lowlevel.open_process(
                ["sleep", "infinity"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            pid = init.pid
        box = cls(name, namespaces=namespaces, init=init, pid=pid, image_roots=image_roots or {})
        box._lifeline = lifeline
        return box

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def root_for(self, image: str) -> str | None:
        """The root directory of ``image`` (None: the host's file system)."""
        for pattern, root in self._image_roots.items():
            if fnmatch.fnmatchcase(image, pattern):
                return root
        return None

    def process_env(self, env: Mapping[str, str], *, tty: bool = False) -> dict[str, str]:
        """``env`` plus the defaults every process gets: PATH, HOSTNAME (and TERM with a tty)."""
        full = dict(env)
        full.setdefault("PATH", DEFAULT_PATH)
        full.setdefault("HOSTNAME", self.name)
        if tty:
            full.setdefault("TERM", "xterm")
        return full

    async def start_container(
        self, spec: Mapping[str, Any], env: Mapping[str, str]
    ) -> ContainerProcess:
        """Start a container's main process from its (already expanded) spec.

        ``command`` replaces the entrypoint, ``args`` the cmd; host "images" have
        neither, so a spec with neither is a ``CreateContainerError``. ``stdin`` /
        ``tty`` in the spec give the process a stdin pipe / a pty.
        """
        argv = [str(a) for a in (*(spec.get("command") or ()), *(spec.get("args") or ()))]
        cid = secrets.token_hex(32)
        if not argv:
            raise ContainerStartError(
                "CreateContainerError",
                f'failed to generate container "{cid}" spec: failed to generate spec: '
                "no command specified",
            )
        root = self.root_for(str(spec.get("image", "")))
        cwd = spec.get("workingDir") or "/"
        tty = bool(spec.get("tty"))
        full_env = self.process_env(env, tty=tty)
        problem = _check_exec(argv[0], full_env["PATH"], root, cwd)
        if problem is not None:
            raise ContainerStartError(
                "StartError",
                "failed to create containerd task: failed to create shim task: OCI runtime "
                "create failed: runc create failed: unable to start container process: "
                f"error during container init: {problem}: unknown",
            )
        proc = await self._spawn(
            ContainerProcess,
            argv,
            env=full_env,
            cwd=cwd,
            root=root,
            tty=tty,
            stdin=bool(spec.get("stdin")),
            stdout=True,
            stderr=True,
        )
        proc.name = str(spec.get("name", ""))
        return proc

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        root: str | None = None,
    ) -> ExecProcess:
        """Run ``argv`` (no shell) in the pod; HOSTNAME (pod name) and PATH are defaulted.

        With ``tty`` the process gets a pty: ``stdout`` is the merged output and is
        always provided (drain it), ``stderr`` is None. Without: pipes for the
        requested streams, /dev/null for the others.
        """
        if not argv:
            raise ExecStartError("failed to exec in container: no command specified")
        full_env = self.process_env(env, tty=tty)
        cwd = cwd or "/"
        problem = _check_exec(argv[0], full_env["PATH"], root, cwd)
        if problem is not None:
            raise ExecStartError(
                f'failed to exec in container: failed to start exec "{secrets.token_hex(32)}": '
                "OCI runtime exec failed: exec failed: unable to start container process: "
                f"{problem}: unknown"
            )
        return await self._spawn(
            ExecProcess,
            argv,
            env=full_env,
            cwd=cwd,
            root=root,
            tty=tty,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )

    async def _spawn(
        self,
        kind: type[_P],
        argv: Sequence[str],
        *,
        env: dict[str, str],
        cwd: str,
        root: str | None,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> _P:
        if self._destroyed:
            raise SandboxError(f"pod sandbox {self.name} is destroyed")
        helper = [sys.executable, "-I", "-S", "-c", _HELPER, "1" if tty else "0", root or "", cwd]
        command = [*helper, *argv]
        if self.namespaces:
            command = [self._nsenter, f"--target={self.pid}", *_NSENTER_FLAGS, "--", *command]
        master: trio.lowlevel.FdStream | None = None
        fds: tuple[int, int, int]
        if tty:
            master_fd, slave = os.openpty()
            master = trio.lowlevel.FdStream(master_fd)
            fds = (slave, slave, slave)
        else:
            pipe, null = subprocess.PIPE, subprocess.DEVNULL
            fds = (pipe if stdin else null, pipe if stdout else null, pipe if stderr else null)
        try:
            process = await trio.lowlevel.open_process(
                command,
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                env=env,
                start_new_session=not self.namespaces,
            )
        except BaseException:
            if master is not None:
                master.close()
            raise
        finally:
            if tty:
                os.close(fds[0])
        pid = await _inner_pid(process) if self.namespaces else process.pid
        proc = kind(process, pid, master=master, sandbox=self)
        self._procs.add(proc)
        if not self.namespaces:
            self._groups.add(process.pid)
        if self._destroyed:  # destroyed while we were spawning
            await proc.aclose()
            raise SandboxError(f"pod sandbox {self.name} is destroyed")
        return proc

    def _forget(self, proc: SandboxProcess) -> None:
        self._procs.discard(proc)

    def remaining_pids(self) -> list[int]:
        """Host PIDs of processes that still belong to this pod, read from /proc."""
        if self.pid_namespace is not None:
            return _scan_proc(lambda pid: _readlink(f"/proc/{pid}/ns/pid") == self.pid_namespace)
        return _scan_proc(lambda pid: _process_group(pid) in self._groups)

    async def destroy(self) -> None:
        """Kill every process of the pod, reap them and close all fds (idempotent)."""
        if self._destroyed:
            await self._destroy_done.wait()
            return
        self._destroyed = True
        try:
            with trio.CancelScope(shield=True):
                await self._destroy()
        finally:
            self._destroy_done.set()

    async def _destroy(self) -> None:
        procs = list(self._procs)
        for proc in procs:  # first, so that closing a pty cannot make it a SIGHUP death
            proc.kill_group()
        if self.namespaces:
            with contextlib.suppress(OSError):  # it may be gone already (lifeline)
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
        else:
            for group in self._groups:
                with contextlib.suppress(OSError):
                    os.killpg(group, signal.SIGKILL)
        for proc in procs:
            await proc.aclose()
        await self._init.wait()
        os.close(self._init_pidfd)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        with trio.move_on_after(5):
            while left := self.remaining_pids():
                for pid in left:  # fallback mode: stragglers that changed groups late
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                await trio.sleep(0.005)
        if left := self.remaining_pids():
            log.error("pod %s: processes survived the sandbox: %s", self.name, left)

    def __repr__(self) -> str:
        mode = "namespaces" if self.namespaces else "process-groups"
        state = "destroyed" if self._destroyed else f"{len(self._procs)} processes"
        return f"<PodSandbox {self.name} pid={self.pid} {mode} {state}>"


class ContainerSandbox:
    """The pod sandbox as one container sees it.

    :meth:`exec` runs with the container's root directory, and :meth:`close` (the
    kubelet calls it when the container's main process ends) kills the execs still
    running in it and refuses new ones, as a real runtime does.
    """

    def __init__(self, pod: PodSandbox, root: str | None) -> None:
        self.pod = pod
        self.root = root
        self._execs: set[ExecProcess] = set()
        self._closed = False

    @property
    def pid(self) -> int:
        return self.pod.pid

    @property
    def name(self) -> str:
        return self.pod.name

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> ExecProcess:
        """:meth:`PodSandbox.exec` with this container's root; ends when the container ends."""
        if self._closed:
            raise ExecStartError("container is in CONTAINER_EXITED state")
        proc = await self.pod.exec(
            argv,
            env=env,
            cwd=cwd,
            tty=tty,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            root=self.root,
        )
        self._execs = {p for p in self._execs if p.running}
        self._execs.add(proc)
        if self._closed:
            proc.kill_group()
        return proc

    def close(self) -> None:
        """The container ended: SIGKILL its execs (and their process groups)."""
        self._closed = True
        for proc in self._execs:
            proc.kill_group()
        self._execs.clear()

    def __repr__(self) -> str:
        return f"<ContainerSandbox of {self.pod!r} root={self.root}>"


async def _start_ns_init(name: str) -> tuple[trio.Process, int, int]:
    """Start unshare + init; returns (unshare process, init PID, lifeline write fd)."""
    hostname = name[:63].rstrip("-.") or "pod"
    unshare = shutil.which("unshare") or "unshare"
    lifeline_read, lifeline = os.pipe()  # both non-inheritable; stdin gets a dup
    try:
        init = await trio.lowlevel.open_process(
            [unshare, *_UNSHARE_FLAGS, "--", "/bin/sh", "-c", _INIT, hostname],
            stdin=lifeline_read,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(lifeline_read)
    assert init.stdout is not None and init.stderr is not None
    ready, ok = b"", False
    try:
        with trio.move_on_after(10):
            while b"\n" not in ready and (chunk := await init.stdout.receive_some(64)):
                ready += chunk
        if ready == b"ready\n":
            pid = await _inner_pid(init)
            if pid is not None:
                ok = True
                return init, pid, lifeline
        init.kill()
        err = b""
        with trio.move_on_after(1):
            while chunk := await init.stderr.receive_some():
                err += chunk
        raise SandboxError(f"cannot create sandbox for {name}: {err.decode(errors='replace')}")
    finally:
        with trio.CancelScope(shield=True):
            await init.stdout.aclose()
            await init.stderr.aclose()
            if not ok:  # failed or cancelled (maybe before the child armed --kill-child):
                os.close(lifeline)  # the init ends itself on lifeline EOF, if it got that far
                for child in _children(init.pid):
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)
                init.kill()
                await init.wait()


async def _inner_pid(outer: trio.Process) -> int | None:
    """The PID of the one child that ``unshare``/``nsenter`` forks (None if it is gone).

    Shielded: it takes a millisecond or so, and giving up half-way would leak the child.
    """
    delay = 0.0002
    with trio.CancelScope(shield=True):
        while True:
            children = _children(outer.pid)
            if children:
                return children[0]
            if outer.poll() is not None:
                return None
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)
    return None  # not reached: the shielded loop only ends by returning


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _stat_fields(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _scan_proc(match: Any) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and match(int(entry)):
            pids.append(int(entry))
    return pids


def _check_exec(name: str, path: str, root: str | None, cwd: str) -> str | None:
    """runc's complaint about running ``name`` in ``cwd`` under ``root``, or None if fine."""

    def host(p: str) -> str:
        return os.path.join(root, p.lstrip("/")) if root else p

    if not os.path.isdir(host(cwd)):
        return f'chdir to cwd ("{cwd}") set in config.json failed: no such file or directory'

    def runnable(p: str) -> bool:
        real = host(p if os.path.isabs(p) else os.path.join(cwd, p))
        if os.path.islink(real):
            return True  # may point inside the root: let the helper decide
        return os.path.isfile(real) and os.access(real, os.X_OK)

    if "/" in name:
        return None if runnable(name) else f'exec: "{name}": stat {name}: no such file or directory'
    for directory in path.split(":"):
        if runnable(os.path.join(directory or ".", name)):
            return None
    return f'exec: "{name}": executable file not found in $PATH'
