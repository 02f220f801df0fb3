"""The SSH side of the gateway: asyncssh callbacks feeding the trio core.

Theory of operation
-------------------
asyncssh calls :class:`GatewaySSHServer` (one per TCP connection) and
:class:`GatewaySession` (one per session channel) synchronously from its
protocol machinery. Those callbacks never block and never await: they feed
the sans-IO :class:`~kuberun_trio.core.session.SessionMachine`, answer the
SSH request with its verdict, and hand work to the trio side through a
:class:`ConnectionPortal` -- plain synchronous calls (``nursery.start_soon``,
``Event.set``, ``CancelScope.cancel``) that are safe here because trio-asyncio
runs asyncio callbacks on trio's own thread.

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

Limits (:mod:`kuberun_trio.core.limits` decides, this module carries out):
a TCP connection is admitted in :meth:`GatewaySSHServer.connection_made` or
disconnected right after the version exchange, before any key exchange is
computed; the login grace timer runs from there to ``auth_completed``, where
the login is counted for its user (or refused with a disconnect); session
channels over ``maxSessions`` fail to open with the reason; each session's
signals pass a :class:`~kuberun_trio.core.limits.SignalBucket`. Keepalive
probes are asyncssh's (``keepalive_interval``/``keepalive_count_max``).

Per-connection settings (``GatewayOptions.configure``, :mod:`kuberun_trio.core.connsettings`):
once a credential is proven and the user's limits passed, :meth:`GatewaySSHServer._configured`
resets the login's throttle keys and awaits the hook before the client hears "logged in",
so every channel sees :attr:`GatewaySSHServer.settings`; a refusal disconnects with the
reason, as a per-user limit does.

Audit: every TCP connection gets a :class:`~kuberun_trio.core.audit.ConnectionAudit`
on ``connection_made`` (``connection-accepted``); ``connection_lost`` before login writes
``pre-auth-end``. Refused channel requests are logged with the session machine's reason.
Forwarding: with ``security.forwarding.forwardingMode: enable`` a ``direct-tcpip`` open
(``ssh -L``/``-D``) goes to :func:`.sshforward.accept_forward` and the trio side; otherwise
it is refused with ``administratively prohibited`` (not asyncssh's misleading
``Connection refused``). ``direct-streamlocal`` opens, ``tcpip-forward`` (``ssh -R``:
Kubernetes has no reverse port-forward) / ``streamlocal-forward`` and the ``x11-req``
channel request always fail -- each with a ``request-refused`` line. ``auth-agent-req`` is
the connection's to decide (:mod:`kuberun_trio.gateway.agent`; refused and logged the same
way unless enabled). Session payload bytes are counted on the audit record where they
already flow (one integer addition per chunk); a recorded session
(:mod:`kuberun_trio.recording`) also hands each chunk, unchanged, to its
:class:`~kuberun_trio.recording.SessionRecording` at the same places (a bounded append).
What a client reads on stderr after a failure is
:func:`~kuberun_trio.errors.client_message` -- never URLs, addresses or library text;
those go to the ``exec-failed`` / ``exec-ended`` log lines.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import asyncssh
import attrs
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED
from asyncssh.packet import SSHPacket
from asyncssh.public_key import decode_ssh_public_key

from ..core.audit import AuditPolicy, ConnectionAudit, format_address
from ..core.auth import AuthResult
from ..core.connsettings import (
    CANNOT_CONFIGURE,
    ConfigRefused,
    Configure,
    ConnectionSettings,
    LoginInfo,
)
from ..core.forwarding import REVERSE_REFUSED, STREAMLOCAL_REFUSED, ForwardingPolicy
from ..core.limits import Admission, SignalBucket, Ticket, open_fds, report_refusal
from ..core.limits import Refusal as LimitRefusal
from ..core.refusals import Refusal
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
from .linger import Lingering, linger_on_abort
from .sshforward import ForwardSession, accept_forward, reopen_window

if TYPE_CHECKING:
    from ..gateway.login import LoginGate  # the trio-side gate it is handed
    from ..recording import SessionRecording

log = logging.getLogger(__name__)

FORWARDING_DISABLED = "forwarding is disabled on this gateway"
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


DROP_AFTER = 2.0
"""Seconds a connection from a penalized address is held (never read) before it is
closed: an attacker whose connections were closed at once would only reconnect faster."""

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
                plan.argv, tty=plan.tty, stdin=plan.stdin, throttle=target.throttle)
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


class GatewayServerConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection, telling a signed public key request from a query.

    ``SSHServer.validate_public_key`` is asked the same question for both; only here is it
    known whether a signature came along, and the limiter's turn must come before the key
    and its signature are checked (:meth:`GatewaySSHServer.key_attempt`).
    """

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes,
                                  signature: bytes) -> bool:
        owner = self._owner
        assert isinstance(owner, GatewaySSHServer)
        validate = functools.partial(asyncssh.SSHServerConnection.validate_public_key, self)
        return await owner.key_attempt(username, key_data, msg, signature, validate)


