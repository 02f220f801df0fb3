"""Pod sandboxes: the real processes behind the embedded cluster's pods.

Theory of operation
-------------------
A pod is one :class:`PodSandbox`. Where Linux namespaces are permitted (root,
checked once with :func:`namespaces_supported`), creating it starts::

    unshare --pid --fork --mount --uts --ipc --mount-proc --kill-child -- sh -c INIT NAME

whose forked child is the sandbox *init*: PID 1 of a fresh PID namespace, with
its own mount (a fresh ``/proc``; with ``private_tmp`` an empty tmpfs on
``/tmp``, as the demo's pods get), UTS (hostname = pod name) and IPC
namespaces. The init is a few lines of ``sh`` that reap orphans forever, like
the ``pause`` container. Containers and execs enter it with ``nsenter --target
<init> --pid --mount --uts --ipc``; nsenter forks the real process inside and
stays outside as its waiting parent, passing its exit status (or signal) on.
Destroying the pod SIGKILLs the init; the kernel then kills every process of
the PID namespace, and :meth:`PodSandbox.destroy` waits and checks ``/proc``
until no process of that namespace is left. The init's stdin is a *lifeline*
pipe whose write end only this process holds: if the owner dies without
cleaning up (even SIGKILL), the init sees EOF and takes the pod down with it.
``unshare`` and every ``nsenter`` start in a session of their own, so a terminal's
Ctrl-C (SIGINT to the owner's process group) reaches only the owner, which then
ends the pods in order; before, it killed every container at once and left the
owner waiting ~2 s on ``unshare`` after its shutdown.

Without namespaces (not root, or ``namespaces=False``) each process becomes the
leader of its own session and process group instead, and destroy is a
``killpg`` of every group the sandbox started. Processes that leave their group
(``setsid``) escape that fallback; a warning says so.

Every process becomes a session leader (runc does the same), takes the pty as
controlling terminal when there is one, runs with default signal dispositions,
``chroot``s to the container's root if its image maps to one and starts in its
working directory. With namespaces and the host's file system that is all
util-linux: ``nsenter --wd`` then ``setsid [--ctty]`` then the command -- about
a millisecond. A tiny Python helper (``_HELPER``, ``python -I -S``, about 14 ms
of interpreter start per process) does the same where util-linux cannot: for
image roots (after nsenter's chroot the host's ``setsid`` is out of reach), in
the process-group fallback, and when this process ignores SIGINT (a background
job of a non-interactive shell): an ignored signal stays ignored across
``exec``, and only the helper can reset it, so Ctrl-C in a pod would otherwise
do nothing. The sandbox resolves the executable and the working directory *before*
spawning, so a missing one is a :class:`ContainerStartError` /
:class:`ExecStartError` with containerd's wording rather than an exit code.

The processes themselves (streams, wait, signals) are
:class:`~.sandboxprocess.SandboxProcess` objects; the ``/proc`` and pre-spawn helpers
live in :mod:`.proctools`. The errors and process classes are re-exported here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import trio

from .proctools import (
    check_exec,
    children,
    descendants,
    inner_pid,
    process_group,
    readlink,
    scan_proc,
)
from .sandboxprocess import ContainerProcess as ContainerProcess
from .sandboxprocess import ContainerStartError as ContainerStartError
from .sandboxprocess import ExecProcess as ExecProcess
from .sandboxprocess import ExecStartError as ExecStartError
from .sandboxprocess import SandboxError as SandboxError
from .sandboxprocess import SandboxProcess as SandboxProcess

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH of a process whose environment has none (containerd's default)."""

_UNSHARE_FLAGS = ("--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc", "--kill-child")
_NSENTER_FLAGS = ("--pid", "--mount", "--uts", "--ipc")

_INIT = (
    'echo "$0" > /proc/sys/kernel/hostname || exit 1; '
    '[ -z "$1" ] || mount -t tmpfs -o mode=1777,nosuid,nodev kuberun-tmp /tmp || exit 1; '
    "trap 'exit 0' TERM; exec 3<&0; "
    "(while read -r _; do :; done <&3; kill -TERM 1) & "
    "echo ready; exec 3<&- </dev/null >/dev/null 2>&1; "
    "while :; do sleep 2147483647 & wait; done"
)
"""The pod's PID 1: sets the hostname, mounts a private ``/tmp`` when its second argument
is non-empty (the mount namespace is the pod's own: the host never sees it), reaps
orphans, and ends the pod when its stdin (the *lifeline* pipe, whose write end only the
creating process holds) reaches EOF -- so a sandbox cannot outlive a crashed or SIGKILLed owner."""

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


_ns_support: bool | None = None
_P = TypeVar("_P", bound="SandboxProcess")


@functools.cache
def _tool(name: str) -> str | None:
    """Where the util-linux program ``name`` is (looked up once per process)."""
    return shutil.which(name)


