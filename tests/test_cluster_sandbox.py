"""Pod sandboxes with real processes: namespaces, exec, ptys, exit codes, teardown."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from support import require_namespaces

from kuberun_trio.cluster.sandbox import (
    ContainerSandbox,
    ContainerStartError,
    ExecProcess,
    ExecStartError,
    PodSandbox,
    SandboxProcess,
)

MODES = [pytest.param(True, id="namespaces"), pytest.param(False, id="process-groups")]


@pytest.fixture(params=MODES)
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[PodSandbox]:
    if request.param:
        await require_namespaces()
    box = await PodSandbox.create("pod-a", namespaces=request.param)
    try:
        yield box
    finally:
        await box.destroy()
    assert box.remaining_pids(exhaustive=True) == []


async def read_all(stream: trio.abc.ReceiveStream | None) -> bytes:
    assert stream is not None
    out = b""
    while data := await stream.receive_some():
        out += data
    return out


async def run(
    box: PodSandbox, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> tuple[int, bytes, bytes]:
    proc = await box.exec(
        argv, env=env or {}, cwd=cwd, tty=False, stdin=False, stdout=True, stderr=True
    )
    try:
        async with trio.open_nursery() as nursery:
            results: dict[str, bytes] = {}

            async def collect(name: str, stream: trio.abc.ReceiveStream | None) -> None:
                results[name] = await read_all(stream)

            nursery.start_soon(collect, "out", proc.stdout)
            nursery.start_soon(collect, "err", proc.stderr)
            code = await proc.wait()
    finally:
        await proc.aclose()
    return code, results["out"], results["err"]


async def read_until(stream: trio.abc.ReceiveStream | None, marker: bytes) -> bytes:
    assert stream is not None
    out = b""
    with trio.fail_after(10):
        while marker not in out:
            data = await stream.receive_some()
            assert data, f"EOF before {marker!r}: {out!r}"
            out += data
    return out


async def test_exec_env_hostname_cwd(sandbox: PodSandbox) -> None:
    code, out, err = await run(
        sandbox,
        ["sh", "-c", 'echo "$HOSTNAME|$FOO|$(hostname)|$(pwd)|$PATH"'],
        env={"FOO": "bar baz"},
        cwd="/tmp",
    )
    assert (code, err) == (0, b"")
    hostname_env, foo, hostname, cwd, path = out.decode().strip().split("|")
    assert (hostname_env, foo, cwd) == ("pod-a", "bar baz", "/tmp")
    assert path  # defaulted
    assert hostname == ("pod-a" if sandbox.namespaces else socket.gethostname())


async def test_own_pid_namespace_only_with_namespaces(sandbox: PodSandbox) -> None:
    code, out, _ = await run(sandbox, ["sh", "-c", "echo $$; exec grep NSpid /proc/self/status"])
    assert code == 0
    inner_pid, nspid_line = out.decode().splitlines()
    ids = nspid_line.split()[1:]
    if sandbox.namespaces:
        # /proc is the pod's own: only the pod-local PID is visible, and it is small
        assert ids == [inner_pid]
        assert int(inner_pid) < 100
        assert os.readlink(f"/proc/{sandbox.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    else:
        assert ids == [inner_pid]
        assert os.readlink(f"/proc/{sandbox.pid}/ns/pid") == os.readlink("/proc/self/ns/pid")


async def test_stdout_stderr_separate_and_exit_code(sandbox: PodSandbox) -> None:
    assert await run(sandbox, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == (
        3,
        b"out\n",
        b"err\n",
    )


async def test_signal_exit_codes(sandbox: PodSandbox) -> None:
    proc = await sandbox.exec(
        ["sh", "-c", "kill -TERM $$"],
        env={},
        cwd=None,
        tty=False,
        stdin=False,
        stdout=False,
        stderr=False,
    )
    assert (proc.stdout, proc.stderr, proc.stdin) == (None, None, None)
    assert await proc.wait() == 128 + signal.SIGTERM
    assert proc.signal == signal.SIGTERM
    await proc.aclose()

    proc = await sandbox.exec(
        ["sleep", "100"], env={}, cwd=None, tty=False, stdin=False, stdout=False, stderr=False
    )
    assert proc.running
    proc.kill()
    proc.kill()  # idempotent
    assert await proc.wait() == 137
    assert proc.signal == signal.SIGKILL
    proc.kill()  # after the exit: nothing happens
    proc.kill_group()
    await proc.aclose()
    await proc.aclose()


async def test_stdin_eof_pipe(sandbox: PodSandbox) -> None:
    proc = await sandbox.exec(
        ["sh", "-c", "cat; echo end"],
        env={},
        cwd=None,
        tty=False,
        stdin=True,
        stdout=True,
        stderr=False,
    )
    assert proc.stdin is not None and proc.stderr is None
    await proc.stdin.send_all(b"hello\nwor")
    await proc.stdin.aclose()
    assert await read_all(proc.stdout) == b"hello\nworend\n"
    assert await proc.wait() == 0
    await proc.aclose()


async def test_tty_resize_and_controlling_terminal(sandbox: PodSandbox) -> None:
    script = (
        "trap 'echo \"winch $(stty size)\"; exit 0' WINCH; "
        "exec 3</dev/tty && echo ctty-ok; [ -t 0 ] && echo isatty; echo ready; "
        "while :; do sleep 0.02; done"
    )
    proc = await sandbox.exec(
        ["sh", "-c", script], env={}, cwd=None, tty=True, stdin=True, stdout=True, stderr=True
    )
    assert proc.stderr is None and proc.tty
    out = await read_until(proc.stdout, b"ready")
    assert b"ctty-ok" in out and b"isatty" in out
    proc.resize(132, 50)
    out = await read_until(proc.stdout, b"winch 50 132")
    assert await proc.wait() == 0
    await read_all(proc.stdout)  # drains to EOF: the EIO of a closed pty is EOF, not an error
    await proc.aclose()
    proc.resize(10, 10)  # closed: a no-op


async def test_tty_stdin_eof_and_term(sandbox: PodSandbox) -> None:
    proc = await sandbox.exec(
        ["sh", "-c", 'stty -echo; echo "TERM=$TERM"; cat; echo "[done]"'],
        env={},
        cwd=None,
        tty=True,
        stdin=True,
        stdout=True,
        stderr=False,
    )
    assert proc.stdin is not None
    await read_until(proc.stdout, b"TERM=xterm")
    await proc.stdin.send_all(b"partial line")  # no newline: VEOF is sent twice
    await proc.stdin.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await proc.stdin.send_all(b"more")
    out = await read_all(proc.stdout)
    assert b"partial line[done]" in out
    assert await proc.wait() == 0
    await proc.aclose()


async def test_backpressure_blocks_the_writer(sandbox: PodSandbox) -> None:
    size = 8 * 1024 * 1024
    proc = await sandbox.exec(
        ["sh", "-c", f"head -c {size} /dev/zero; echo done >&2"],
        env={},
        cwd=None,
        tty=False,
        stdin=False,
        stdout=True,
        stderr=True,
    )
    await trio.sleep(0.3)  # nobody reads stdout: the writer must be stuck on the pipe
    assert proc.running
    assert proc.stderr is not None
    with trio.move_on_after(0.05):
        assert await proc.stderr.receive_some() != b"done\n"
    assert len(await read_all(proc.stdout)) == size
    assert await read_all(proc.stderr) == b"done\n"
    assert await proc.wait() == 0
    await proc.aclose()


async def test_missing_executable_and_cwd(sandbox: PodSandbox) -> None:
    with pytest.raises(ExecStartError, match=r'exec: "no-such-cmd": executable file not found'):
        await sandbox.exec(
            ["no-such-cmd"], env={}, cwd=None, tty=False, stdin=False, stdout=True, stderr=True
        )
    with pytest.raises(ExecStartError, match=r"chdir to cwd \(\"/no/such/dir\"\)"):
        await sandbox.exec(
            ["true"], env={}, cwd="/no/such/dir", tty=False, stdin=False, stdout=True, stderr=True
        )
    with pytest.raises(ContainerStartError) as info:
        await sandbox.start_container({"name": "c", "image": "busybox"}, {})
    assert info.value.reason == "CreateContainerError"
    assert "no command specified" in info.value.message
    with pytest.raises(ContainerStartError) as info:
        await sandbox.start_container({"name": "c", "image": "x", "command": ["/nope/x"]}, {})
    assert (info.value.reason, info.value.exit_code) == ("StartError", 128)
    assert "stat /nope/x: no such file or directory" in info.value.message


async def test_container_command_args_env_workdir(sandbox: PodSandbox) -> None:
    spec = {
        "name": "main",
        "image": "busybox",
        "command": ["sh", "-c"],
        "args": ['echo "$0 $X $HOSTNAME $(pwd)"; echo oops >&2', "arg0"],
        "workingDir": "/usr",
    }
    proc = await sandbox.start_container(spec, {"X": "y"})
    assert proc.name == "main"
    assert await read_all(proc.stdout) == b"arg0 y pod-a /usr\n"
    assert await read_all(proc.stderr) == b"oops\n"
    assert await proc.wait() == 0
    await proc.aclose()


async def test_destroy_kills_everything_and_is_idempotent(sandbox: PodSandbox) -> None:
    proc = await sandbox.exec(
        ["sh", "-c", "sleep 1000 & (sleep 1000 &) ; sleep 1000"],
        env={},
        cwd=None,
        tty=False,
        stdin=False,
        stdout=False,
        stderr=False,
    )
    tty_proc = await sandbox.exec(
        ["sleep", "1000"], env={}, cwd=None, tty=True, stdin=True, stdout=True, stderr=True
    )
    await eventually(lambda: len(sandbox.remaining_pids()) >= 6)  # init+sleep, sh+2 sleeps, tty
    pids = sandbox.remaining_pids()
    assert sandbox.pid in pids and proc.pid in pids and tty_proc.pid in pids
    # The tree walk finds what a scan of every process in /proc finds (the orphaned
    # "(sleep 1000 &)" included: it was re-parented to the pod's init).
    await eventually(lambda: sandbox.remaining_pids() == sandbox.remaining_pids(exhaustive=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sandbox.destroy)
        nursery.start_soon(sandbox.destroy)
    await sandbox.destroy()
    assert sandbox.remaining_pids(exhaustive=True) == []
    for pid in pids:  # none of them exists any more (not even as a zombie)
        assert not _alive(pid)
    assert proc.exit_code == 137 and tty_proc.exit_code == 137
    with pytest.raises(Exception, match="destroyed"):
        await sandbox.exec(
            ["true"], env={}, cwd=None, tty=False, stdin=False, stdout=False, stderr=False
        )


async def test_escaping_session_still_dies_with_namespaces() -> None:
    await require_namespaces()
    box = await PodSandbox.create("escape", namespaces=True)
    try:
        await run(box, ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 </dev/null &"])
        await eventually(lambda: len(box.remaining_pids()) >= 3)  # init+sleep, escaped sleep
    finally:
        await box.destroy()
    assert box.remaining_pids(exhaustive=True) == []


async def test_container_view_kills_its_execs(sandbox: PodSandbox) -> None:
    view = ContainerSandbox(sandbox, None)
    proc = await view.exec(
        ["sleep", "1000"], env={}, cwd=None, tty=False, stdin=False, stdout=False, stderr=False
    )
    assert isinstance(proc, ExecProcess) and isinstance(proc, SandboxProcess)
    view.close()
    assert await proc.wait() == 137
    await proc.aclose()
    with pytest.raises(ExecStartError, match="CONTAINER_EXITED"):
        await view.exec(
            ["true"], env={}, cwd=None, tty=False, stdin=False, stdout=False, stderr=False
        )


async def test_image_root_is_chrooted(tmp_path: Path, sandbox: PodSandbox) -> None:
    root = tmp_path / "root"
    for path in ("/bin/dash", *_shared_libs("/bin/dash")):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (root / "bin" / "sh").symlink_to("dash")
    (root / "data").mkdir()
    (root / "data" / "marker").write_text("inside\n")
    box = await PodSandbox.create(
        "rooted", namespaces=sandbox.namespaces, image_roots={"tiny:*": str(root)}
    )
    try:
        assert box.root_for("tiny:1") == str(root) and box.root_for("busybox") is None
        proc = await box.start_container(
            {
                "name": "c",
                "image": "tiny:1",
                "command": [
                    "/bin/sh",
                    "-c",
                    'read x < marker; echo "$x $(pwd)"; [ -e /etc/passwd ] || echo no-passwd',
                ],
                "workingDir": "/data",
            },
            {"PATH": "/bin"},
        )
        assert await read_all(proc.stdout) == b"inside /data\nno-passwd\n"
        assert await proc.wait() == 0
        await proc.aclose()
    finally:
        await box.destroy()


async def test_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kuberun_trio.cluster.sandbox"):
        box = await PodSandbox.create("fallback", namespaces=False)
    try:
        assert not box.namespaces and box.pid_namespace is None
        assert "process groups" in caplog.text
    finally:
        await box.destroy()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` for up to 5 s (it reads /proc: there is nothing to wait on)."""
    for _ in range(500):
        if predicate():
            return
        await trio.sleep(0.01)
    assert predicate()


