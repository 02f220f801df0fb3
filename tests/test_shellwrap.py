"""The env/PID wrapper and the signal exec, run for real with local shells.

``start_new_session=True`` stands in for the container runtime, which makes
every exec process a session (and process-group) leader.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import trio

from kuberun_trio.core import shellwrap
from kuberun_trio.core.session import (
    Close,
    SendExitSignal,
    SendSignal,
    SessionConfig,
    SessionMachine,
    StartExec,
)

DUMP_ENV = (sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))")
PRINT_PID = (sys.executable, "-c", "import os; print(os.getpid())")


@pytest.fixture(params=["dash", "bash-as-sh"])
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A POSIX /bin/sh: dash (Debian's sh) and bash in POSIX mode (RHEL's sh)."""
    if request.param == "dash":
        path = shutil.which("dash")
        if path is None:
            pytest.skip("dash not installed")
        return path
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    link = tmp_path / "sh"
    link.symlink_to(bash)  # bash named "sh" runs in POSIX mode
    return str(link)


def pid_files(tmp_path: Path, n: int = 2) -> tuple[str, ...]:
    return tuple(str(tmp_path / f"d{i}" / "x.pid") for i in range(n))


async def run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        list(argv),
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


TRICKY = {
    "QUOTES": "it's \"quoted\" 'twice'",
    "NEWLINES": "line1\nline2\n\n",
    "SUBST": "$(touch pwned) `touch pwned2` ${HOME} $$",
    "GLOB": "* ? [a-z] ~",
    "DASHES": "-- -x --",
    "EQUALS": "a=b=c",
    "BACKSLASH": "\\n \\ \\\\ \\0",
    "EMPTY": "",
    "SPACES": "  leading and trailing  ",
    "UNICODE": "grüße ☃ 日本",
    "SEMI": "; exit 3; && || | >/dev/null <x &",
    "_": "underscore name",
    "IFS": ":",
    "PATH": "/usr/bin:/bin",
}


async def test_env_arrives_intact(shell: str, tmp_path: Path) -> None:
    argv = shellwrap.wrap_argv(pid_files(tmp_path), TRICKY.items(), DUMP_ENV, shell=shell)
    result = await run(argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    env = json.loads(result.stdout)
    for name, value in TRICKY.items():
        if name == "_":  # some shells set $_ for the command they exec
            continue
        assert env[name] == value, name
    assert read(tmp_path / "pwned") is None
    assert read(tmp_path / "pwned2") is None
    assert not any(k.startswith("__kuberun") for k in env)


async def test_later_assignment_wins(shell: str, tmp_path: Path) -> None:
    env = [("A", "first"), ("A", "second")]
    result = await run(shellwrap.wrap_argv(pid_files(tmp_path), env, DUMP_ENV, shell=shell))
    assert json.loads(result.stdout)["A"] == "second"


async def test_pid_file_holds_command_pid(shell: str, tmp_path: Path) -> None:
    files = pid_files(tmp_path)
    Path(files[0]).parent.mkdir()
    argv = shellwrap.wrap_argv(files, [], PRINT_PID, shell=shell)
    async with spawn(argv, new_session=False) as proc:
        command_pid = int(await read_line(proc))
        assert await proc.wait() == 0
    assert command_pid == proc.pid  # exec replaced the wrapper: no extra process
    assert read(files[0]) == f"{proc.pid}\n"
    assert read(files[1]) is None


async def test_pid_file_fallback(shell: str, tmp_path: Path) -> None:
    files = pid_files(tmp_path, 3)  # d0 does not exist (read-only /tmp stand-in)
    Path(files[1]).parent.mkdir()
    Path(files[2]).parent.mkdir()
    result = await run(shellwrap.wrap_argv(files, [], PRINT_PID, shell=shell))
    assert result.stderr == b""
    assert read(files[0]) is None
    assert read(files[1]) == result.stdout.decode()
    assert read(files[2]) is None


async def test_no_writable_pid_location_still_runs(shell: str, tmp_path: Path) -> None:
    result = await run(
        shellwrap.wrap_argv(pid_files(tmp_path), [("A", "1")], DUMP_ENV, shell=shell)
    )
    assert result.returncode == 0
    assert result.stderr == b""
    assert json.loads(result.stdout)["A"] == "1"
    # ... and the signal exec reports that it found nobody to signal
    sig = await run(shellwrap.signal_argv("TERM", pid_files(tmp_path), shell=shell))
    assert sig.returncode == 3
    assert b"no process to signal" in sig.stderr


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (("/bin/sh", "-c", "exit 0"), 0),
        (("/bin/sh", "-c", "exit 42"), 42),
        (("/bin/sh", "-c", "exit 255"), 255),
        (("/nonexistent/program",), 127),
        (("/bin/sh", "-c", 'kill -s TERM "$$"'), -signal.SIGTERM),
    ],
)
async def test_exit_codes_pass_through(
    shell: str, tmp_path: Path, command: tuple[str, ...], code: int
) -> None:
    result = await run(shellwrap.wrap_argv(pid_files(tmp_path), [], command, shell=shell))
    assert result.returncode == code