class GatewaySSHServer(asyncssh.SSHServer):
    """One SSH connection: authentication hooks and session channels.

    Authentication goes through the gateway's :class:`~kuberun_trio.gateway.login.LoginGate`
    (limiter turn first, then the credential; only a proven login completes it). With an
    :class:`~kuberun_trio.core.limits.Admission`, the connection is admitted (or dropped
    at once) when TCP connects, must log in within ``loginGraceTime``, is counted for its
    user once the login is proven, and opens sessions and signals within limits.
    """

    _chan_ids = itertools.count()

    def __init__(self, make_portal: Callable[[GatewaySSHServer], ConnectionPortal],
                 auth: LoginGate, connection_id: str, admission: Admission | None = None, *,
                 audit_policy: AuditPolicy | None = None,
                 metrics: GatewayMetrics | None = None,
                 forwarding: ForwardingPolicy | None = None,
                 lingering: Lingering | None = None,
                 configure: Configure | None = None) -> None:
        self._make_portal = make_portal
        self.forwarding = forwarding or ForwardingPolicy()
        """``security.forwarding``: whether direct-tcpip channels are served at all."""
        self.lingering = lingering
        """Where this connection's socket goes to close gracefully (None: asyncssh's abort)."""
        self._configure = configure
        self.settings: ConnectionSettings | None = None
        """The connection's own settings (``configure``'s answer), once logged in."""
        self.metrics = metrics or unobserved()
        self._failed_auths = 0
        """Failed login attempts (a connection that ends with some counts as rejected)."""
        """Credentials refused on this connection."""
        self.auth = auth
        """The gateway's login gate (trio-flavoured)."""
        self.connection_id = connection_id
        self.audit = ConnectionAudit(connection_id, "?", audit_policy)
        """The connection's audit record (its address is filled in on connection_made)."""
        self.auth_result: Any = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.portal: ConnectionPortal | None = None
        self.username = ""
        """The SSH username; after login, the authenticated user's name."""
        self.peer: tuple[str, int] = ("", 0)
        self.login = auth.connection(connection_id, "", 0)
        self._key_check: AuthResult | Refusal | None = None
        self._signed = False
        self.admission = admission
        self.ticket: Ticket | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._end_reason: str | None = None
        """Why the gateway itself ended the connection before login (for ``pre-auth-end``)."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        conn.__class__ = GatewayServerConnection  # overrides one method, adds no state
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.audit.remote_address = format_address(*self.peer)
        self.audit.accepted()
        self.audit.on_refused = self.metrics.request_refused
        self.metrics.connection_opened()
        self.login = self.auth.connection(self.connection_id, *self.peer)
        if not self.auth.admit_connection(self.login):  # before the costly key exchange
            self._end_reason = "dropped: too many failed logins from this address"
            self.metrics.connection_rejected("auth-throttled")
            transport = conn._transport  # asyncssh offers no public pause
            if transport is not None:
                transport.pause_reading()
            asyncio.get_running_loop().call_later(DROP_AFTER, conn.abort)
            return
        if self.lingering is not None:  # from now on the client reads why it is closed
            linger_on_abort(conn, self.lingering)
        if self.admission is None:
            return
        verdict = self.admission.accept(self.peer[0], open_fds())
        if isinstance(verdict, LimitRefusal):
            # Called before asyncssh sends its version: disconnect right after it, before
            # any key exchange is computed (MSG_DISCONNECT may precede KEXINIT).
            self.refused(verdict)
            asyncio.get_running_loop().call_soon(self._disconnect, verdict)
            return
        self.ticket = verdict
        grace = self.admission.limits.login_grace_time
        self._grace_timer = asyncio.get_running_loop().call_later(
            grace, self._grace_expired, grace)

    def _grace_expired(self, grace: float) -> None:
        self._grace_timer = None
        if self.ticket is not None and self.ticket.authenticating:
            refusal = LimitRefusal("login-grace-time", f"no login within {grace:g} s")
            self.refused(refusal)
            self._disconnect(refusal, asyncssh.DISC_BY_APPLICATION)

    def refused(self, refusal: LimitRefusal) -> None:
        """Log a refusal of this connection (or of one of its requests)."""
        host, port = self.peer
        report_refusal(refusal, connection_id=self.connection_id, client=f"{host}:{port}",
                       username=self.username)
        if refusal.scope != "connection":  # connections are counted where they are dropped
            self.metrics.request_refused(refusal.reason)

    def _disconnect(self, refusal: LimitRefusal,
                    code: int = asyncssh.DISC_TOO_MANY_CONNECTIONS) -> None:
        if self._end_reason is None:
            self._end_reason = ("login grace time exceeded" if refusal.reason == "login-grace-time"
                                else f"refused ({refusal.reason}): {refusal.message}")
        self.metrics.connection_rejected(refusal.reason)
        if self.conn is not None:
            self.conn.disconnect(code, f"kuberun: {refusal.message}")

    def _user_refused(self, username: str) -> bool:
        """The user's limits, checked once a credential is proven: say so now, not later."""
        if self.admission is None:
            return False
        refusal = self.admission.user_refusal(username)
        if refusal is None:
            return False
        self.auth.completed(self.login, username)  # the credential is proven all the same
        self.refused(refusal)
        self._disconnect(refusal)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        reason = lost_reason(exc)
        if exc is not None and not isinstance(exc, asyncssh.Error | OSError):
            # asyncssh closes a connection whose callback raised, and logs it at debug
            # level only: a bug in the gateway must show in the audit trail.
            self.audit.emit(logging.ERROR, "connection-error", "connection %s: %s",
                            self.connection_id, reason, exc_info=exc, reason=reason)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.ticket is not None:
            self.ticket.release()
            if exc is not None and "keepalive" in str(exc):
                self.refused(LimitRefusal("client-alive",
                                          "the client stopped answering keepalives"))
        if self.conn is not None:
            self.metrics.connection_closed(authenticated=self.portal is not None)
            if self.portal is None and self._failed_auths:
                self.metrics.connection_rejected("auth")
        if self.portal is not None:
            self.audit.lost_reason = reason
            self.portal.closed()
        else:
            self.audit.pre_auth_end(self._end_reason or reason, username=self.username)

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return "publickey" in self.auth.methods()

    def password_auth_supported(self) -> bool:
        return "password" in self.auth.methods()

    def _refused(self, refusal: Refusal, authtype: str = "pubkey") -> None:
        """Act on a refusal of the login gate (asyncssh then sends the failure reply)."""
        self._failed_auths += 1
        self.metrics.auth_result(authtype, accepted=False)
        if refusal.banner and self.conn is not None:
            self.conn.send_auth_banner(refusal.banner)
        if refusal.disconnect is not None:
            raise asyncssh.PermissionDenied(refusal.disconnect)

    async def key_attempt(self, username: str, key_data: bytes, msg: bytes, signature: bytes,
                          validate: Callable[[str, bytes, bytes, bytes], Awaitable[bool]],
                          ) -> bool:
        """A public key request: a query (no ``msg``) or a signed attempt.

        A signed attempt first waits for its turn; asyncssh then asks
        :meth:`validate_public_key` and verifies the signature.
        """
        self._key_check, self._signed = None, bool(msg)
        if msg:
            refusal = await run_trio(self.auth.turn, self.login, username, "publickey")
            if refusal is not None:
                self._refused(refusal)
                return False
        ok = await validate(username, key_data, msg, signature)
        check, self._key_check = self._key_check, None
        if isinstance(check, Refusal):
            self._refused(check)
            return False
        if not msg:
            if check is None:  # not a key asyncssh could read
                self._refused(self.auth.offer_failed(self.login, username))
            return ok
        fingerprint = _fingerprint(key_data)
        if ok and check is not None:
            self.auth.proven_key(self.login, check, fingerprint)
            return not self._user_refused(username) and await self._configured(username)
        self._refused(self.auth.bad_signature(self.login, username, fingerprint)
                      if check is not None else
                      self.auth.failed(self.login, username, "publickey"))
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        line = key.export_public_key("openssh").decode().strip()
        self._key_check = await run_trio(self.auth.check_key, self.login, username, line,
                                         signed=self._signed)
        return isinstance(self._key_check, AuthResult)

    async def validate_password(self, username: str, password: str) -> bool:
        outcome = await run_trio(self.auth.password, self.login, username, password)
        if isinstance(outcome, Refusal):
            self._refused(outcome, "password")
            return False
        return not self._user_refused(username) and await self._configured(username)

    async def _configured(self, username: str) -> bool:
        """Decide the connection's settings (``configure``) once the credential is proven.

        The limiter's keys are reset first, so that a slow hook holds no other login's
        turn. A refusal is told in the disconnect message (like a per-user limit)."""
        if self._configure is None or self.conn is None:
            return True
        self.auth.proven(self.login, username)
        proof = self.login.proof
        result = proof.result if proof is not None else AuthResult()
        info = LoginInfo(self.connection_id, username, result.username or username,
                         self.login.remote_address,
                         str(self.conn.get_extra_info("client_version") or ""), result)
        try:
            self.settings = await run_trio(self._configure, info)
            return True
        except ConfigRefused as exc:
            told, detail = exc.client_message, exc.detail
        except Exception as exc:  # a bug in an embedder's hook refuses this login only
            told, detail = CANNOT_CONFIGURE, f"{type(exc).__name__}: {exc}"
            log.exception("configure hook failed", extra={
                "event": "config-error", **self.audit.fields})
        self.auth.completed(self.login, username)  # the credential is proven all the same
        self.audit.emit(logging.WARNING, "config-refused", "connection %s: login refused: %s",
                        self.connection_id, detail, reason=told, error=detail,
                        username=result.username or username)
        self._end_reason = f"refused (config): {told}"
        self.metrics.connection_rejected("config")
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                                 f"kuberun: {told} (connection {self.connection_id})")
        return False

    def auth_completed(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        result = self.auth.completed(self.login, self.username)
        if result is None:  # no proven credential (cannot happen through asyncssh's methods)
            if self.conn is not None:
                self.conn.close()
            return
        self.auth_result = result
        if result.username is not None:
            self.username = result.username
        self.audit.username = self.username
        self.metrics.handshake_succeeded()
        self.metrics.auth_result("password" if result.method == "password" else "pubkey",
                                 accepted=True)
        if self.settings is not None and self.settings.forwarding is not None:
            self.forwarding = self.settings.forwarding  # this connection's own
        if self.ticket is not None and self.settings is not None:
            self.ticket.max_sessions = self.settings.max_sessions
        if self.ticket is not None and self.conn is not None:
            refusal = self.ticket.authenticated(self.username)
            if refusal is not None:
                self.refused(refusal)
                self._disconnect(refusal)
                return
        self.portal = self._make_portal(self)

    def session_requested(self) -> Any:
        if self.portal is None or self.conn is None:
            return False
        ticket, signals = self.ticket, None
        if ticket is not None and self.admission is not None:
            refusal = ticket.open_session()
            if refusal is not None:
                self.refused(refusal)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                f"kuberun: {refusal.message}")
            own = self.settings.max_signals_per_second if self.settings is not None else None
            signals = SignalBucket(own or self.admission.limits.max_signals_per_second)
        machine = self.portal.new_session(next(self._chan_ids))
        chan = self.conn.create_server_channel(encoding=None)
        chan.__class__ = GatewayChannel  # adds request handlers only, no state
        return chan, GatewaySession(self.portal, machine, self.audit, signals=signals,
                                    refused=self.refused,
                                    on_close=ticket.close_session if ticket else None,
                                    counts=self.metrics.bytes)

    # -- forwarding: direct-tcpip when enabled (sshforward.py); the rest refused, logged,
    # and said so ("administratively prohibited") ---------------------------------------
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        if self.forwarding.enabled and self.portal is not None and self.conn is not None:
            return accept_forward(self.conn, self.audit, self.portal.submit_forward,
                                  dest_host, dest_port, ticket=self.ticket,
                                  refused=self.refused, counts=self.metrics.bytes)
        self.audit.refused("port-forwarding", FORWARDING_DISABLED, kind="direct-tcpip",
                           destination=format_address(dest_host[:256], dest_port))
        raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, FORWARDING_DISABLED)

    def unix_connection_requested(self, dest_path: str) -> Any:
        reason = STREAMLOCAL_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason,
                           kind="direct-streamlocal", destination=dest_path[:256])
        raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, reason)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        reason = REVERSE_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason, kind="tcpip-forward",
                           listen=format_address(listen_host[:256], listen_port))
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        reason = STREAMLOCAL_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason,
                           kind="streamlocal-forward", listen=listen_path[:256])
        return False

    def close(self, message: str = "") -> None:
        if self.conn is not None:
            self.conn.close()


