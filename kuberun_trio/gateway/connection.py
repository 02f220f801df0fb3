"""The connection nursery: one SSH connection, its pod, and its session tasks.

Theory of operation
-------------------
A :class:`ConnectionRuntime` is created when a client completes the SSH
handshake and runs as one task in the server's nursery::

    run()                                  cancel scope: cancelled when the client goes
    └── handler.connected(...)             creates the pod; deletes it on exit (shielded)
        ├── (files written)                the connection's settings' files, if any (podfiles)
        └── session nursery
            ├── pod-loss watcher           pod deleted/evicted/killed → tell sessions, end
            ├── time-limit watch           idle / max duration (timelimits.py), if set
            ├── session task xM            one pods/exec each (GatewaySession.serve_exec)
            ├── forward task xF            one pods/portforward (or network exec) per
            │                              direct-tcpip channel (ForwardSession.serve)
            ├── signal task xK             a second exec that delivers a signal
            └── agent relay (+ one task    ``ssh -A`` (agent.py): the relay exec, and one
                per agent connection)      exec + auth-agent channel per agent connection

In ``kubernetes.pod.mode: session`` (read from the handler's configuration, the
connection's own) there is no connection pod: each session task owns one, created by
``handler.session_pod`` around a session nursery (the session's exec, its signal tasks and
a pod-loss watcher for that pod alone), so the exec stream is closed before its pod's
DELETE. In ``persistent`` mode ``handler.connected`` yields the user's pod and releases it
instead of deleting it (:mod:`.persistent`).

It is also the :class:`~kuberun_trio.aio.sshsession.ConnectionPortal` that the
asyncio-side SSH callbacks talk to, with synchronous calls only:

* ``submit(session)`` -- a session channel was started (shell/exec/subsystem).
  Before the pod is Ready it waits in a list; afterwards it becomes a task.
* ``closed()`` -- the client is gone: cancel ``run``. The session nursery
  unwinds first (each session's ``finally`` closes its exec WebSocket), and only
  then does ``connected`` delete the pod.
* ``send_signal(session, plan)`` -- run the signal exec as a sibling task.
* ``submit_forward(forward)`` -- a direct-tcpip channel (``ssh -L``/``-D``) asks to open.
  Once the pod is Ready, :func:`~..core.forwarding.judge` decides: refused (``administratively
  prohibited``, a ``request-refused`` line) or a task that awaits
  ``ForwardSession.serve`` once, which answers the client's open and pumps the stream.
  Forward tasks are siblings of the session tasks, so every port-forward stream is
  closed before the pod DELETE. Log lines: ``forward-failed`` (the client's open
  failed: the reason), ``forward-end`` (bytes each way, why), ``forward-error``.
* ``agent_requested(session)`` -- ``auth-agent-req``: refused unless agent forwarding is
  enabled; else the connection's :class:`~.agent.AgentRelay` starts (once), and the
  session's exec waits for it and gets ``SSH_AUTH_SOCK``.

* ``closed()`` -- the client is gone: cancel ``run``.

The server ends connections in two more ways: :meth:`ConnectionRuntime.drain`
(graceful shutdown: a notice on every open session's stderr, no new sessions,
the connection closes as soon as its last session has ended) and
:meth:`ConnectionRuntime.abort` (a message and exit status 255 on every
session, then the SSH connection closes and ``run`` is cancelled).

Each session task is its own error boundary: an exception in one session is
logged and reported on that channel's stderr, never propagated to siblings,
the connection or the server. A session or signal task that starts after the
connection's teardown began does nothing (no exec is opened behind the
teardown's back, so every exec stream is closed before the pod DELETE).

Log lines (logger ``kuberun_trio.gateway.connection``) carry ``event``,
``connection_id`` and ``remote_address``: ``session-start`` (``kind``; for ``exec`` the
``command`` as the :class:`~.audit.AuditPolicy` allows, else the ``program``),
``session-exit`` (``exit_status``), ``session-error``, ``pod-lost``, ``pod-start-failed``,
``connection-error`` (``reason``: what the client was told; ``error``: the detail).
The client never reads an API server's address or a client library's exception text:
it is told :func:`~kuberun_trio.errors.client_message` and the connection id, which
finds the detail in the log. :attr:`ConnectionRuntime.end_reason` (the first cause:
client disconnected, pod lost, pod start failed, shutdown) goes into the
``connection-end`` line the server writes when ``run`` returns, and
:attr:`ConnectionRuntime.end_kind` says the same in one word
(:class:`~.audit.ConnectionEnd`).

Session time limits (:mod:`.timelimits`): the connection is the watch's
:class:`~.timelimits.TimeLimitTarget`. At a limit it drains like a shutdown (no new
sessions; the connection closes once its last session ended) after a SIGTERM to every
session's process through the signal exec; each session that ends then reports exit
status 255; after the grace period :meth:`ConnectionRuntime.abort` ends the rest.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..aio.bridge import run_aio
from ..core.audit import ConnectionAudit, ConnectionEnd
from ..core.auth import AuthResult
from ..core.forwarding import (
    FORWARDING_DISABLED,
    AgentOptions,
    ForwardingPolicy,
    PodAddress,
    Refused,
    ViaPortForward,
    judge,
)
from ..core.session import ExecPlan, SessionConfig, SessionMachine, SignalPlan, State
from ..errors import ExecError, KuberunError, PodStartError, client_message
from ..observe.metrics import GatewayMetrics, unobserved
from .agent import AgentRelay
from .pod import ConnectedPod, ConnectionHandler
from .timelimits import SessionTimeLimits, TimeLimitWatch

if TYPE_CHECKING:
    from ..aio.sshforward import ForwardSession
    from ..aio.sshsession import ExecTarget, GatewaySession
    from ..recording import Recorder, SessionRecording

log = logging.getLogger(__name__)

FAILURE_LINGER = 5.0
"""Seconds a failed connection waits for a session to tell the reason to."""
CLOSE_LINGER = 0.25
"""Seconds between telling a late session why and closing the connection: an asyncssh
client that receives the exec reply, the reason and the disconnect in one batch loses
the reason (seen in tests/test_gateway_lifecycle.py)."""


def session_result(status: int | None, cancelled: bool) -> str:
    """``kuberun_sessions_total``'s ``result`` for a session that ended so."""
    if status is not None:
        return "success" if status == 0 else "failure"
    return "closed" if cancelled else "error"