async def namespaces_supported() -> bool:
    """Whether ``unshare``/``nsenter`` namespaces work here (tried once, then cached)."""
    global _ns_support
    if _ns_support is None:
        unshare = _tool("unshare")
        if unshare is None or _tool("nsenter") is None:
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
        self._enter = [_tool("nsenter") or "nsenter", f"--target={pid}", *_NSENTER_FLAGS]
        """The argv prefix that runs a command in the pod's namespaces."""

    @classmethod
    async def create(
        cls,
        name: str,
        *,
        namespaces: bool | None = None,
        image_roots: Mapping[str, str] | None = None,
        private_tmp: bool = False,
    ) -> PodSandbox:
        """Start the sandbox of pod ``name``.

        ``namespaces``: None detects (:func:`namespaces_supported`), False forces the
        process-group fallback. ``image_roots`` maps image globs to root directories.
        ``private_tmp`` mounts an empty tmpfs on the pod's ``/tmp`` (namespaces only: the
        fallback warns and shares the host's; an image root keeps its own ``/tmp``).
        """
        if namespaces is None:
            namespaces = await namespaces_supported()
        elif not namespaces:
            log.warning("pod %s: namespaces disabled, sandbox uses process groups only", name)
        lifeline: int | None = None
        if namespaces:
            init, pid, lifeline = await _start_ns_init(name, private_tmp)
        else:
            init = await trio.lowlevel.open_process(
                ["sleep", "infinity"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            pid = init.pid
            if private_tmp:
                log.warning("pod %s: no mount namespace, so no private /tmp", name)
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
        problem = check_exec(argv[0], full_env["PATH"], root, cwd)
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
        problem = check_exec(argv[0], full_env["PATH"], root, cwd)
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
        command = self._command(argv, cwd=cwd, root=root, tty=tty)
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
                start_new_session=True,  # a terminal's Ctrl-C is the owner's, not the pod's
            )
        except BaseException:
            if master is not None:
                master.close()
            raise
        finally:
            if tty:
                os.close(fds[0])
        pid = await inner_pid(process) if self.namespaces else process.pid
        proc = kind(process, pid, master=master, sandbox=self)
        self._procs.add(proc)
        if not self.namespaces:
            self._groups.add(process.pid)
        if self._destroyed:  # destroyed while we were spawning
            await proc.aclose()
            raise SandboxError(f"pod sandbox {self.name} is destroyed")
        return proc

    def _command(self, argv: Sequence[str], *, cwd: str, root: str | None,
                 tty: bool) -> list[str]:
        """The host argv that starts ``argv`` in this sandbox (see the module docstring)."""
        setsid = _tool("setsid")
        if self.namespaces and root is None and setsid is not None and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            ctty = ["--ctty"] if tty else []
            return [*self._enter, f"--wd={cwd}", "--", setsid, *ctty, "--", *argv]
        helper = [sys.executable, "-I", "-S", "-c", _HELPER, "1" if tty else "0", root or "", cwd]
        if self.namespaces:
            return [*self._enter, "--", *helper, *argv]
        return [*helper, *argv]

    def _forget(self, proc: SandboxProcess) -> None:
        self._procs.discard(proc)

    def remaining_pids(self, *, exhaustive: bool = False) -> list[int]:
        """Host PIDs of processes that still belong to this pod.

        With namespaces: the process trees below the init and below every process the
        sandbox started (an orphan is re-parented to the init: every process of the PID
        namespace is in one of them), kept if in the pod's PID namespace. ``exhaustive``
        reads every process in /proc instead (what the fallback mode always does); the
        answers agree, the tree walk costs far less with many pods.
        """
        if self.pid_namespace is not None:
            def member(pid: int) -> bool:
                return readlink(f"/proc/{pid}/ns/pid") == self.pid_namespace

            if exhaustive:
                return scan_proc(member)
            roots = [self.pid, *(proc.pid for proc in self._procs)]
            return sorted(pid for pid in descendants(roots) if member(pid))
        return scan_proc(lambda pid: process_group(pid) in self._groups)

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


async def _start_ns_init(name: str, private_tmp: bool = False) -> tuple[trio.Process, int, int]:
    """Start unshare + init; returns (unshare process, init PID, lifeline write fd)."""
    hostname = name[:63].rstrip("-.") or "pod"
    unshare = _tool("unshare") or "unshare"
    lifeline_read, lifeline = os.pipe()  # both non-inheritable; stdin gets a dup
    try:
        init = await trio.lowlevel.open_process(
            [unshare, *_UNSHARE_FLAGS, "--", "/bin/sh", "-c", _INIT, hostname,
             "tmp" if private_tmp else ""],
            stdin=lifeline_read,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C is the owner's, not the pod's
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
            pid = await inner_pid(init)
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
                for child in children(init.pid):
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)
                init.kill()
                await init.wait()