def _fingerprint(key_data: bytes) -> str:
    try:
        return str(decode_ssh_public_key(key_data).get_fingerprint("sha256"))
    except asyncssh.KeyImportError:
        return "?"


def lost_reason(exc: Exception | None) -> str:
    """Why the SSH connection went away, from asyncssh's ``connection_lost`` argument."""
    if exc is None:
        return "client disconnected"
    text = str(exc).strip()
    if isinstance(exc, asyncssh.ConnectionLost):
        if "login timeout" in text.lower():
            return "login grace time exceeded"
        if "keepalive" in text.lower():
            return "client not responding to keepalive"
        return "client disconnected"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {text[:200]}" if text else "disconnected"
    if isinstance(exc, OSError):
        return f"connection lost: {type(exc).__name__}"
    return f"internal error in the gateway: {type(exc).__name__}"


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
                             throttle=target.throttle)
    sink = _Collector()
    result = await stream.run(sink)
    if result.exit_code != 0 and sink.stderr:
        return ExecResult(result.exit_code, sink.stderr.decode(errors="replace").strip(),
                          result.reason)
    return result


SSH_OPTIONS: dict[str, Any] = {
    # aes-gcm first: 1.3-1.7x faster than chacha20-poly1305 here (shared/PITFALLS.md).
    "encryption_algs": ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                        "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"],
    "allow_pty": True,
    "line_editor": False,  # the pod's pty does the editing and echo
    "x11_forwarding": False,
    "agent_forwarding": False,
    "allow_scp": False,  # scp runs inside the pod like any other exec
}


async def listen(host: str, port: int, *, host_keys: list[Any],
                 server_factory: Callable[[], asyncssh.SSHServer],
                 options: Mapping[str, Any] | None = None) -> asyncssh.SSHAcceptor:
    """Start the SSH listener. Asyncio-flavoured."""
    return await asyncssh.create_server(
        server_factory, host, port, server_host_keys=host_keys,
        **{**SSH_OPTIONS, **(options or {})})


async def close_listener(acceptor: asyncssh.SSHAcceptor) -> None:
    """Stop accepting (existing connections stay). Asyncio-flavoured."""
    acceptor.close()
    await acceptor.wait_closed()


def load_host_key(data: bytes) -> asyncssh.SSHKey:
    """Parse an OpenSSH or PEM private key."""
    return asyncssh.import_private_key(data)


def generate_host_key() -> tuple[bytes, str]:
    """A new ed25519 host key: (OpenSSH private key bytes, SHA256 fingerprint)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_private_key("openssh"), key.get_fingerprint("sha256")


def public_key_line(private_key: bytes) -> str:
    """The OpenSSH public key line of a private key."""
    key = asyncssh.import_private_key(private_key)
    return key.export_public_key("openssh").decode().strip()