class ConnectionRuntime:
    """One SSH connection on the trio side (see the module docstring)."""

    def __init__(self, handler: ConnectionHandler, session_config: SessionConfig, *,
                 username: str, auth: AuthResult,
                 make_target: Callable[[ConnectedPod], ExecTarget],
                 close_connection: Callable[[], None],
                 audit: ConnectionAudit | None = None,
                 metrics: GatewayMetrics | None = None,
                 time_limits: SessionTimeLimits | None = None,
                 recorder: Recorder | None = None,
                 forwarding: ForwardingPolicy | None = None,
                 agent: AgentOptions | None = None,
                 files: Mapping[str, bytes] | None = None) -> None:
        self.handler = handler
        self.forwarding = forwarding or ForwardingPolicy()
        """``security.forwarding``: where direct-tcpip channels may go."""
        self._forwards: list[ForwardSession] = []
        """Forward channels waiting for the pod."""
        self._pod: PodAddress | None = None
        self.agent_options = agent or AgentOptions()
        """Agent forwarding (``security.forwarding``); off by default."""
        self.agent: AgentRelay | None = None
        """The connection's agent relay, once a session asked for one."""
        self._agent_ssh: Any = None
        self._agent_sessions: set[GatewaySession] = set()
        self.files = files or {}
        """Files written into the pod once it is Ready, before any session starts."""
        self.audit = audit or ConnectionAudit(handler.connection_id, handler.client_address)
        """The connection's audit record (address, policy for commands, byte counters)."""
        self.end_reason: str | None = None
        """Why the connection ended (the first cause wins), for the ``connection-end`` line."""
        self.metrics = metrics or unobserved()
        self.end_kind: ConnectionEnd | None = None
        """:attr:`end_reason` in one word (set with it)."""
        self.time_limits = time_limits or SessionTimeLimits()
        self.recorder = recorder
        """Records every session channel (``audit.enable``), or None."""
        self.session_config = session_config
        self.username = username
        self.auth = auth
        self._make_target = make_target
        self._close_connection = close_connection
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._target: ExecTarget | None = None
        self._pending: list[GatewaySession] = []
        self._sessions: set[GatewaySession] = set()
        self._failure: str | None = None
        self._draining: str | None = None
        self._draining_kind = ConnectionEnd.SHUTDOWN
        self._session_ids: dict[SessionMachine, str] = {}
        self._told = trio.Event()
        self._ssh_closed = False
        """Set once a session heard why the connection failed (or the client left)."""
        self._ids = itertools.count()
        self.finished = trio.Event()
        self._lost = trio.Event()
        self._loss_reason: str | None = None
        self._session_pods: dict[GatewaySession, tuple[ExecTarget, trio.Nursery]] = {}
        """``session`` mode: each running session's pod target and nursery (signals)."""

    def __repr__(self) -> str:
        state = ("failed" if self._failure else "ready" if self._target else "starting")
        return (f"<ConnectionRuntime {self.handler.connection_id} {self.username!r} {state} "
                f"sessions={len(self._sessions)}>")

    @property
    def connection_id(self) -> str:
        return self.handler.connection_id

    @property
    def session_mode(self) -> bool:
        """``kubernetes.pod.mode: session`` (of this connection's configuration)."""
        return self.handler.config.pod.mode == "session"

    # -- ConnectionPortal (synchronous, called from asyncssh callbacks) ----
    def new_session(self, chan_id: int) -> SessionMachine:
        session_id = f"{self.connection_id}-{next(self._ids)}"
        machine = SessionMachine(self.session_config, session_id=session_id,
                                 server_env=self.auth.environment)
        self._session_ids[machine] = session_id
        return machine

    def submit(self, session: GatewaySession) -> None:
        reason = self._failure or self._draining
        if reason is not None:
            # Not now: we are inside the channel request's callback, and a channel that
            # closes before its request is answered reads as "request failed" to the
            # client, without the reason. Run it right after the callback returns.
            trio.lowlevel.current_trio_token().run_sync_soon(self._refuse, session, reason)
        elif self._nursery is None:
            self._pending.append(session)
        else:
            self._nursery.start_soon(self._run_session, session)

    def _refuse(self, session: GatewaySession, reason: str) -> None:
        session.fail(reason)
        self._told.set()

    def submit_forward(self, forward: ForwardSession) -> None:
        reason = self._failure or self._draining
        if reason is None and self.session_mode:
            reason = "port forwarding needs one pod per connection (kubernetes.pod.mode: session)"
        if reason is not None:
            forward.refuse(reason)
        elif self._nursery is None:
            self._forwards.append(forward)
        else:
            self._nursery.start_soon(self._run_forward, forward)

    def agent_requested(self, session: GatewaySession) -> str | None:
        if not self.agent_options.enabled:
            return FORWARDING_DISABLED
        if self.session_mode:
            return "agent forwarding needs one pod per connection (kubernetes.pod.mode: session)"
        if not self.auth.agent_forwarding:
            return "agent forwarding is not permitted for this key (no-agent-forwarding)"
        if session.machine.state is not State.IDLE:
            return "agent forwarding must be asked for before the shell or command starts"
        if self._failure is not None or self._draining is not None:
            return "the connection is ending"
        self._agent_sessions.add(session)
        if self.agent is None:
            self._agent_ssh = session.ssh_connection
            self.agent = AgentRelay(self.agent_options, self.audit,
                                    start_timeout=self.handler.config.timeouts.command_start)
            if self._nursery is not None:
                self._start_agent(self._nursery)
        return None

    def _start_agent(self, nursery: trio.Nursery) -> None:
        assert self.agent is not None and self._target is not None
        nursery.start_soon(self.agent.run, self._target, self._agent_ssh, nursery)

    def send_signal(self, session: GatewaySession, plan: SignalPlan) -> None:
        if session in self._session_pods:  # session mode: in the session's own nursery
            target, nursery = self._session_pods[session]
            nursery.start_soon(self._run_signal, plan, target)
        elif self._nursery is not None and self._target is not None:
            self._nursery.start_soon(self._run_signal, plan)

    def _ended(self, reason: str, kind: ConnectionEnd) -> None:
        """Record why the connection ends (the first cause wins)."""
        if self.end_reason is None:
            self.end_reason, self.end_kind = reason, kind

    def closed(self) -> None:
        reason = self.audit.lost_reason or "client disconnected"
        self._ended(reason, ConnectionEnd.ERROR if reason.startswith("internal error")
                    else ConnectionEnd.CLIENT)
        self._scope.cancel()
        self._told.set()  # nobody left to tell

    # -- the server's ways to end a connection -------------------------------
    def drain(self, message: str, kind: ConnectionEnd = ConnectionEnd.SHUTDOWN) -> None:
        """Graceful shutdown: tell open sessions, refuse new ones, close once idle."""
        self._draining, self._draining_kind = message, kind
        for session in [*self._pending, *self._sessions]:
            session.notice(message)
        if not self._sessions:
            self.abort(message, kind)

    def abort(self, reason: str, kind: ConnectionEnd = ConnectionEnd.SHUTDOWN) -> None:
        """End now: ``reason`` and exit status 255 on every session, close, cancel ``run``."""
        self._ended(reason, kind)
        if self._failure is None:
            self._end(reason)
        self._told.set()  # no lingering for a session to tell (see _fail)
        self._close()
        self._scope.cancel()

    # -- TimeLimitTarget (timelimits.py) ------------------------------------------
    def warn(self, message: str) -> None:
        for session in [*self._pending, *self._sessions]:
            session.notice(message)

    def limit_reached(self, message: str, kind: ConnectionEnd) -> None:
        """SIGTERM every running session's process; each ends with ``message`` and 255."""
        self._draining, self._draining_kind = message, kind
        for session in [*self._pending, *self._sessions]:
            session.end_soon(message)
            plan = session.machine.terminate()
            if plan is not None:
                self.send_signal(session, plan)
        if not self._sessions:
            self.abort(message, kind)

    def close(self, message: str, kind: ConnectionEnd) -> None:
        self.abort(message, kind)

    def _info(self, message: str, *args: Any, event: str, level: int = logging.INFO,
              **fields: Any) -> None:
        log.log(level, message, *args, extra={"event": event, **self.audit.fields, **fields})

    # -- the connection task ------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves. Never raises (but Cancelled)."""
        watch = (TimeLimitWatch(self.time_limits, self.audit, self)
                 if self.time_limits.enabled else None)  # the login was just now
        try:
            with self._scope:
                if self.session_mode:
                    await self._serve(None, watch)
                else:
                    async with self.handler.connected(self.username, self.auth) as pod:
                        await self._serve(pod, watch)
        except PodStartError as exc:
            self.metrics.backend_error()
            self.metrics.pod_start_failed(exc.reason)
            self._info("pod start failed: %s", exc, event="pod-start-failed",
                       level=logging.WARNING, pod=exc.pod, reason=exc.reason)
            await self._fail(client_message(exc))
        except KuberunError as exc:
            self.metrics.backend_error()
            # The client hears a short reason; the detail (API address, library text) is
            # for the log only.
            told = client_message(exc)
            self._info("connection failed: %s", exc, event="connection-error",
                       level=logging.ERROR, reason=told, error=_detail(exc))
            await self._fail(f"cannot start your pod: {told} (connection {self.connection_id})")
        except Exception:
            self.metrics.backend_error()
            log.exception("connection crashed", extra={
                "event": "connection-error", **self.audit.fields})
            await self._fail(f"internal error in the gateway (connection {self.connection_id})")
        finally:
            self._nursery = None
            for forward in self._forwards:  # the pod never came: no stream was opened
                forward.refuse(self.end_reason or "the connection is closing")
            self._forwards.clear()
            self.finished.set()

    async def _write_files(self, target: ExecTarget) -> None:
        """The connection's files, into the pod, before any session (ExecError if not)."""
        from ..aio.podfiles import write_files

        started = trio.current_time()
        limit = self.handler.config.timeouts.pod_start
        try:
            with trio.fail_after(limit):
                await run_aio(write_files, target, self.files)
        except trio.TooSlowError:
            raise ExecError(f"the files were not written within {limit:g} s") from None
        self._info("%d file%s written into the pod", len(self.files),
                   "" if len(self.files) == 1 else "s", event="pod-files-written",
                   files=sorted(self.files),
                   duration_ms=round(1000 * (trio.current_time() - started)))

    async def _serve(self, pod: ConnectedPod | None, watch: TimeLimitWatch | None) -> None:
        """Run the sessions and forwards (on ``pod``; None in ``session`` mode: each session
        makes its own)."""
        if pod is not None:
            target = attrs.evolve(self._make_target(pod), pod_loss=self.pod_loss_reason,
                                  open_timeout=self.handler.config.timeouts.command_start)
            if self.files:
                await self._write_files(target)
            self._target = target
            self._pod = PodAddress.of(pod.name, pod.pod)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if watch is not None:
                nursery.start_soon(watch.run)
            if self.agent is not None:
                self._start_agent(nursery)
            for session in self._pending:
                nursery.start_soon(self._run_session, session)
            self._pending.clear()
            for forward in self._forwards:
                nursery.start_soon(self._run_forward, forward)
            self._forwards.clear()
            if pod is None:  # session mode: the connection lives until the client leaves
                await trio.sleep_forever()
            loss = await self.handler.wait_lost(pod)
            reason = f"the pod {pod.name} is gone: {loss.reason}: {loss.message}"
            self._loss_reason = reason
            self._lost.set()
            self._info("pod %s lost: %s: %s", pod.name, loss.reason, loss.message,
                       event="pod-lost", level=logging.WARNING, pod=pod.name,
                       reason=loss.reason)
            self._ended(reason, ConnectionEnd.POD_LOST)
            self._end(reason)
            nursery.cancel_scope.cancel()

    async def pod_loss_reason(self, wait: float) -> str | None:
        """Why the pod is gone, waiting at most ``wait`` s for the watcher; None if it is not."""
        with trio.move_on_after(wait):
            await self._lost.wait()
        return self._loss_reason

    def _end(self, reason: str, *, close: bool = True) -> None:
        """Tell every session why the connection ends, then close it."""
        self._ended(reason, ConnectionEnd.ERROR)  # callers set their own kind first
        self._failure = reason
        for session in [*self._pending, *self._sessions]:
            session.fail(reason)
            self._told.set()
        self._pending.clear()
        for forward in self._forwards:
            forward.refuse(reason)
        self._forwards.clear()
        if close:
            self._close()

    def _close(self) -> None:
        if not self._ssh_closed:
            self._ssh_closed = True
            self._close_connection()

    async def _fail(self, reason: str) -> None:
        """End a connection whose pod could not be had. If no session has heard why yet,
        wait (at most :data:`FAILURE_LINGER` s) for the client to open one: clients
        open their session channel right after authentication, and the reason should
        reach the user's terminal, not only the log."""
        self._ended(reason, ConnectionEnd.ERROR)
        self._end(reason, close=False)
        with trio.move_on_after(FAILURE_LINGER):
            await self._told.wait()
        await trio.sleep(CLOSE_LINGER)
        self._close()

    async def _run_session(self, session: GatewaySession) -> None:
        if self.session_mode:
            await self._run_session_pod(session)
        else:
            assert self._target is not None
            await self._serve_session(session, self._target)

    async def _run_session_pod(self, session: GatewaySession) -> None:
        """``session`` mode: the channel's own pod around its exec; the pod is deleted
        after the exec stream closed (the session nursery has exited)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # teardown began: make no pod
        session_id = self._session_ids.get(session.machine, f"{self.connection_id}-?")
        self._sessions.add(session)  # told by drain/abort while its pod starts
        lost, why = trio.Event(), list[str]()

        async def pod_loss(wait: float) -> str | None:
            with trio.move_on_after(wait):
                await lost.wait()
            return why[0] if why else None

        try:
            async with self.handler.session_pod(self.username, self.auth, session_id) as pod:
                target = attrs.evolve(self._make_target(pod), pod_loss=pod_loss,
                                      open_timeout=self.handler.config.timeouts.command_start)
                if self.files:  # each session's pod gets the connection's files
                    await self._write_files(target)
                async with trio.open_nursery() as nursery:
                    self._session_pods[session] = (target, nursery)
                    nursery.start_soon(self._watch_session_pod, pod, session, lost, why,
                                       nursery.cancel_scope)
                    await self._serve_session(session, target)
                    nursery.cancel_scope.cancel()
        except PodStartError as exc:
            self.metrics.backend_error()
            self.metrics.pod_start_failed(exc.reason)
            self._info("pod start failed: %s", exc, event="pod-start-failed",
                       level=logging.WARNING, pod=exc.pod, reason=exc.reason,
                       session_id=session_id)
            session.fail(client_message(exc))
        except KuberunError as exc:
            self.metrics.backend_error()
            told = client_message(exc)
            self._info("session pod failed: %s", exc, event="connection-error",
                       level=logging.ERROR, reason=told, error=_detail(exc),
                       session_id=session_id)
            session.fail(f"cannot start your pod: {told} (connection {self.connection_id})")
        finally:
            self._session_pods.pop(session, None)
            self._sessions.discard(session)
        if self._draining is not None and not self._sessions and not self._pending:
            self.abort(self._draining, self._draining_kind)

    async def _watch_session_pod(self, pod: ConnectedPod, session: GatewaySession,
                                 lost: trio.Event, why: list[str],
                                 scope: trio.CancelScope) -> None:
        """``session`` mode: a session whose pod is lost ends (255 and why); others go on."""
        try:
            loss = await self.handler.wait_lost(pod)
        except KuberunError as exc:
            self._info("cannot watch pod %s: %s", pod.name, exc, event="pod-watch-failed",
                       level=logging.WARNING, pod=pod.name)
            return
        reason = f"the pod {pod.name} is gone: {loss.reason}: {loss.message}"
        why.append(reason)
        lost.set()
        self._info("pod %s lost: %s: %s", pod.name, loss.reason, loss.message,
                   event="pod-lost", level=logging.WARNING, pod=pod.name, reason=loss.reason)
        session.fail(reason)
        scope.cancel()

    async def _serve_session(self, session: GatewaySession, target: ExecTarget) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # teardown began: open no exec
        self._sessions.add(session)
        session_id = self._session_ids.pop(session.machine, "?")
        plan = session.machine.plan
        kind = plan.kind if plan is not None else "?"
        what: dict[str, Any] = {}
        if plan is not None and kind == "exec":
            what = self.audit.policy.command_fields(plan.command[-1])
        elif plan is not None:
            what = {"program": " ".join(plan.command)}
        self._info("session %s started: %s", session_id, kind,
                   event="session-start", session_id=session_id, kind=kind, **what)
        started = trio.current_time()
        result, cancelled = None, False
        self.metrics.session_started(kind)
        if self.recorder is not None and plan is not None:
            session.recording = self._record(session_id, plan)
        with trio.CancelScope() as scope:
            session.abort = scope.cancel
            try:
                if session in self._agent_sessions:
                    await self._agent_for(session)
                result = await run_aio(session.serve_exec, target)
            except trio.Cancelled:
                cancelled = True
                raise
            except Exception as exc:  # one session's error boundary
                log.exception("session %s failed", session_id, extra={
                    "event": "session-error", **self.audit.fields, "session_id": session_id,
                    "error": _detail(exc)})
                session.fail(f"internal error in the gateway (connection {self.connection_id})")
            finally:
                self._sessions.discard(session)
                if session.recording is not None:
                    session.recording.close()
                    session.recording = None
                status = result.exit_code if result is not None else None
                self.metrics.session_ended(kind, session_result(status, cancelled))
                self._info("session %s exited: %s", session_id,
                           "status " + str(status) if status is not None else "no status",
                           event="session-exit", session_id=session_id,
                           exit_status=status,
                           duration_ms=round(1000 * (trio.current_time() - started)))
        if self._draining is not None and not self._sessions and not self._pending:
            self.abort(self._draining, self._draining_kind)

    async def _agent_for(self, session: GatewaySession) -> None:
        """Wait for the agent relay; export its socket, or tell the session why not."""
        self._agent_sessions.discard(session)
        assert self.agent is not None
        path = await self.agent.socket_for_session()
        if path is not None:
            session.machine.agent_socket(path)
        elif self.agent.problem is not None:
            session.notice(self.agent.problem)

    def _record(self, session_id: str, plan: ExecPlan) -> SessionRecording:
        assert self.recorder is not None
        shell = self.session_config.shell_command[0]
        command = " ".join(plan.command[-1:] if plan.kind == "exec" else plan.command)
        return self.recorder.open(
            connection_id=self.connection_id, number=int(session_id.rsplit("-", 1)[1]),
            kind=plan.kind, width=plan.width, height=plan.height,
            env={"TERM": plan.term or "", "SHELL": shell},
            title=f"{self.username}: {command[:1024]}",
            fields={**self.audit.fields, "session_id": session_id})

    async def _run_forward(self, forward: ForwardSession) -> None:
        """One direct-tcpip channel: judged, then served until either side closes it."""
        assert self._target is not None and self._pod is not None
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # teardown began: open no stream
            how = judge(self.forwarding, forward.host, forward.port, self._pod)
            if isinstance(how, Refused):
                forward.refuse(how.reason)
                self.metrics.forward_result("refused")
                return
            via = "port-forward" if isinstance(how, ViaPortForward) else "exec"
            started = trio.current_time()
            end = None
            try:
                with trio.CancelScope() as scope:
                    forward.abort = scope.cancel
                    try:
                        end = await run_aio(forward.serve, self._target, how,
                                            self.forwarding.open_settle)
                    except Exception as exc:  # one forward's error boundary
                        log.exception("forward to %s failed", forward.destination, extra={
                            "event": "forward-error", **self.audit.fields,
                            "destination": forward.destination, "error": _detail(exc)})
            finally:  # also when the connection's teardown cancels it
                self._forward_ended(forward, end.reason if end is not None else None, via,
                                    trio.current_time() - started)
        finally:
            forward.refuse("the connection is closing")  # no-op once the open was answered

    def _forward_ended(self, forward: ForwardSession, reason: str | None, via: str,
                       took: float) -> None:
        fields: dict[str, Any] = {"destination": forward.destination, "via": via}
        if not forward.accepted:
            self.metrics.forward_result("failed")
            self._info("forward to %s failed: %s", forward.destination,
                       reason or "the connection is closing", event="forward-failed",
                       level=logging.WARNING, reason=reason, **fields)
            return
        self.metrics.forward_result("opened")
        self._info("forward to %s ended: %s", forward.destination, reason or "closed",
                   event="forward-end", reason=reason, bytes_in=forward.bytes_in,
                   bytes_out=forward.bytes_out, duration_ms=round(1000 * took), **fields)

    async def _run_signal(self, plan: SignalPlan, target: ExecTarget | None = None) -> None:
        from ..aio.sshsession import run_command

        target = target or self._target
        assert target is not None
        await trio.lowlevel.checkpoint_if_cancelled()  # teardown began: open no exec
        try:
            with trio.move_on_after(self.handler.config.timeouts.signal):
                result = await run_aio(run_command, target, plan.argv, plan.container)
                if result.exit_code != 0:
                    self._info("signal %s not delivered: %s", plan.signal, result.message,
                               event="signal-failed", level=logging.WARNING)
        except Exception:
            log.exception("signal exec failed",
                          extra={"event": "signal-failed", **self.audit.fields})


def _detail(exc: BaseException) -> str:
    """The whole story of ``exc`` for the log: its chain of causes, innermost last."""
    parts, seen = [], 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        parts.append(f"{type(current).__name__}: {current}")
        current, seen = current.__cause__, seen + 1
    return " <- ".join(parts)
