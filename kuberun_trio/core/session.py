"""The SSH session channel as a sans-IO state machine (after h11's ``_state.py``).

Theory of operation
-------------------
One :class:`SessionMachine` per SSH session channel. It does no I/O: inputs are
the channel requests of RFC 4254 §6 (fed by asyncssh's synchronous
``SSHServerSession`` callbacks) and the progress reports of the trio task that
runs the pods/exec; each input returns an :class:`Outcome` -- ``accepted``
(the SSH "want reply" answer: success or channel failure) and the
:data:`Action`\\ s the task must carry out, in order.

States and transitions (:data:`TRANSITIONS` is the table; a request that is
not in the table for the current state is refused, never raised)::

    IDLE ──shell/exec/subsystem──▶ STARTING ──started──▶ RUNNING ──exited──▶ EXITED
      │  env, pty-req,               │  window-change,      │  window-change,      │
      │  window-change, eof          │  eof (deferred)      │  signal, eof         │
      │                              └──start_failed──▶ EXITED                     │
      └──────────── closed (from any state) ──────────────▶ CLOSED ◀───closed──────┘

* IDLE collects ``env`` and ``pty-req``. ``shell``/``exec``/``subsystem``
  builds an :class:`ExecPlan` (argv via :mod:`.shellwrap`, so env values are
  never parsed by a shell) and emits :class:`StartExec`.
* STARTING: the exec is being opened. A window change or EOF that arrives now
  is remembered and emitted (:class:`Resize`, :class:`CloseStdin`) on
  ``started()``.
* RUNNING: window changes become :class:`Resize` (tty only), EOF becomes
  :class:`CloseStdin`, ``signal`` becomes :class:`SendSignal` with a second
  exec (:class:`SignalPlan`). Like sshd, signals are refused for subsystems.
* ``exited(code)`` follows OpenSSH's sshd: *either* ``exit-signal`` *or*
  ``exit-status``, never both, then :class:`Close`.

Exit codes and signals: the Kubernetes exec status carries only an exit code,
and runtimes report a death by signal N as 128 + N -- exactly what a program
that calls ``exit(130)`` on purpose (shells, ``trap 'exit 130' INT``) reports
too. The rule: ``exit-signal NAME`` is sent when the code is 128 + N, N is an
SSH signal, and *either* the gateway itself delivered that signal in this
session (a client ``signal`` request) *or* NAME is in
``SessionConfig.assume_signal_exits`` (default ``{"KILL"}``: 137 is the
OOM killer / ``kill -9`` and practically never exited on purpose). Everything
else is ``exit-status CODE``; so a Ctrl-C typed into a tty (delivered by the
pty, not by us) gives ``exit-status 130``, which the OpenSSH client turns into
its own exit code 130, where a real exit-signal would give 255. ``core dumped``
is unknown and sent as false.

Inputs from the client never raise. Inputs from our own task in a state where
they cannot happen (``started()`` twice, ``exited()`` before any exec) are
bugs and raise :class:`SessionStateError`; the races that do happen
(``started``/``exited`` after the client closed the channel) are absorbed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, TypeAlias

import attrs

from ..errors import KuberunError
from . import shellwrap

Kind: TypeAlias = Literal["shell", "exec", "subsystem"]

AGENT_SOCKET_VARIABLE: Final = "SSH_AUTH_SOCK"
"""Where a forwarded agent's socket is named in a session's environment."""


class SessionStateError(KuberunError):
    """The gateway's own task reported something impossible in this state (a bug)."""


class State(enum.Enum):
    """Where a session channel is in its life."""

    IDLE = "IDLE"
    """Collecting env and pty requests; nothing runs yet."""
    STARTING = "STARTING"
    """StartExec was emitted; the pods/exec is being opened."""
    RUNNING = "RUNNING"
    """The exec stream is open."""
    EXITED = "EXITED"
    """The exit status (or failure) was reported; the channel is being closed."""
    CLOSED = "CLOSED"
    """The SSH channel is gone."""


