"""The sans-IO session-channel machine: synchronous, table-driven."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest

from kuberun_trio.core import shellwrap
from kuberun_trio.core.session import (
    TRANSITIONS,
    AbortExec,
    Close,
    CloseStdin,
    ExecPlan,
    Input,
    Outcome,
    Resize,
    SendExitSignal,
    SendExitStatus,
    SendSignal,
    SendStderr,
    SessionConfig,
    SessionMachine,
    SessionStateError,
    StartExec,
    State,
)

Step = tuple[str, tuple[Any, ...], bool, Sequence[Any]]
"""(method, args, expected accepted, expected actions).

Expected actions are instances compared by ==, or action *classes* matched by
type (for StartExec/SendSignal, whose plans are checked in their own tests)."""


def make(**config: Any) -> SessionMachine:
    return SessionMachine(SessionConfig(**config), session_id="c1-0", container="shell")


def drive(machine: SessionMachine, steps: Sequence[Step]) -> None:
    for i, (method, args, accepted, actions) in enumerate(steps):
        outcome = getattr(machine, method)(*args)
        assert isinstance(outcome, Outcome)
        assert outcome.accepted is accepted, f"step {i}: {method}{args}"
        assert len(outcome.actions) == len(actions), f"step {i}: {outcome.actions}"
        for got, want in zip(outcome.actions, actions, strict=True):
            if isinstance(want, type):
                assert type(got) is want, f"step {i}: {got!r}"
            else:
                assert got == want, f"step {i}"


PTY: Step = ("pty_request", ("xterm-256color", 80, 24), True, [])
EXEC: Step = ("exec", ("ls",), True, [StartExec])
SHELL: Step = ("shell", (), True, [StartExec])
SFTP: Step = ("subsystem", ("sftp",), True, [StartExec])
STARTED: Step = ("started", (), True, [])

CASES: dict[str, list[Step]] = {
    # --- env
    "env accepted while idle": [("env", ("LANG", "C.UTF-8"), True, []), EXEC],
    "env after exec refused": [EXEC, ("env", ("LANG", "C"), False, [])],
    "env after start refused": [EXEC, STARTED, ("env", ("LANG", "C"), False, [])],
    "env name starting with digit": [("env", ("1X", "v"), False, [])],
    "env name with dash": [("env", ("A-B", "v"), False, [])],
    "env name empty": [("env", ("", "v"), False, [])],
    "env name with equals": [("env", ("A=B", "v"), False, [])],
    "env value with NUL": [("env", ("A", "x\0y"), False, [])],
    "env value with lone surrogate": [("env", ("A", "x\udcff"), False, [])],
    "env readonly in bash": [("env", ("UID", "0"), False, []), ("env", ("PPID", "1"), False, [])],
    "env value with shell syntax is fine": [("env", ("A", "$(id) `id` '\"\n"), True, [])],
    # --- pty
    "pty twice refused": [PTY, ("pty_request", ("vt100", 1, 1), False, [])],
    "pty after exec refused": [EXEC, ("pty_request", ("vt100", 1, 1), False, [])],
    "pty with NUL term refused": [("pty_request", ("xt\0", 80, 24), False, [])],
    # --- starting
    "second exec refused": [EXEC, ("exec", ("id",), False, [])],
    "shell after exec refused": [EXEC, STARTED, ("shell", (), False, [])],
    "subsystem after shell refused": [SHELL, ("subsystem", ("sftp",), False, [])],
    "unknown subsystem refused, then shell ok": [("subsystem", ("nope",), False, []), SHELL],
    "exec with NUL refused": [("exec", ("a\0b",), False, [])],
    "exec too long refused": [("exec", ("x" * (64 * 1024 + 1),), False, [])],
    # --- signals
    "signal while idle refused": [("signal", ("TERM",), False, [])],
    "signal while starting refused": [EXEC, ("signal", ("TERM",), False, [])],
    "signal while running": [EXEC, STARTED, ("signal", ("TERM",), True, [SendSignal])],
    "signal with SIG prefix refused": [EXEC, STARTED, ("signal", ("SIGTERM",), False, [])],
    "signal lower case refused": [EXEC, STARTED, ("signal", ("term",), False, [])],
    "signal not in RFC refused": [EXEC, STARTED, ("signal", ("BUS",), False, [])],
    "signal to subsystem refused": [SFTP, STARTED, ("signal", ("TERM",), False, [])],
    "signal after exit refused": [
        EXEC,
        STARTED,
        ("exited", (0,), True, [SendExitStatus(0), Close()]),
        ("signal", ("TERM",), False, []),
    ],
    # --- window changes
    "window change without pty ignored": [("window_change", (100, 50), False, []), EXEC],
    "window change without pty while running": [
        EXEC,
        STARTED,
        ("window_change", (100, 50), False, []),
    ],
    "window change running": [
        PTY,
        SHELL,
        STARTED,
        ("window_change", (100, 50), True, [Resize(100, 50)]),
    ],
    "window change same size": [PTY, SHELL, STARTED, ("window_change", (80, 24), True, [])],
    "window change clamped": [
        PTY,
        SHELL,
        STARTED,
        ("window_change", (70000, -3), True, [Resize(65535, 0)]),
    ],
    "window change while starting is deferred": [
        PTY,
        SHELL,
        ("window_change", (120, 40), True, []),
        ("window_change", (132, 43), True, []),
        ("started", (), True, [Resize(132, 43)]),
    ],
    "window change back to planned size while starting": [
        PTY,
        SHELL,
        ("window_change", (120, 40), True, []),
        ("window_change", (80, 24), True, []),
        ("started", (), True, []),
    ],
    # --- eof
    "eof running": [EXEC, STARTED, ("eof", (), True, [CloseStdin()])],
    "eof before exec is deferred": [
        ("eof", (), True, []),
        EXEC,
        ("started", (), True, [CloseStdin()]),
    ],
    "eof while starting is deferred": [
        EXEC,
        ("eof", (), True, []),
        ("started", (), True, [CloseStdin()]),
    ],
    "eof and resize both deferred": [
        PTY,
        SHELL,
        ("window_change", (1, 2), True, []),
        ("eof", (), True, []),
        ("started", (), True, [Resize(1, 2), CloseStdin()]),
    ],
    # --- exit
    "exit 0": [EXEC, STARTED, ("exited", (0,), True, [SendExitStatus(0), Close()])],
    "exit 1": [EXEC, STARTED, ("exited", (1,), True, [SendExitStatus(1), Close()])],
    "exit 143 without our TERM is a status": [
        EXEC,
        STARTED,
        ("exited", (143,), True, [SendExitStatus(143), Close()]),
    ],
    "exit 130 (tty ctrl-c or exit 130) is a status": [
        PTY,
        EXEC,
        STARTED,
        ("exited", (130,), True, [SendExitStatus(130), Close()]),
    ],
    "exit 143 after our TERM is a signal": [
        EXEC,
        STARTED,
        ("signal", ("TERM",), True, [SendSignal]),
        ("exited", (143,), True, [SendExitSignal("TERM", False, ""), Close()]),
    ],
    "exit 130 after our TERM is a status": [
        EXEC,
        STARTED,
        ("signal", ("TERM",), True, [SendSignal]),
        ("exited", (130,), True, [SendExitStatus(130), Close()]),
    ],
    "exit 137 is KILL": [
        EXEC,
        STARTED,
        ("exited", (137,), True, [SendExitSignal("KILL"), Close()]),
    ],
    "exit 135 (no SSH name) is a status": [
        EXEC,
        STARTED,
        ("exited", (135,), True, [SendExitStatus(135), Close()]),
    ],
    "explicit signal": [
        EXEC,
        STARTED,
        ("exited", (0, "SEGV"), True, [SendExitSignal("SEGV"), Close()]),
    ],
    "exit while still starting": [EXEC, ("exited", (3,), True, [SendExitStatus(3), Close()])],
    "eof after exit is harmless": [
        EXEC,
        STARTED,
        ("exited", (0,), True, [SendExitStatus(0), Close()]),
        ("eof", (), True, []),
    ],
    # --- failures to start
    "start failed": [
        EXEC,
        (
            "start_failed",
            ("pod gone",),
            True,
            [SendStderr("kuberun: pod gone\n"), SendExitStatus(255), Close()],
        ),
    ],
    "start failed with tty": [
        PTY,
        SHELL,
        (
            "start_failed",
            ("x",),
            True,
            [SendStderr("kuberun: x\r\n"), SendExitStatus(255), Close()],
        ),
    ],
    # --- close
    "close idle": [("closed", (), True, []), ("exec", ("ls",), False, [])],
    "close starting aborts": [EXEC, ("closed", (), True, [AbortExec()])],
    "close running hangs up": [EXEC, STARTED, ("closed", (), True, [SendSignal, AbortExec()])],
    "close after exit": [
        EXEC,
        STARTED,
        ("exited", (0,), True, [SendExitStatus(0), Close()]),
        ("closed", (), True, []),
    ],
    "started after close aborts": [
        EXEC,
        ("closed", (), True, [AbortExec()]),
        ("started", (), False, [AbortExec()]),
    ],
    "exited after close absorbed": [
        EXEC,
        STARTED,
        ("closed", (), True, [SendSignal, AbortExec()]),
        ("exited", (129,), False, []),
    ],
    "start_failed after close absorbed": [
        EXEC,
        ("closed", (), True, [AbortExec()]),
        ("start_failed", ("x",), False, []),
    ],
    "close twice": [("closed", (), True, []), ("closed", (), True, [])],
}


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
def test_transitions(steps: list[Step]) -> None:
    drive(make(), steps)


def test_close_running_without_hangup() -> None:
    drive(make(hangup_on_close=False), [EXEC, STARTED, ("closed", (), True, [AbortExec()])])


def test_assumed_signal_exits_configurable() -> None:
    m = make(assume_signal_exits=frozenset({"KILL", "TERM"}))
    drive(m, [EXEC, STARTED, ("exited", (143,), True, [SendExitSignal("TERM"), Close()])])
    m = make(assume_signal_exits=frozenset())
    drive(m, [EXEC, STARTED, ("exited", (137,), True, [SendExitStatus(137), Close()])])


@pytest.mark.parametrize(
    "steps",
    [
        [("started", ())],
        [("exited", (0,))],
        [("start_failed", ("x",))],
        [("exec", ("ls",)), ("started", ()), ("started", ())],
        [("exec", ("ls",)), ("started", ()), ("start_failed", ("x",))],
        [("exec", ("ls",)), ("exited", (0,)), ("exited", (0,))],
        [("exec", ("ls",)), ("exited", (0,)), ("started", ())],
    ],
)
def test_impossible_task_reports_raise(steps: list[tuple[str, tuple[Any, ...]]]) -> None:
    m = make()
    *prefix, (method, args) = steps
    for name, a in prefix:
        getattr(m, name)(*a)
    before = m.state
    with pytest.raises(SessionStateError):
        getattr(m, method)(*args)
    assert m.state is before


@pytest.mark.parametrize("code", [-1, 2**32])
def test_exit_code_out_of_range(code: int) -> None:
    m = make()
    m.exec("ls")
    m.started()
    with pytest.raises(ValueError, match="out of range"):
        m.exited(code)


def test_env_count_cap() -> None:
    m = make(max_env_vars=3)
    for i in range(3):
        assert m.env(f"V{i}", "x").accepted
    assert not m.env("V3", "x").accepted
    assert m.env("V1", "replaced").accepted  # not a new name
    plan = start(m, "exec", "true")
    assert dict(plan.env) == {"V0": "x", "V1": "replaced", "V2": "x"}


def test_env_size_cap() -> None:
    m = make(max_env_bytes=20)
    assert m.env("A", "x" * 18).accepted  # "A=" + 18 = 20
    assert not m.env("B", "").accepted
    assert not m.env("A", "x" * 19).accepted
    assert m.env("A", "é" * 9).accepted  # counted in UTF-8 bytes: 2 + 18
    assert not m.env("A", "é" * 10).accepted


def start(m: SessionMachine, method: str, *args: str) -> ExecPlan:
    outcome = getattr(m, method)(*args)
    assert outcome.accepted
    (action,) = outcome.actions
    assert isinstance(action, StartExec)
    assert m.plan is action.plan
    return action.plan


def wrapped(plan: ExecPlan) -> tuple[tuple[str, ...], list[str], list[str]]:
    """Split a plan's argv into (pid files, NAME=VALUE args, command)."""
    shell, flag, script, argv0, *rest = plan.argv
    assert (shell, flag, script, argv0) == ("/bin/sh", "-c", shellwrap.WRAPPER_SCRIPT, "kuberun")
    first = rest.index("--")
    second = rest.index("--", first + 1)
    return tuple(rest[:first]), rest[first + 1 : second], rest[second + 1 :]