@pytest.mark.parametrize("malformed", [["--"], ["--", "--"], []])
async def test_malformed_arguments_exit_125(malformed: list[str]) -> None:
    result = await run(["/bin/sh", "-c", shellwrap.WRAPPER_SCRIPT, "kuberun", *malformed])
    assert result.returncode == 125


def read(path: str | Path) -> str | None:
    """A file's text, or None if it does not exist."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@asynccontextmanager
async def spawn(argv: Sequence[str], *, new_session: bool) -> AsyncIterator[trio.Process]:
    """Start ``argv`` with a stdout pipe; kill and reap it on the way out."""
    proc = await trio.lowlevel.open_process(
        list(argv), stdout=subprocess.PIPE, start_new_session=new_session
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()


async def read_line(proc: trio.Process) -> str:
    """The next line the process writes to stdout (our sync point with it)."""
    assert proc.stdout is not None
    data = b""
    with trio.fail_after(5):
        while not data.endswith(b"\n"):
            chunk = await proc.stdout.receive_some()
            assert chunk, f"EOF after {data!r}"
            data += chunk
    return data.decode()


async def test_signal_reaches_process_group(shell: str, tmp_path: Path) -> None:
    """An SSH exec command is ``sh -c CMD``; dash keeps that shell around, so the
    TERM must reach its children too (the process-group kill)."""
    files = pid_files(tmp_path)
    Path(files[0]).parent.mkdir()
    command = ("/bin/sh", "-c", 'sleep 30 & echo "$!"; wait; echo survived')
    argv = shellwrap.wrap_argv(files, [], command, shell=shell)
    async with spawn(argv, new_session=True) as proc:
        child = int(await read_line(proc))
        assert alive(child)
        try:
            assert read(files[0]) == f"{proc.pid}\n"
            result = await run(shellwrap.signal_argv("TERM", files, shell=shell))
            assert result.returncode == 0, result.stderr
            with trio.fail_after(5):
                assert await proc.wait() == -signal.SIGTERM
                # EOF only once every holder of the pipe -- the sleep too -- is gone
                assert await proc.stdout.receive_some() == b""  # type: ignore[union-attr]
                while alive(child):
                    await trio.sleep(0.01)
        finally:  # a failed run must not leave the orphan behind
            if alive(child):
                os.kill(child, signal.SIGKILL)


async def test_signal_falls_back_to_pid(shell: str, tmp_path: Path) -> None:
    """Not a process-group leader: only the PID itself is signalled."""
    files = pid_files(tmp_path)
    Path(files[1]).parent.mkdir()  # first candidate missing: the fallback file
    command = ("/bin/sh", "-c", "echo ready; exec sleep 30")
    argv = shellwrap.wrap_argv(files, [], command, shell=shell)
    async with spawn(argv, new_session=False) as proc:
        assert await read_line(proc) == "ready\n"
        assert read(files[1]) == f"{proc.pid}\n"
        assert os.getpgid(proc.pid) != proc.pid
        result = await run(shellwrap.signal_argv("USR1", files, shell=shell))
        assert result.returncode == 0, result.stderr
        with trio.fail_after(5):
            assert await proc.wait() == -signal.SIGUSR1


async def test_signal_to_dead_process_fails(tmp_path: Path) -> None:
    files = pid_files(tmp_path, 1)
    Path(files[0]).parent.mkdir()
    done = await run(shellwrap.wrap_argv(files, [], PRINT_PID))
    assert done.returncode == 0
    result = await run(shellwrap.signal_argv("TERM", files))
    assert result.returncode == 1


@pytest.mark.parametrize("content", ["", "0\n", "1x\n", "-5\n", "007\n"])
async def test_signal_ignores_garbage_pid_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.pid"
    path.write_text(content)
    result = await run(shellwrap.signal_argv("KILL", [str(path)]))
    assert result.returncode == 3


def test_argv_shapes() -> None:
    argv = shellwrap.wrap_argv(["/tmp/p"], [("A", "1"), ("B", "x y")], ["/bin/sh", "-c", "id"])
    assert argv == (
        "/bin/sh",
        "-c",
        shellwrap.WRAPPER_SCRIPT,
        "kuberun",
        "/tmp/p",
        "--",
        "A=1",
        "B=x y",
        "--",
        "/bin/sh",
        "-c",
        "id",
    )
    assert shellwrap.signal_argv("HUP", ["/a", "/b"], shell="/bin/ash") == (
        "/bin/ash",
        "-c",
        shellwrap.SIGNAL_SCRIPT,
        "kuberun-signal",
        "HUP",
        "/a",
        "/b",
    )
    assert shellwrap.pid_file_candidates(["/tmp/", "/dev/shm"], "c-1") == (
        "/tmp/.kuberun-c-1.pid",
        "/dev/shm/.kuberun-c-1.pid",
    )


@pytest.mark.parametrize(
    ("pids", "env", "command"),
    [
        (["relative"], [], ["x"]),
        (["/a"], [("1A", "x")], ["x"]),
        (["/a"], [("A", "\0")], ["x"]),
        (["/a"], [], []),
        (["/a"], [], ["a\0b"]),
        (["/a"], [], ["\udcff"]),
    ],
)
def test_wrap_argv_rejects(pids: list[str], env: list[tuple[str, str]], command: list[str]) -> None:
    with pytest.raises(ValueError):
        shellwrap.wrap_argv(pids, env, command)


@pytest.mark.parametrize(("name", "files"), [("SIGTERM", ["/a"]), ("BUS", ["/a"]), ("TERM", [])])
def test_signal_argv_rejects(name: str, files: list[str]) -> None:
    with pytest.raises(ValueError):
        shellwrap.signal_argv(name, files)


def test_signal_table_matches_this_platform() -> None:
    for name, number in shellwrap.SSH_SIGNALS.items():
        assert getattr(signal, f"SIG{name}") == number


async def test_readonly_names_would_kill_bash_wrapper(tmp_path: Path) -> None:
    """Why the machine refuses UID & co.: bash-as-sh exits on exporting them."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    link = tmp_path / "sh"
    link.symlink_to(bash)
    argv = shellwrap.wrap_argv(pid_files(tmp_path), [("UID", "0")], DUMP_ENV, shell=str(link))
    assert (await run(argv)).returncode != 0
    assert "UID" in shellwrap.READONLY_SHELL_VARIABLES


