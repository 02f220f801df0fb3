"""The connection nursery: one SSH connection, its pod, and its session tasks.

Theory of operation
-------------------
A :class:`ConnectionRuntime` is created when a client completes the SSH
handshake and runs as one task in the server's nursery::

    run()                                  cancel scope: cancelled when the client goes
    └── handler.connected(...)             creates the pod; deletes it on exit (shielded)
        └── session nursery
            ├── pod-loss watcher           pod deleted/evicted/killed → tell sessions, end
            ├── session task xM            one pods/exec each (GatewaySession.serve_exec)
            └── signal task xK             a second exec that delivers a signal

It is also the :class:`~kuberun_trio.aio.sshserver.ConnectionPortal` that the
asyncio-side SSH callbacks talk to, with synchronous calls only:

* ``submit(session)`` -- a session channel was started (shell/exec/subsystem).
  Before the pod is Ready it waits in a list; afterwards it becomes a task.
* ``closed()`` -- the client is gone: cancel ``run``. The session nursery
  unwinds first (each session's ``finally`` closes its exec WebSocket), and only
  then does ``connected`` delete the pod.
* ``send_signal(session, plan)`` -- run the signal exec as a sibling task.

Each session task is its own error boundary: an exception in one session is
logged and reported on that channel's stderr, never propagated to siblings,
the connection or the server.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..aio.bridge import run_aio
from ..errors import KuberunError, PodStartError
from .auth import AuthResult
from .pod import ConnectedPod, ConnectionHandler
from .session import SessionConfig, SessionMachine, SignalPlan

if TYPE_CHECKING:
    from ..aio.sshserver import ExecTarget, GatewaySession

log = logging.getLogger(__name__)


class ConnectionRuntime:
    """One SSH connection on the trio side (see the module docstring)."""

    def __init__(self, handler: ConnectionHandler, session_config: SessionConfig, *,
                 username: str, auth: AuthResult,
                 make_target: Callable[[ConnectedPod], ExecTarget],
                 close_connection: Callable[[], None]) -> None:
        self.handler = handler
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
        self._ids = itertools.count()
        self.finished = trio.Event()

    def __repr__(self) -> str:
        state = ("failed" if self._failure else "ready" if self._target else "starting")
        return (f"<ConnectionRuntime {self.handler.connection_id} {self.username!r} {state} "
                f"sessions={len(self._sessions)}>")

    @property
    def connection_id(self) -> str:
        return self.handler.connection_id

    # -- ConnectionPortal (synchronous, called from asyncssh callbacks) ----
    def new_session(self, chan_id: int) -> SessionMachine:
        return SessionMachine(self.session_config,
                              session_id=f"{self.connection_id}-{next(self._ids)}",
                              server_env=self.auth.environment)

    def submit(self, session: GatewaySession) -> None:
        if self._failure is not None:
            session.fail(self._failure)
        elif self._nursery is None:
            self._pending.append(session)
        else:
            self._nursery.start_soon(self._run_session, session)

    def send_signal(self, session: GatewaySession, plan: SignalPlan) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._run_signal, plan)

    def closed(self) -> None:
        self._scope.cancel()

    # -- the connection task ------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves. Never raises (but Cancelled)."""
        log_extra = {"connection_id": self.connection_id}
        try:
            with self._scope:
                async with self.handler.connected(self.username, self.auth) as pod:
                    self._target = self._make_target(pod)
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        for session in self._pending:
                            nursery.start_soon(self._run_session, session)
                        self._pending.clear()
                        loss = await self.handler.kube.watch_pod_gone_or_failed(
                            pod.namespace, pod.name, pod.container)
                        self._end(f"the pod {pod.name} is gone: {loss.reason}: {loss.message}")
                        nursery.cancel_scope.cancel()
        except PodStartError as exc:
            self._end(f"{exc.reason}: {exc.message}")
            log.warning("pod start failed: %s", exc, extra=log_extra)
        except KuberunError as exc:
            self._end(str(exc))
            log.error("connection failed: %s", exc, extra=log_extra)
        except Exception:
            self._end("internal error in the gateway")
            log.exception("connection crashed", extra=log_extra)
        finally:
            self._nursery = None
            self.finished.set()

    def _end(self, reason: str) -> None:
        """Tell every session why the connection ends, then close it."""
        self._failure = reason
        for session in [*self._pending, *self._sessions]:
            session.fail(reason)
        self._pending.clear()
        self._close_connection()

    async def _run_session(self, session: GatewaySession) -> None:
        assert self._target is not None
        self._sessions.add(session)
        with trio.CancelScope() as scope:
            session.abort = scope.cancel
            try:
                await run_aio(session.serve_exec, self._target)
            except Exception as exc:  # one session's error boundary
                log.exception("session failed", extra={"connection_id": self.connection_id})
                session.fail(f"internal error: {type(exc).__name__}")
        self._sessions.discard(session)

    async def _run_signal(self, plan: SignalPlan) -> None:
        from ..aio.sshserver import run_command

        assert self._target is not None
        try:
            with trio.move_on_after(self.handler.config.timeouts.signal):
                result = await run_aio(run_command, self._target, plan.argv, plan.container)
                if result.exit_code != 0:
                    log.warning("signal %s not delivered: %s", plan.signal, result.message,
                                extra={"connection_id": self.connection_id})
        except Exception:
            log.exception("signal exec failed", extra={"connection_id": self.connection_id})