class Input(enum.Enum):
    """Everything that can happen to a session channel."""

    ENV = "env"
    PTY = "pty-req"
    WINDOW_CHANGE = "window-change"
    SHELL = "shell"
    EXEC = "exec"
    SUBSYSTEM = "subsystem"
    SIGNAL = "signal"
    EOF = "eof"
    STARTED = "started"
    START_FAILED = "start_failed"
    EXITED = "exited"
    CLOSED = "closed"


_S, _I = State, Input
TRANSITIONS: Final[Mapping[State, Mapping[Input, State]]] = {
    _S.IDLE: {
        _I.ENV: _S.IDLE,
        _I.PTY: _S.IDLE,
        _I.WINDOW_CHANGE: _S.IDLE,
        _I.EOF: _S.IDLE,
        _I.SHELL: _S.STARTING,
        _I.EXEC: _S.STARTING,
        _I.SUBSYSTEM: _S.STARTING,
        _I.CLOSED: _S.CLOSED,
    },
    _S.STARTING: {
        _I.WINDOW_CHANGE: _S.STARTING,
        _I.EOF: _S.STARTING,
        _I.STARTED: _S.RUNNING,
        _I.START_FAILED: _S.EXITED,
        _I.EXITED: _S.EXITED,
        _I.CLOSED: _S.CLOSED,
    },
    _S.RUNNING: {
        _I.WINDOW_CHANGE: _S.RUNNING,
        _I.EOF: _S.RUNNING,
        _I.SIGNAL: _S.RUNNING,
        _I.EXITED: _S.EXITED,
        _I.CLOSED: _S.CLOSED,
    },
    _S.EXITED: {_I.WINDOW_CHANGE: _S.EXITED, _I.EOF: _S.EXITED, _I.CLOSED: _S.CLOSED},
    _S.CLOSED: {
        _I.WINDOW_CHANGE: _S.CLOSED,
        _I.EOF: _S.CLOSED,
        _I.STARTED: _S.CLOSED,
        _I.START_FAILED: _S.CLOSED,
        _I.EXITED: _S.CLOSED,
        _I.CLOSED: _S.CLOSED,
    },
}
"""state → input → next state. Missing entries: client requests are refused,
task reports raise :class:`SessionStateError`."""

_TASK_INPUTS: Final = frozenset({Input.STARTED, Input.START_FAILED, Input.EXITED})
_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_TERMINAL = 0xFFFF  # Kubernetes TerminalSize is uint16
_START_FAILURE_STATUS: Final = 255


# --------------------------------------------------------------------- plans


@attrs.frozen
class ExecPlan:
    """Everything the task needs to open the pods/exec for a session."""

    kind: Kind
    """``"shell"``, ``"exec"`` or ``"subsystem"``."""
    argv: tuple[str, ...]
    """The pods/exec ``command``: the :mod:`.shellwrap` wrapper around ``command``."""
    command: tuple[str, ...]
    """The argv the wrapper finally ``exec``\\ s (for logs)."""
    env: tuple[tuple[str, str], ...]
    """The variables the wrapper exports: the client's, overridden by the server's,
    overridden by ``TERM`` from the pty request (as sshd does)."""
    tty: bool
    """Allocate a terminal (a ``pty-req`` was accepted)."""
    term: str | None
    """The client's terminal type, or None."""
    width: int
    """Initial terminal columns (0 = unknown / no tty)."""
    height: int
    """Initial terminal rows (0 = unknown / no tty)."""
    stdin: bool
    stdout: bool
    stderr: bool
    """False with a tty: the terminal merges stderr into stdout."""
    container: str | None
    """The pod's container to exec in (None: the pod's only container)."""
    pid_files: tuple[str, ...]
    """PID-file candidates; the wrapper writes the first one it can."""

    @property
    def pid_file(self) -> str:
        """The preferred PID-file location."""
        return self.pid_files[0]


@attrs.frozen
class SignalPlan:
    """A second pods/exec that delivers a signal to a running session."""

    signal: str
    """The SSH signal name, e.g. ``"TERM"``."""
    argv: tuple[str, ...]
    """The pods/exec ``command``. Run it with ``stdin=False, tty=False`` and read
    stderr for the reason when it exits non-zero (1: kill failed, 3: no PID)."""
    container: str | None
    """Same container as the session's exec."""