def _shared_libs(binary: str) -> list[str]:
    import subprocess

    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                libs.append(word)
    return libs


_CRASHING_OWNER = """
import os, sys, trio
from kuberun_trio.cluster.sandbox import PodSandbox

async def main():
    box = await PodSandbox.create("orphan", namespaces=True)
    proc = await box.exec(["sh", "-c", "sleep 1000 & sleep 1000"], env={}, cwd=None,
                          tty=False, stdin=False, stdout=False, stderr=False)
    while len(box.remaining_pids()) < 4:
        await trio.sleep(0.01)
    print(*box.remaining_pids(), flush=True)
    os.kill(os.getpid(), 9)  # die without any cleanup

trio.run(main)
"""


_REAPING_WRAPPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the owner's orphans come here
owner = subprocess.run([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)
print(owner.returncode, owner.stdout.decode().strip(), flush=True)
while True:  # unshare/nsenter only exit once the pod is gone; reap them
    try:
        os.wait()
    except ChildProcessError:
        break
"""


async def test_sandbox_dies_with_a_crashed_owner() -> None:
    await require_namespaces()
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-c", _REAPING_WRAPPER, _CRASHING_OWNER], capture_stdout=True
        )
    returncode, *pids = (int(word) for word in result.stdout.split())
    assert returncode == -signal.SIGKILL
    assert len(pids) >= 4
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie only waits for its parent's reaping)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


async def test_cancelled_creation_leaves_nothing() -> None:
    await require_namespaces()
    before = set(_inits_named("cancelled"))
    for delay in (0, 0.0005, 0.001, 0.002, 0.005):
        with trio.move_on_after(delay):
            box = await PodSandbox.create("cancelled", namespaces=True)
            await box.destroy()
    await eventually(lambda: set(_inits_named("cancelled")) <= before)


def _inits_named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if name.encode() in cmdline and _alive(int(entry)):
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("ignored", [False, True], ids=["sigint-default", "sigint-ignored"])
async def test_pod_processes_get_default_signal_dispositions(
        sandbox: PodSandbox, ignored: bool) -> None:
    # A background job of a non-interactive shell starts with SIGINT ignored, and an
    # ignored signal stays ignored across exec: the sandbox must still hand its processes
    # the default (else Ctrl-C and `kill -INT` do nothing in a pod). SIGPIPE too.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignored else None
    try:
        code, out, _ = await run(sandbox, ["sh", "-c", "grep SigIgn /proc/self/status"])
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    assert code == 0
    mask = int(out.split()[1], 16)
    assert not mask & (1 << (signal.SIGINT - 1)) and not mask & (1 << (signal.SIGPIPE - 1)), out