async def test_machine_plans_end_to_end(tmp_path: Path) -> None:
    """Plans straight from the session machine: exec, env, TERM, pid file, exit-signal."""
    pid_dir = tmp_path / "run"
    pid_dir.mkdir()
    config = SessionConfig(pid_dirs=(str(tmp_path / "ro"), str(pid_dir)))
    machine = SessionMachine(config, session_id="conn7-1", container="main")
    assert machine.env("GREETING", "hello 'world' $(id)").accepted
    command = 'printf "%s|%s|%s\\n" "$GREETING" "$TERM" "$$"; exec sleep 30'
    assert machine.pty_request("xterm-kitty", 80, 24).accepted
    (start,) = machine.exec(command).actions
    assert isinstance(start, StartExec)
    async with spawn(start.plan.argv, new_session=True) as proc:
        machine.started()
        out = await read_line(proc)
        greeting, term, command_pid = out.rstrip("\n").split("|")
        assert (greeting, term) == ("hello 'world' $(id)", "xterm-kitty")
        assert os.getpgid(int(command_pid)) == proc.pid  # the wrapper leads its group
        assert read(pid_dir / ".kuberun-conn7-1.pid") == f"{proc.pid}\n"
        (send,) = machine.signal("TERM").actions
        assert isinstance(send, SendSignal)
        result = await run(send.plan.argv)
        assert result.returncode == 0, result.stderr
        with trio.fail_after(5):
            code = await proc.wait()
        assert code == -signal.SIGTERM
        # the Kubernetes exec status reports a signal death as 128 + N
        outcome = machine.exited(128 - code)
        assert outcome.actions == (SendExitSignal("TERM", False, ""), Close())
    assert read(pid_dir / ".kuberun-conn7-1.pid") is None  # removed by the wrapper