# ------------------------------------------------------------------- actions


@attrs.frozen
class StartExec:
    """Open the pods/exec described by ``plan``; report started()/start_failed()."""

    plan: ExecPlan


@attrs.frozen
class Resize:
    """Send a terminal resize on the exec's resize channel."""

    width: int
    height: int


@attrs.frozen
class CloseStdin:
    """Half-close the exec's stdin (v5 close frame; v4 cannot)."""


@attrs.frozen
class SendSignal:
    """Run ``plan`` as a separate pods/exec (fire and forget; log failures)."""

    plan: SignalPlan


@attrs.frozen
class SendExitStatus:
    """Send ``exit-status`` (after draining the exec's output)."""

    code: int


@attrs.frozen
class SendExitSignal:
    """Send ``exit-signal`` (after draining the exec's output)."""

    name: str
    core_dumped: bool = False
    message: str = ""


@attrs.frozen
class SendStderr:
    """Write ``text`` to the channel's stderr (the gateway's own message)."""

    text: str


@attrs.frozen
class Close:
    """Close the SSH channel (EOF + close)."""


@attrs.frozen
class AbortExec:
    """The channel is gone: stop opening / close the exec stream now."""


Action: TypeAlias = (
    StartExec
    | Resize
    | CloseStdin
    | SendSignal
    | SendExitStatus
    | SendExitSignal
    | SendStderr
    | Close
    | AbortExec
)


class Outcome(NamedTuple):
    """What one input led to."""

    accepted: bool
    """The SSH reply: True = success, False = channel failure."""
    actions: tuple[Action, ...] = ()
    """What the session task must do, in this order."""


_REFUSED: Final = Outcome(False)
_OK: Final = Outcome(True)


# -------------------------------------------------------------------- config


def _frozen_subsystems(value: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({name: tuple(argv) for name, argv in value.items()})


@attrs.frozen
class SessionConfig:
    """How session requests become commands. Defaults match a stock sshd."""

    shell_command: tuple[str, ...] = ("/bin/sh",)
    """What a ``shell`` request runs (``shellCommand``)."""
    login_shell_args: tuple[str, ...] = ("-l",)
    """Appended to ``shell_command`` when a tty was requested (a login-ish shell)."""
    command_shell: tuple[str, ...] = ("/bin/sh", "-c")
    """An ``exec`` request runs ``command_shell + (command,)``, like sshd."""
    subsystems: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=lambda: {"sftp": ("/usr/lib/openssh/sftp-server",)},
        converter=_frozen_subsystems,
    )
    """Subsystem name → argv; other names are refused."""
    wrapper_shell: str = "/bin/sh"
    """The POSIX shell that runs the wrapper scripts."""
    pid_dirs: tuple[str, ...] = ("/tmp", "/dev/shm", "/var/tmp")
    """Where the wrapper tries to record the PID, in order."""
    max_env_vars: int = 256
    """Distinct client env names per channel; more are refused."""
    max_env_bytes: int = 64 * 1024
    """Total UTF-8 size of the client's ``NAME=VALUE`` pairs."""
    max_command_bytes: int = 64 * 1024
    """Longest ``exec`` command (it travels in the exec URL)."""
    deny_env: frozenset[str] = shellwrap.READONLY_SHELL_VARIABLES
    """Env names refused outright."""
    assume_signal_exits: frozenset[str] = frozenset({"KILL"})
    """Signals whose 128+N exit code is reported as exit-signal even if we did not send them."""
    hangup_on_close: bool = True
    """When the client closes a running channel, send HUP first (sshd's pty hangup)."""

    def __attrs_post_init__(self) -> None:
        if not self.shell_command or not self.command_shell:
            raise ValueError("shell_command and command_shell must not be empty")
        if not self.pid_dirs or not all(d.startswith("/") for d in self.pid_dirs):
            raise ValueError("pid_dirs must be absolute paths")
        if not self.assume_signal_exits <= shellwrap.SSH_SIGNALS.keys():
            raise ValueError("assume_signal_exits must be SSH signal names")