PlanCase = tuple[list[tuple[str, tuple[Any, ...]]], str, tuple[str, ...], dict[str, Any]]
PLAN_CASES: dict[str, PlanCase] = {
    "shell without tty": (
        [("shell", ())],
        "shell",
        ("/bin/sh",),
        {"tty": False, "stderr": True, "term": None, "width": 0, "height": 0},
    ),
    "shell with tty is a login shell": (
        [("pty_request", ("xterm", 100, 30)), ("shell", ())],
        "shell",
        ("/bin/sh", "-l"),
        {"tty": True, "stderr": False, "term": "xterm", "width": 100, "height": 30},
    ),
    "resize before shell goes into the plan": (
        [("pty_request", ("xterm", 100, 30)), ("window_change", (90, 20)), ("shell", ())],
        "shell",
        ("/bin/sh", "-l"),
        {"tty": True, "width": 90, "height": 20},
    ),
    "exec runs through sh -c": (
        [("exec", ("ls -l 'a b' | wc",))],
        "exec",
        ("/bin/sh", "-c", "ls -l 'a b' | wc"),
        {"tty": False, "stdin": True, "stdout": True, "stderr": True},
    ),
    "exec with tty": (
        [("pty_request", ("vt100", 80, 24)), ("exec", ("top",))],
        "exec",
        ("/bin/sh", "-c", "top"),
        {"tty": True, "stderr": False},
    ),
    "sftp subsystem": (
        [("subsystem", ("sftp",))],
        "subsystem",
        ("/usr/lib/openssh/sftp-server",),
        {"tty": False, "stderr": True},
    ),
}


