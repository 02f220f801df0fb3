"""The session-channel side of the SSH gateway: one channel, one exec in the pod.

Theory of operation
-------------------
asyncssh calls :class:`GatewaySession` (one per session channel, opened by
:class:`~.sshserver.GatewaySSHServer`) synchronously from its protocol machinery.
Those callbacks never block and never await: they feed the sans-IO
:class:`~kuberun_trio.core.session.SessionMachine`, answer the SSH request with its
verdict, and hand work to the trio side through a :class:`ConnectionPortal` -- plain
synchronous calls (``nursery.start_soon``, ``Event.set``, ``CancelScope.cancel``) that
are safe here because trio-asyncio runs asyncio callbacks on trio's own thread. This
module knows nothing of connections: :mod:`.sshserver` imports it, never the reverse.

The trio side owns every lifetime: a connection task (its nursery owns the
pod) and one task per session channel. A session task awaits
:meth:`GatewaySession.serve_exec` exactly once through the bridge; inside,
the exec stream is pumped on the asyncio side (:mod:`.execstream`), so bytes
never cross the boundary one chunk at a time. Flow control is end to end:

* pod → client: ``chan.write``; asyncssh calls :meth:`pause_writing` when the
  client's window is full, and :meth:`wait_writable` holds the exec reader;
* client → pod: ``data_received`` queues frames on the exec stream, which
  calls ``chan.pause_reading()`` above its high-water mark. asyncssh then
  buffers what the client may still send, but re-opens the full window on
  every delivery; :class:`GatewayChannel` re-opens it only for delivered data,
  so a paused channel holds at most one window (2 MiB).

Env requests: asyncssh accepts every ``env`` request and has no callback for
it, so :class:`GatewayChannel` overrides its request handler to ask the
session machine (refusing env after start and invalid names with a channel
failure). The same goes for ``signal``, whose default handler always succeeds.
Each session's signals pass the :class:`~kuberun_trio.core.limits.SignalBucket`
its connection hands it (:mod:`kuberun_trio.core.limits` decides).

Refused channel requests are logged with the session machine's reason. The ``x11-req``
channel request always fails with a ``request-refused`` line; ``auth-agent-req`` is the
connection's to decide (:mod:`kuberun_trio.gateway.agent`; refused and logged the same
way unless enabled). Session payload bytes are counted on the audit record where they
already flow (one integer addition per chunk); a recorded session
(:mod:`kuberun_trio.recording`) also hands each chunk, unchanged, to its
:class:`~kuberun_trio.recording.SessionRecording` at the same places (a bounded append).
What a client reads on stderr after a failure is
:func:`~kuberun_trio.errors.client_message` -- never URLs, addresses or library text;
those go to the ``exec-failed`` / ``exec-ended`` log lines.

:class:`ExecTarget` says where any exec goes; :func:`run_command` runs a short command
without stdin there (a signal's second exec) and keeps a bounded amount of its output
(:class:`_Collector`, also used by :mod:`.podfiles`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import asyncssh
import attrs
from asyncssh.packet import SSHPacket

from ..core.audit import ConnectionAudit
from ..core.forwarding import FORWARDING_DISABLED
from ..core.limits import Refusal as LimitRefusal
from ..core.limits import SignalBucket
from ..core.session import (
    AbortExec,
    Action,
    Close,
    CloseStdin,
    Outcome,
    Resize,
    SendExitSignal,
    SendExitStatus,
    SendSignal,
    SendStderr,
    SessionMachine,
    SignalPlan,
    StartExec,
)
from ..errors import client_message, status_reason
from ..observe.metrics import ByteCounts, GatewayMetrics, unobserved
from .bridge import run_trio, translate
from .execstream import ExecResult, ExecStream, open_exec
from .sshforward import ForwardSession, reopen_window

if TYPE_CHECKING:
    from ..recording import SessionRecording

"""The reason every port, agent and X11 forwarding request is refused with."""

PENDING_INPUT_LIMIT = 256 * 1024
"""Bytes of client input held while the exec is being opened before reading pauses."""


@attrs.frozen
class ExecTarget:
    """Where a session's exec goes."""

    ws_client: Any
    """kubernetes-asyncio ``WsApiClient`` (asyncio side)."""
    namespace: str
    pod: str
    container: str
    pod_loss: Callable[[float], Awaitable[str | None]] | None = None
    """Trio-flavoured: waits up to N seconds for the pod-loss watcher and returns why
    the pod is gone, or None. Asked when a stream ends without a status or with 137
    (SIGKILL), which is what eviction and a killed pod look like from the exec."""
    throttle: Callable[[], Awaitable[None]] | None = None
    """Asyncio-flavoured: waits for the API client's ``qps``/``burst`` rate limiter;
    awaited before every exec open (sessions and signals alike)."""
    metrics: GatewayMetrics | None = None
    """Where exec starts are counted (None: nowhere in particular)."""
    open_timeout: float | None = None
    """Seconds the API server has to open an exec stream (``timeouts.commandStart``)."""