# -- the PID file goes away with the process (issue 11, item 5) ----------------------------------

@pytest.mark.parametrize(
    ("command", "code"),
    [
        (("/bin/sh", "-c", "exit 0"), 0),
        (("/bin/sh", "-c", "exit 42"), 42),
        (("/nonexistent/program",), 127),
        (("/bin/sh", "-c", 'kill -s TERM "$$"'), -signal.SIGTERM),
        (("/bin/sh", "-c", 'kill -s KILL "$$"'), -signal.SIGKILL),
        (("/bin/sh", "-c", 'kill -s INT "$$"'), -signal.SIGINT),
    ],
)
async def test_group_leader_wrapper_removes_its_pid_file(
    shell: str, tmp_path: Path, command: tuple[str, ...], code: int
) -> None:
    """As the runtime starts it (a session leader), the wrapper waits for the command,
    removes its PID file and ends the way the command ended."""
    files = pid_files(tmp_path)
    Path(files[0]).parent.mkdir()
    argv = shellwrap.wrap_argv(files, [("A", "1")], command, shell=shell)
    async with spawn(argv, new_session=True) as proc:
        with trio.fail_after(10):
            assert await proc.wait() == code
    assert read(files[0]) is None
    assert not list(Path(files[0]).parent.iterdir())


async def test_pid_file_removed_after_a_signal_from_ssh(shell: str, tmp_path: Path) -> None:
    files = pid_files(tmp_path)
    Path(files[0]).parent.mkdir()
    command = ("/bin/sh", "-c", "echo ready; sleep 30")
    argv = shellwrap.wrap_argv(files, [], command, shell=shell)
    async with spawn(argv, new_session=True) as proc:
        assert await read_line(proc) == "ready\n"
        assert read(files[0]) == f"{proc.pid}\n"
        result = await run(shellwrap.signal_argv("USR1", files, shell=shell))
        assert result.returncode == 0, result.stderr
        with trio.fail_after(5):
            assert await proc.wait() == -signal.SIGUSR1
    assert read(files[0]) is None


async def test_env_cannot_redirect_the_pid_file_removal(shell: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    files = pid_files(tmp_path)
    Path(files[0]).parent.mkdir()
    argv = shellwrap.wrap_argv(files, [("__kuberun_pid", str(victim))], PRINT_PID, shell=shell)
    async with spawn(argv, new_session=True) as proc:
        with trio.fail_after(10):
            assert await proc.wait() != 0  # the shell refuses; the session machine too
    assert victim.read_text() == "keep"
    assert "__kuberun_pid" in shellwrap.READONLY_SHELL_VARIABLES