@pytest.mark.parametrize("case", list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_plan_shapes(case: PlanCase) -> None:
    calls, kind, command, fields = case
    m = make()
    *setup, (method, args) = calls
    for name, a in setup:
        assert getattr(m, name)(*a).accepted
    plan = start(m, method, *args)
    assert plan.kind == kind
    assert plan.command == command
    assert plan.container == "shell"
    assert plan.stdin and plan.stdout
    for name, value in fields.items():
        assert getattr(plan, name) == value, name
    pid_files, _, tail = wrapped(plan)
    assert tuple(tail) == command
    assert (
        pid_files
        == plan.pid_files
        == (
            "/tmp/.kuberun-c1-0.pid",
            "/dev/shm/.kuberun-c1-0.pid",
            "/var/tmp/.kuberun-c1-0.pid",
        )
    )
    assert plan.pid_file == "/tmp/.kuberun-c1-0.pid"


def test_env_order_client_then_server_then_term() -> None:
    m = SessionMachine(
        SessionConfig(),
        session_id="s",
        server_env={"SSH_CONNECTION": "1.2.3.4 5 6.7.8.9 22", "LANG": "C"},
    )
    assert m.env("LANG", "de_DE.UTF-8").accepted
    assert m.env("TERM", "dumb").accepted
    assert m.env("X", "1").accepted
    assert m.pty_request("screen", 80, 24).accepted
    plan = start(m, "shell")
    assert plan.env == (
        ("LANG", "C"),
        ("TERM", "screen"),
        ("X", "1"),
        ("SSH_CONNECTION", "1.2.3.4 5 6.7.8.9 22"),
    )
    _, assignments, _ = wrapped(plan)
    assert assignments == [f"{k}={v}" for k, v in plan.env]


def test_empty_term_sets_no_term() -> None:
    m = make()
    assert m.env("TERM", "vt52").accepted
    assert m.pty_request("", 80, 24).accepted
    plan = start(m, "shell")
    assert plan.tty and plan.term is None
    assert dict(plan.env) == {"TERM": "vt52"}


def test_signal_plan() -> None:
    m = make()
    start(m, "exec", "sleep 9")
    m.started()
    (action,) = m.signal("USR1").actions
    assert isinstance(action, SendSignal)
    assert action.plan.signal == "USR1"
    assert action.plan.container == "shell"
    assert action.plan.argv == (
        "/bin/sh",
        "-c",
        shellwrap.SIGNAL_SCRIPT,
        "kuberun-signal",
        "USR1",
        *m.plan.pid_files,  # type: ignore[union-attr]
    )


def test_configured_commands() -> None:
    config = SessionConfig(
        shell_command=("/bin/bash",),
        login_shell_args=("--login", "-i"),
        command_shell=("/bin/bash", "-c"),
        subsystems={"backup": ("/usr/bin/backupd", "--stdio")},
        pid_dirs=("/run/user",),
        wrapper_shell="/bin/busybox-sh",
    )
    m = SessionMachine(config, session_id="x")
    assert not m.subsystem("sftp").accepted
    plan = start(m, "subsystem", "backup")
    assert plan.command == ("/usr/bin/backupd", "--stdio")
    assert plan.argv[0] == "/bin/busybox-sh"
    assert plan.pid_files == ("/run/user/.kuberun-x.pid",)
    m = SessionMachine(config, session_id="y")
    m.pty_request("xterm", 1, 1)
    assert start(m, "shell").command == ("/bin/bash", "--login", "-i")
    m = SessionMachine(config, session_id="z")
    assert start(m, "exec", "id").command == ("/bin/bash", "-c", "id")


def test_bad_server_env_refuses_instead_of_crashing() -> None:
    m = SessionMachine(SessionConfig(), session_id="s", server_env={"BAD NAME": "x"})
    assert m.exec("ls") == Outcome(False, ())
    assert m.state is State.IDLE


@pytest.mark.parametrize("session_id", ["", "a/b", "../x", "a b", "x" * 65, "é"])
def test_unsafe_session_id(session_id: str) -> None:
    with pytest.raises(ValueError, match="session id"):
        SessionMachine(SessionConfig(), session_id=session_id)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shell_command": ()},
        {"command_shell": ()},
        {"pid_dirs": ()},
        {"pid_dirs": ("tmp",)},
        {"assume_signal_exits": frozenset({"BUS"})},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**kwargs)