KILLED = 137
"""128 + SIGKILL: the exit code of every process of an evicted or killed pod."""
POD_LOSS_WAIT = 1.0
"""Seconds a session ending like that waits for the pod-loss watcher's verdict."""


class ConnectionPortal(Protocol):
    """What an SSH connection asks of the trio core. All methods are synchronous."""

    def new_session(self, chan_id: int) -> SessionMachine:
        """A machine for a new session channel (refuse by raising ``ChannelOpenError``)."""

    def submit(self, session: GatewaySession) -> None:
        """Start the session's exec as soon as the pod is ready."""

    def send_signal(self, session: GatewaySession, plan: SignalPlan) -> None:
        """Run ``plan`` (a second exec) in the connection's nursery."""

    def closed(self) -> None:
        """The SSH connection is gone."""

    def submit_forward(self, forward: ForwardSession) -> None:
        """Serve (or refuse) a direct-tcpip channel as soon as the pod is ready."""
    def agent_requested(self, session: GatewaySession) -> str | None:
        """``auth-agent-req@openssh.com`` on ``session``: None accepts, else why not."""


class GatewayChannel(asyncssh.SSHServerChannel):  # type: ignore[type-arg]
    """A server channel that lets the session machine decide ``env`` and ``signal``,
    and whose receive window never re-opens over data it still buffers."""

    _session: GatewaySession

    def _deliver_data(self, data: bytes, datatype: asyncssh.DataType) -> None:
        # (seen without it: 270 MiB buffered for a 1 GiB upload into a slow pod)
        reopen_window(self)
        if self._session is not None:  # binary channel (encoding=None): no decoding
            self._session.data_received(data, datatype)

    def _process_env_request(self, packet: SSHPacket) -> bool:
        key, value = packet.get_string(), packet.get_string()
        packet.check_end()
        try:
            name, text = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            self._session.audit.refused("env", "name or value is not UTF-8",
                                        env_name=key[:256].decode("utf-8", "replace"))
            return False
        return self._session.env_requested(name, text)

    def _process_signal_request(self, packet: SSHPacket) -> bool:
        raw = packet.get_string()
        packet.check_end()
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            self._session.audit.refused("signal", "signal name is not ASCII")
            return False
        return self._session.signal_requested(name)

    def _process_x11_req_request(self, packet: SSHPacket) -> bool:
        self._session.audit.refused("x11-forwarding", FORWARDING_DISABLED)
        return False

    def _process_auth_agent_req_at_openssh_dot_com_request(  # type: ignore[override]
            self, packet: SSHPacket) -> bool:
        packet.check_end()
        return self._session.agent_requested()