@attrs.frozen
class SessionStatistics:
    """A snapshot for logs and debugging."""

    state: State
    kind: Kind | None
    tty: bool
    env_vars: int
    signals_sent: tuple[str, ...]
    exit_code: int | None


# ------------------------------------------------------------------- machine


class SessionMachine:
    """One SSH session channel, from ``env`` to ``exit-status``. No I/O.

    ``session_id`` names the PID file and must be unique within the pod's
    lifetime (letters, digits, ``._-``). ``server_env`` is exported after the
    client's env (the server wins), ``TERM`` from the pty request last.
    """

    def __init__(
        self,
        config: SessionConfig,
        *,
        session_id: str,
        container: str | None = None,
        server_env: Mapping[str, str] | None = None,
    ) -> None:
        if not _SESSION_ID.fullmatch(session_id):
            raise ValueError(f"unsafe session id {session_id!r}")
        self._config = config
        self._session_id = session_id
        self._container = container
        self._server_env = dict(server_env or {})
        self._pid_files = shellwrap.pid_file_candidates(config.pid_dirs, session_id)
        self.state = State.IDLE
        self._env: dict[str, str] = {}
        self._pty = False
        self._term: str | None = None
        self._size = (0, 0)
        self._plan: ExecPlan | None = None
        self._pending_eof = False
        self._signals_sent: list[str] = []
        self._exit_code: int | None = None
        self.refusal: str | None = None
        """Why the latest refused client request was refused (for the audit log)."""

    # ---- bookkeeping

    @property
    def plan(self) -> ExecPlan | None:
        """The exec plan once shell/exec/subsystem was accepted."""
        return self._plan

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            state=self.state,
            kind=self._plan.kind if self._plan else None,
            tty=self._pty,
            env_vars=len(self._env),
            signals_sent=tuple(self._signals_sent),
            exit_code=self._exit_code,
        )

    def __repr__(self) -> str:
        parts = [self._session_id, self.state.value]
        if self._plan is not None:
            parts.append(self._plan.kind)
        parts.append("tty" if self._pty else "no tty")
        if self._exit_code is not None:
            parts.append(f"exit {self._exit_code}")
        return f"<SessionMachine [{', '.join(parts)}]>"

    def _step(self, event: Input) -> bool:
        """Move along the table; False if ``event`` is not allowed now."""
        nxt = TRANSITIONS[self.state].get(event)
        if nxt is None:
            if event in _TASK_INPUTS:
                raise SessionStateError(f"{event.value}() in state {self.state.value}")
            return False
        self.state = nxt
        return True

    def _allowed(self, event: Input) -> bool:
        return event in TRANSITIONS[self.state]

    def _refuse(self, reason: str) -> Outcome:
        self.refusal = reason
        return _REFUSED

    def _not_now(self, event: Input) -> Outcome:
        return self._refuse(f"{event.value} is not allowed in state {self.state.value}")

    # ---- client requests (RFC 4254 §6)

    def env(self, name: str, value: str) -> Outcome:
        """An ``env`` request. Refused after start, for bad names/values, over the caps."""
        if not self._allowed(Input.ENV):
            return self._not_now(Input.ENV)
        problem = self._env_problem(name, value)
        if problem is not None:
            return self._refuse(problem)
        self._step(Input.ENV)
        self._env[name] = value
        return _OK

    def _env_problem(self, name: str, value: str) -> str | None:
        """Why ``name=value`` cannot be set, or None if it can."""
        cfg = self._config
        if not shellwrap.valid_env_name(name):
            return "invalid variable name"
        if name in cfg.deny_env:
            return "variable may not be set"
        if not shellwrap.argv_safe(value):
            return "value holds a NUL or invalid text"
        if name not in self._env and len(self._env) >= cfg.max_env_vars:
            return f"more than {cfg.max_env_vars} variables"
        pairs = dict(self._env, **{name: value})
        size = sum(len(k) + 1 + len(v.encode("utf-8")) for k, v in pairs.items())
        if size > cfg.max_env_bytes:
            return f"variables total {size} bytes, over the limit of {cfg.max_env_bytes}"
        return None

    def pty_request(
        self,
        term: str,
        width: int,
        height: int,
        pixel_width: int = 0,
        pixel_height: int = 0,
        modes: Mapping[int, int] | None = None,
    ) -> Outcome:
        """A ``pty-req``. Pixel sizes and terminal modes cannot cross pods/exec
        (the runtime's pty defaults apply); they are accepted and dropped."""
        del pixel_width, pixel_height, modes
        if not self._allowed(Input.PTY) or self._pty:
            return self._refuse("a pty was already requested" if self._pty
                                else f"pty-req is not allowed in state {self.state.value}")
        if not shellwrap.argv_safe(term) or len(term) > 256:
            return self._refuse("invalid terminal type")
        self._step(Input.PTY)
        self._pty = True
        self._term = term or None  # sshd: an empty TERM means "none"
        self._size = _clamp(width, height)
        return _OK

    def window_change(
        self, width: int, height: int, pixel_width: int = 0, pixel_height: int = 0
    ) -> Outcome:
        """A ``window-change`` (want-reply is always false: never a failure).

        ``accepted`` only tells whether it applied: False without a pty.
        """
        del pixel_width, pixel_height
        if not self._pty or not self._allowed(Input.WINDOW_CHANGE):
            return _REFUSED
        self._step(Input.WINDOW_CHANGE)
        size = _clamp(width, height)
        if size == self._size:
            return _OK
        self._size = size
        if self.state is State.RUNNING:
            return Outcome(True, (Resize(*size),))
        return _OK  # IDLE: goes into the plan; STARTING: sent on started()

    def shell(self) -> Outcome:
        """A ``shell`` request."""
        argv = self._config.shell_command
        if self._pty:
            argv = argv + self._config.login_shell_args
        return self._start("shell", argv)

    def exec(self, command: str) -> Outcome:
        """An ``exec`` request: runs ``command_shell + (command,)``, like sshd."""
        if not shellwrap.argv_safe(command):
            return self._refuse("command holds a NUL or invalid text")
        size = len(command.encode("utf-8", "surrogateescape"))
        if size > self._config.max_command_bytes:
            return self._refuse(f"command is {size} bytes, over the limit of "
                                f"{self._config.max_command_bytes}")
        return self._start("exec", (*self._config.command_shell, command))

    def subsystem(self, name: str) -> Outcome:
        """A ``subsystem`` request; only configured names are accepted."""
        argv = self._config.subsystems.get(name)
        if argv is None:
            return self._refuse("unknown subsystem")
        return self._start("subsystem", argv)

    def _start(self, kind: Kind, command: tuple[str, ...]) -> Outcome:
        if not self._allowed(Input(kind)):
            return self._not_now(Input(kind))
        env = dict(self._env)
        env.update(self._server_env)
        if self._term is not None:
            env["TERM"] = self._term
        try:
            argv = shellwrap.wrap_argv(
                self._pid_files, env.items(), command, shell=self._config.wrapper_shell
            )
        except ValueError:  # a bad server_env or config entry: refuse, do not crash
            return self._refuse("the command cannot be wrapped (invalid environment)")
        self._step(Input(kind))
        width, height = self._size
        self._plan = ExecPlan(
            kind=kind,
            argv=argv,
            command=command,
            env=tuple(env.items()),
            tty=self._pty,
            term=self._term,
            width=width,
            height=height,
            stdin=True,
            stdout=True,
            stderr=not self._pty,
            container=self._container,
            pid_files=self._pid_files,
        )
        return Outcome(True, (StartExec(self._plan),))

    def signal(self, name: str) -> Outcome:
        """A ``signal`` request: refused before the exec runs, for subsystems
        (as sshd does) and for names outside RFC 4254 §6.10."""
        if not self._allowed(Input.SIGNAL):
            return self._not_now(Input.SIGNAL)
        if name not in shellwrap.SSH_SIGNALS:
            return self._refuse("unknown signal")
        assert self._plan is not None
        if self._plan.kind == "subsystem":
            return self._refuse("signals are not delivered to subsystems")
        self._step(Input.SIGNAL)
        return Outcome(True, (self._send_signal(name),))

    def _send_signal(self, name: str) -> SendSignal:
        self._signals_sent.append(name)
        argv = shellwrap.signal_argv(name, self._pid_files, shell=self._config.wrapper_shell)
        return SendSignal(SignalPlan(signal=name, argv=argv, container=self._container))

    def terminate(self) -> SignalPlan | None:
        """The gateway's own SIGTERM (a session time limit): the plan, or None if no
        process runs. Unlike a client ``signal`` it also reaches subsystems."""
        if self.state is not State.RUNNING:
            return None
        return self._send_signal("TERM").plan

    def eof(self) -> Outcome:
        """The client sent EOF: close the exec's stdin (now, or once it runs)."""
        if not self._step(Input.EOF):
            return _REFUSED
        if self.state is State.RUNNING:
            return Outcome(True, (CloseStdin(),))
        if self.state in (State.IDLE, State.STARTING):
            self._pending_eof = True
        return _OK

    def closed(self) -> Outcome:
        """The SSH channel is gone (client close or connection lost)."""
        before = self.state
        self._step(Input.CLOSED)
        if before is State.RUNNING:
            hup = (self._send_signal("HUP"),) if self._config.hangup_on_close else ()
            return Outcome(True, (*hup, AbortExec()))
        if before is State.STARTING:
            return Outcome(True, (AbortExec(),))
        return _OK

    # ---- agent forwarding (gateway/agent.py)

    def agent_socket(self, path: str) -> None:
        """Export ``SSH_AUTH_SOCK=path`` in the exec (after every other variable, as
        sshd does). Called by the session task before it opens the exec; a no-op in
        any state but STARTING (the client may have closed the channel meanwhile)."""
        if self.state is not State.STARTING or self._plan is None:
            return
        env = (*((k, v) for k, v in self._plan.env if k != AGENT_SOCKET_VARIABLE),
               (AGENT_SOCKET_VARIABLE, path))
        argv = shellwrap.wrap_argv(self._pid_files, env, self._plan.command,
                                   shell=self._config.wrapper_shell)
        self._plan = attrs.evolve(self._plan, argv=argv, env=env)

    # ---- reports from the session task

    def started(self) -> Outcome:
        """The pods/exec stream is open."""
        if self.state is State.CLOSED:
            return Outcome(False, (AbortExec(),))  # raced with the client's close
        self._step(Input.STARTED)
        actions: list[Action] = []
        assert self._plan is not None
        if self._plan.tty and self._size != (self._plan.width, self._plan.height):
            actions.append(Resize(*self._size))
        if self._pending_eof:
            actions.append(CloseStdin())
        return Outcome(True, tuple(actions))

    def start_failed(self, reason: str) -> Outcome:
        """The exec could not be opened: tell the client on stderr, exit 255."""
        if self.state is State.CLOSED:
            return _REFUSED
        self._step(Input.START_FAILED)
        self._exit_code = _START_FAILURE_STATUS
        newline = "\r\n" if self._pty else "\n"
        text = f"kuberun: {reason}{newline}"
        return Outcome(True, (SendStderr(text), SendExitStatus(_START_FAILURE_STATUS), Close()))

    def exited(self, exit_code: int, signal: str | None = None) -> Outcome:
        """The command ended with ``exit_code`` (the Kubernetes exec status).

        ``signal`` overrides the inference when the caller knows the process
        died of a signal. See the module docstring for the rule.
        """
        if not 0 <= exit_code < 2**32:
            raise ValueError(f"exit code out of range: {exit_code}")
        if self.state is State.CLOSED:
            return _REFUSED
        self._step(Input.EXITED)
        self._exit_code = exit_code
        name = signal if signal is not None else self._death_signal(exit_code)
        if name is not None:
            return Outcome(True, (SendExitSignal(name), Close()))
        return Outcome(True, (SendExitStatus(exit_code), Close()))

    def _death_signal(self, code: int) -> str | None:
        name = shellwrap.SIGNAL_BY_NUMBER.get(code - 128)
        if name is None:
            return None
        if name in self._signals_sent or name in self._config.assume_signal_exits:
            return name
        return None


def _clamp(width: int, height: int) -> tuple[int, int]:
    return (max(0, min(width, _MAX_TERMINAL)), max(0, min(height, _MAX_TERMINAL)))