def test_config_subsystems_are_frozen() -> None:
    source = {"sftp": ["/x"]}
    config = SessionConfig(subsystems=source)  # type: ignore[arg-type]
    source["sftp"].append("changed")
    assert config.subsystems["sftp"] == ("/x",)
    with pytest.raises(TypeError):
        config.subsystems["new"] = ("/y",)  # type: ignore[index]


def test_statistics_and_repr() -> None:
    m = make()
    assert repr(m) == "<SessionMachine [c1-0, IDLE, no tty]>"
    m.env("A", "1")
    m.pty_request("xterm", 80, 24)
    m.exec("ls")
    assert repr(m) == "<SessionMachine [c1-0, STARTING, exec, tty]>"
    m.started()
    m.signal("INT")
    m.exited(130)
    stats = m.statistics()
    assert stats.state is State.EXITED
    assert stats.kind == "exec"
    assert stats.tty
    assert stats.env_vars == 1
    assert stats.signals_sent == ("INT",)
    assert stats.exit_code == 130
    assert repr(m) == "<SessionMachine [c1-0, EXITED, exec, tty, exit 130]>"


def test_table_every_state_can_close() -> None:
    for state, row in TRANSITIONS.items():
        assert row[Input.CLOSED] is State.CLOSED, state
    # only task reports ever leave CLOSED's row unchanged; nothing reopens
    assert set(TRANSITIONS[State.CLOSED].values()) == {State.CLOSED}


def test_refusals_never_change_state() -> None:
    requests: list[Callable[[SessionMachine], Outcome]] = [
        lambda m: m.env("1", "x"),
        lambda m: m.pty_request("a\0", 1, 1),
        lambda m: m.signal("TERM"),
        lambda m: m.subsystem("nope"),
        lambda m: m.exec("\0"),
    ]
    for request in requests:
        m = make()
        before = (m.state, m.statistics())
        outcome = request(m)
        assert outcome == Outcome(False, ())
        assert (m.state, m.statistics()) == before


def test_actions_are_frozen_values() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Resize(1, 2).width = 3  # type: ignore[misc]
    assert Resize(1, 2) == Resize(1, 2)
    assert hash(SendExitSignal("TERM")) == hash(SendExitSignal("TERM", False, ""))