class GatewaySession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One session channel: callbacks in, actions out, and the exec pump."""

    def __init__(self, portal: ConnectionPortal, machine: SessionMachine,
                 audit: ConnectionAudit | None = None, *,
                 signals: SignalBucket | None = None,
                 refused: Callable[[LimitRefusal], None] | None = None,
                 on_close: Callable[[], None] | None = None,
                 counts: ByteCounts | None = None) -> None:
        self.portal = portal
        self.machine = machine
        self.audit = audit or ConnectionAudit("?", "?")
        """The connection's audit record: refusals are logged there, bytes counted."""
        self._signals = signals
        self._refused = refused or (lambda refusal: None)
        self._on_close = on_close
        self._counts = counts if counts is not None else ByteCounts()
        """Channel bytes of the whole gateway, counted with plain adds (read at scrape time)."""
        self.abort: Callable[[], None] = lambda: None
        """Set by the trio session task: cancels it (the channel is gone)."""
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._stream: ExecStream | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._finished = False
        self._noticed: set[str] = set()
        self._ending: str | None = None
        self.recording: SessionRecording | None = None
        """Set by the connection while the session is recorded (``audit.enable``)."""

    def __repr__(self) -> str:
        return f"<GatewaySession {self.machine!r}>"

    # -- asyncssh callbacks ---------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def env_requested(self, name: str, value: str) -> bool:
        return self._answer("env", self.machine.env(name, value), env_name=name[:256],
                            value_bytes=len(value.encode("utf-8", "surrogateescape")))

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        width, height, pw, ph = term_size
        outcome = self.machine.pty_request(term_type, width, height, pw, ph, dict(term_modes))
        return self._answer("pty-req", outcome, term=term_type[:64])

    def shell_requested(self) -> bool:
        return self._answer("shell", self.machine.shell())

    def exec_requested(self, command: str) -> bool:
        outcome = self.machine.exec(command)
        if outcome.accepted:
            return self._apply(outcome)
        return self._answer("exec", outcome, **self.audit.policy.command_fields(command))

    def subsystem_requested(self, subsystem: str) -> bool:
        return self._answer("subsystem", self.machine.subsystem(subsystem),
                            subsystem=subsystem[:64])

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        self._apply(self.machine.window_change(width, height, pixwidth, pixheight))

    def signal_requested(self, name: str) -> bool:
        if self._signals is not None:
            refusal = self._signals.take(time.monotonic())
            if refusal is not None:  # refused, not queued: the client sees a channel failure
                self._refused(refusal)
                return False
        return self._answer("signal", self.machine.signal(name), signal=name[:32])

    def break_received(self, msec: int) -> bool:
        return False

    def agent_requested(self) -> bool:
        """``auth-agent-req@openssh.com``: the connection decides (gateway/agent.py)."""
        decide = getattr(self.portal, "agent_requested", None)
        reason = decide(self) if decide is not None else FORWARDING_DISABLED
        if reason is not None:
            self.audit.refused("agent-forwarding", reason)
            return False
        return True

    @property
    def ssh_connection(self) -> Any:
        """The SSH connection this channel belongs to (None once the channel closed)."""
        return self._chan.get_connection() if self._chan is not None else None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.audit.bytes_from_client += len(data)
        self._counts.to_pod += len(data)
        if self.recording is not None:
            self.recording.stdin(data)
        if self._stream is not None:
            self._stream.send_stdin(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > PENDING_INPUT_LIMIT and self._chan is not None:
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        self._apply(self.machine.eof())
        return True  # stay half-open: output and the exit status still flow

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._apply(self.machine.closed())
        self._chan = None
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    # -- OutputSink for the exec pump --------------------------------------
    def write_stdout(self, data: bytes) -> None:
        if self._chan is not None:
            self.audit.bytes_to_client += len(data)
            self._counts.from_pod += len(data)
            if self.recording is not None:
                self.recording.stdout(data)
            self._chan.write(data)

    def write_stderr(self, data: bytes) -> None:
        if self._chan is not None:
            self.audit.bytes_to_client += len(data)
            self._counts.from_pod += len(data)
            if self.recording is not None:
                self.recording.stderr(data)
            self._chan.write_stderr(data)

    async def wait_writable(self) -> None:
        await self._writable.wait()

    # -- actions ---------------------------------------------------------------
    def _answer(self, request: str, outcome: Outcome, **fields: Any) -> bool:
        """Carry out ``outcome``; a refusal is logged with the machine's reason."""
        if not outcome.accepted:
            self.audit.refused(request, self.machine.refusal or "refused", **fields)
        return self._apply(outcome)

    def _apply(self, outcome: Outcome) -> bool:
        for action in outcome.actions:
            self._do(action)
        return outcome.accepted

    def _do(self, action: Action) -> None:
        chan = self._chan
        if isinstance(action, StartExec):
            self.portal.submit(self)
        elif isinstance(action, Resize):
            if self.recording is not None:
                self.recording.resize(action.width, action.height)
            if self._stream is not None:
                self._stream.resize(action.width, action.height)
        elif isinstance(action, CloseStdin):
            if self._stream is not None:
                self._stream.close_stdin()
        elif isinstance(action, SendSignal):
            self.portal.send_signal(self, action.plan)
        elif isinstance(action, AbortExec):
            self.abort()
        elif chan is None:
            return
        elif isinstance(action, SendStderr):
            self.write_stderr(action.text.encode())
        elif isinstance(action, SendExitStatus):
            chan.exit(action.code)
        elif isinstance(action, SendExitSignal):
            chan.exit_with_signal(action.name, action.core_dumped, action.message)
        elif isinstance(action, Close):
            chan.close()

    # -- called by the trio session task (through the bridge) --------------
    async def serve_exec(self, target: ExecTarget) -> ExecResult | None:
        """Open the exec, pump it to the end, report the exit. Asyncio-flavoured."""
        plan = self.machine.plan
        assert plan is not None, "serve_exec before the session was started"
        metrics = target.metrics or unobserved()
        started = time.monotonic()
        try:
            stream = await open_exec(
                target.ws_client, target.namespace, target.pod, plan.container or target.container,
                plan.argv, tty=plan.tty, stdin=plan.stdin, throttle=target.throttle,

                open_within=target.open_timeout)
        except Exception as exc:  # the error boundary of one session
            metrics.api_request("create", "pods/exec", getattr(exc, "status", None) or None)
            # The client hears a short reason; the detail (URLs, library text) is logged.
            ours = translate(exc) or exc
            told = client_message(ours)
            self.audit.emit(logging.WARNING, "exec-failed", "cannot start the command in "
                            "pod %s: %s", target.pod, ours, pod=target.pod, reason=told,
                            error=f"{type(exc).__name__}: {ours}")
            self.fail(f"cannot start the command in pod {target.pod}: {told}")
            return None
        metrics.api_request("create", "pods/exec", 101)
        metrics.exec_started(time.monotonic() - started)
        self._stream = stream
        chan = self._chan
        if chan is not None:
            stream.on_pause, stream.on_resume = chan.pause_reading, chan.resume_reading
        if plan.tty and plan.width and plan.height:
            stream.resize(plan.width, plan.height)
        while self._pending:
            stream.send_stdin(self._pending.pop(0))
        if self._pending_bytes > PENDING_INPUT_LIMIT and chan is not None:
            chan.resume_reading()
        self._pending_bytes = 0
        self._apply(self.machine.started())
        result = await stream.run(self)
        if self._ending is not None:  # the gateway ended it (a time limit): 255, as sshd
            self.fail(self._ending)
            return result
        if result.exit_code in (None, KILLED) and target.pod_loss is not None:
            reason = await run_trio(target.pod_loss, POD_LOSS_WAIT)
            if reason is not None:  # the pod is gone: say so, not "killed by a signal"
                self.fail(reason)
                return result
        if result.exit_code is None:  # the status message may name nodes: log it only
            self.audit.emit(logging.WARNING, "exec-ended", "the command's stream in pod %s "
                            "ended without an exit status: %s", target.pod,
                            result.message or "(no status)", pod=target.pod,
                            reason=result.reason or "NoStatus", error=result.message)
            shown = status_reason(result.reason)
            self.fail("the command's stream ended without an exit status"
                      + (f" ({shown})" if shown else ""))
        else:
            self._apply(self.machine.exited(result.exit_code))
        return result

    def fail(self, message: str) -> None:
        """End the session with ``message`` on stderr (and exit status 255).

        A message this session was already told (:meth:`notice`) is not repeated.
        """
        if self._finished:
            return
        self._finished = True
        from ..core.session import State

        told = message in self._noticed
        if self.machine.state in (State.STARTING,):
            self._apply(self.machine.start_failed(message))
        elif self.machine.state is State.RUNNING:
            if not told:
                crlf = "\r\n" if self.machine.plan and self.machine.plan.tty else "\n"
                self._do(SendStderr(f"kuberun: {message}{crlf}"))
            self._apply(self.machine.exited(255))
        elif self._chan is not None:
            if not told:
                self._do(SendStderr(f"kuberun: {message}\n"))
            self._chan.exit(255)

    def end_soon(self, message: str) -> None:
        """The gateway is ending this session: tell the client now; when the process
        exits, report ``message`` (not repeated) and exit status 255."""
        self.notice(message)
        self._ending = message

    def notice(self, message: str) -> None:
        """Write ``message`` on stderr without ending the session (e.g. shutdown ahead)."""
        self._noticed.add(message)
        crlf = "\r\n" if self.machine.plan and self.machine.plan.tty else "\n"
        self.write_stderr(f"kuberun: {message}{crlf}".encode())


class _Collector:
    """An :class:`~.execstream.OutputSink` that keeps (a bounded amount of) output."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._limit = limit

    def write_stdout(self, data: bytes) -> None:
        self.stdout += data[: max(0, self._limit - len(self.stdout))]

    def write_stderr(self, data: bytes) -> None:
        self.stderr += data[: max(0, self._limit - len(self.stderr))]

    async def wait_writable(self) -> None:
        return None


async def run_command(target: ExecTarget, argv: tuple[str, ...],
                      container: str | None = None) -> ExecResult:
    """Run ``argv`` in the pod without stdin; the result's message holds stderr on failure."""
    stream = await open_exec(target.ws_client, target.namespace, target.pod,
                             container or target.container, argv, tty=False, stdin=False,
                             throttle=target.throttle,

                             open_within=target.open_timeout)
    sink = _Collector()
    result = await stream.run(sink)
    if result.exit_code != 0 and sink.stderr:
        return ExecResult(result.exit_code, sink.stderr.decode(errors="replace").strip(),
                          result.reason)
    return result
