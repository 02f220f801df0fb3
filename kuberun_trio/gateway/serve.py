"""The embedding API: run the gateway inside a trio application.

Theory of operation
-------------------
:func:`serve_gateway` is a trio service in the style of
``trio.serve_listeners``: it runs until cancelled and reports the bound
address through ``task_status`` once it truly accepts connections.
:func:`open_gateway` is the async-context-manager form.

Inside, one nursery owns everything::

    serve_gateway
    ├── (trio-asyncio loop, opened here unless the caller already runs one)
    ├── KubeClient                      REST + exec clients of kubernetes-asyncio
    ├── PodWatchHub                     one shared pod watch per namespace (all connections)
    ├── SSH listener                    asyncssh; each handshake → make_portal()
    └── connection task xN              ConnectionRuntime.run (pod + sessions)

On cancellation the listener closes first (no new connections), then every
connection is aborted -- each session gets a message and exit status 255, the
SSH connection closes -- and every connection task is cancelled: its sessions
end, its exec streams close, and its pod is deleted (shielded, bounded by
``timeouts.podStop``).

:meth:`Gateway.shutdown` is the graceful form (what SIGTERM should call, in
hypercorn's manner): stop accepting, write a notice on every open session's
stderr, refuse new sessions, give the sessions a grace deadline (a connection
closes as soon as its last session has ended), then abort the rest and wait
until every pod is deleted; ``serve_gateway`` then returns normally.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from ..aio import sshserver
from ..aio.bridge import ensure_aio_loop, loop_roundtrip, run_aio
from ..aio.kube import KubeClient, open_kube_client
from ..observe import GatewayMetrics, HealthEndpoint, MetricsEndpoint, Readiness
from ..observe.health import probe_api
from ..observe.service import EndpointAddresses, serve_endpoints
from .auth import Authenticator, AuthResult
from .config import KubernetesConfig
from .connection import ConnectionRuntime
from .pod import ConnectedPod, ConnectionHandler
from .podtemplate import label_selector_for_instance
from .podwatch import PodWatchHub
from .session import SessionConfig

log = logging.getLogger(__name__)


def session_config_for(config: KubernetesConfig) -> SessionConfig:
    """The session machine's config from the ``kubernetes.pod`` section."""
    return SessionConfig(
        shell_command=tuple(config.pod.shell_command),
        subsystems={name: (program,) for name, program in config.pod.subsystems.items()},
    )


@attrs.frozen
class GatewayOptions:
    """Everything :func:`serve_gateway` needs."""

    kubernetes: KubernetesConfig
    """Where pods go and what they look like."""
    authenticator: Authenticator
    """Who may connect (the gateway core refuses everyone else)."""
    host_keys: tuple[bytes, ...]
    """SSH host private keys (OpenSSH or PEM)."""
    host: str = "127.0.0.1"
    port: int = 2222
    """0 picks a free port (see the address reported by ``task_status``)."""
    instance: str = attrs.field(factory=socket.gethostname)
    """This gateway's name, written into every pod's labels (orphan clean-up)."""
    metrics: GatewayMetrics | None = None
    """Where to count (see :attr:`Gateway.metrics`); None: a new one for this run."""
    metrics_endpoint: MetricsEndpoint | None = None
    """Serve the metrics over HTTP here (None: not served)."""
    health_endpoint: HealthEndpoint | None = None
    """Serve ``/healthz`` and ``/readyz`` here (None: not served)."""
    readiness: Readiness | None = None
    """The readiness state to use (see :attr:`Gateway.readiness`); None: a new one."""


SHUTDOWN_MESSAGE = "the gateway is shutting down"


@attrs.define(eq=False)
class Gateway:
    """A running gateway (reported by :func:`serve_gateway`'s ``task_status``)."""

    address: tuple[str, int]
    """The bound SSH address."""
    connections: dict[str, ConnectionRuntime] = attrs.field(factory=dict)
    """Live connections by connection id."""
    metrics: GatewayMetrics = attrs.field(factory=GatewayMetrics, repr=False)
    """The gateway's metrics (its own Prometheus registry: ``metrics.registry``)."""
    readiness: Readiness = attrs.field(factory=Readiness, repr=False)
    """Readiness; other parts mark conditions with ``readiness.set_unready(name, why)``."""
    endpoints: EndpointAddresses = attrs.field(factory=EndpointAddresses)
    """The bound metrics and health addresses (None where not served)."""
    _server: _Server | None = attrs.field(default=None, repr=False, alias="_server")

    @property
    def ready(self) -> bool:
        """What ``/readyz`` says: listening, not draining, the API answers, no condition
        failing (``readiness.reasons()`` tells why not)."""
        return self.readiness.ready

    async def shutdown(self, grace: float = 30.0, message: str = SHUTDOWN_MESSAGE) -> None:
        """Shut down gracefully; :func:`serve_gateway` returns once this is done.

        Stop accepting; write ``message`` on the stderr of every open session and
        refuse new sessions; let sessions finish for ``grace`` seconds (a connection
        closes as soon as its last session has ended); then end the rest (``message``
        and exit status 255 on each session) and wait until every pod is deleted.
        Trio-flavoured; safe to call more than once.
        """
        assert self._server is not None, "the gateway is not running"
        await self._server.shutdown(grace, message)


class _Server:
    def __init__(self, options: GatewayOptions, kube: KubeClient, nursery: trio.Nursery,
                 hub: PodWatchHub | None = None) -> None:
        self.options = options
        self.kube = kube
        self.hub = hub
        self.nursery = nursery
        self.session_config = session_config_for(options.kubernetes)
        self.metrics = options.metrics or GatewayMetrics()
        self.readiness = options.readiness or Readiness()
        self.gateway = Gateway(("", 0), metrics=self.metrics, readiness=self.readiness,
                               _server=self)
        self.acceptor: Any = None
        self.closing: str | None = None
        """Set once shutdown began: the message for new connections."""
        self.stopped = trio.Event()
        """Set once a graceful shutdown is complete: serve_gateway returns."""
        self._changed = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    def ssh_server(self) -> sshserver.GatewaySSHServer:
        """asyncssh's server factory: one per TCP connection."""
        return sshserver.GatewaySSHServer(self.make_portal, self.options.authenticator,
                                          connection_id=secrets.token_hex(8),
                                          metrics=self.metrics)

    def make_portal(self, ssh: sshserver.GatewaySSHServer) -> ConnectionRuntime:
        """Called on handshake success: start the connection's task."""
        cid = ssh.connection_id
        client = f"{ssh.peer[0]}:{ssh.peer[1]}"
        adapter = logging.LoggerAdapter(log, {"connection_id": cid})
        handler = ConnectionHandler(self.options.kubernetes, cid, client,
                                    adapter, kube=self.kube, instance=self.options.instance,
                                    hub=self.hub, metrics=self.metrics)
        auth: AuthResult = ssh.auth_result or AuthResult()
        runtime = ConnectionRuntime(handler, self.session_config, username=ssh.username,
                                    auth=auth, make_target=self._target, close_connection=ssh.close,
                                    metrics=self.metrics)
        if self.closing is not None:  # authenticated while the gateway shuts down
            self.metrics.connection_rejected("shutdown")
            runtime.abort(self.closing)
            return runtime
        log.info("connection %s: %r from %s authenticated (%s)", cid, ssh.username, client,
                 auth.method or "?", extra={"event": "connection-start", "connection_id": cid,
                                            "username": ssh.username, "client": client})
        self.gateway.connections[cid] = runtime
        self.nursery.start_soon(self._run_connection, runtime)
        return runtime

    def _target(self, pod: ConnectedPod) -> sshserver.ExecTarget:
        return sshserver.ExecTarget(self.kube.exec_client, pod.namespace, pod.name, pod.container,
                                    metrics=self.metrics)

    async def _run_connection(self, runtime: ConnectionRuntime) -> None:
        started = trio.current_time()
        try:
            # Shielded: the server's own cancellation must not reach the sessions before
            # abort_all() has told them why; abort_all() then cancels this scope.
            with trio.CancelScope(shield=True) as scope:
                self._scopes.add(scope)
                await runtime.run()
        finally:
            self._scopes.discard(scope)
            self.gateway.connections.pop(runtime.connection_id, None)
            self._changed.set()
            took = round(1000 * (trio.current_time() - started))
            log.info("connection %s ended after %d ms", runtime.connection_id, took, extra={
                "event": "connection-end", "connection_id": runtime.connection_id,
                "duration_ms": took})

    async def _wait_connections_gone(self) -> None:
        while self.gateway.connections:
            self._changed = trio.Event()
            await self._changed.wait()

    async def close_listener(self) -> None:
        acceptor, self.acceptor = self.acceptor, None
        if acceptor is not None:
            with trio.move_on_after(5, shield=True):
                await run_aio(sshserver.close_listener, acceptor)

    def abort_all(self, message: str) -> None:
        """End every connection now (synchronous: safe in a ``finally``)."""
        self.closing = self.closing or message
        for runtime in list(self.gateway.connections.values()):
            runtime.abort(message)
        for scope in self._scopes:
            scope.cancel()

    async def shutdown(self, grace: float, message: str) -> None:
        if self.closing is None:
            self.closing = message
            self.readiness.draining()
            self.readiness.log_change()
            log.info("shutting down: %d connections, grace %gs", len(self.gateway.connections),
                     grace, extra={"event": "shutdown"})
            await self.close_listener()
            for runtime in list(self.gateway.connections.values()):
                runtime.drain(message)
            with trio.move_on_after(grace):
                await self._wait_connections_gone()
            self.abort_all(message)
            await self._wait_connections_gone()
            self.stopped.set()
        await self.stopped.wait()


async def serve_gateway(
    options: GatewayOptions,
    *,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SSH until cancelled or :meth:`Gateway.shutdown`. Trio-flavoured.

    Reports the :class:`Gateway` through ``task_status`` once it accepts connections.
    When cancelled, it stops accepting, ends every connection (``the gateway is
    shutting down`` and exit status 255 on each session) and deletes every pod
    (each bounded by ``timeouts.podStop``) before it returns.
    """
    async with ensure_aio_loop(), open_kube_client(options.kubernetes) as kube, \
            trio.open_nursery() as nursery:
        hub = await nursery.start(PodWatchHub(
            kube, label_selector_for_instance(options.instance)).run)
        server = _Server(options, kube, nursery, hub)
        await _start_observing(server, kube, hub, nursery)
        keys = [sshserver.load_host_key(k) for k in options.host_keys]
        server.acceptor = await run_aio(functools.partial(
            sshserver.listen, options.host, options.port, host_keys=keys,
            server_factory=server.ssh_server))
        try:
            sockname = server.acceptor.sockets[0].getsockname()
            server.gateway.address = (str(sockname[0]), int(sockname[1]))
            server.readiness.listening()
            log.info("gateway listening on %s:%d", *server.gateway.address,
                     extra={"event": "listening"})
            task_status.started(server.gateway)
            await server.stopped.wait()
        finally:
            server.readiness.draining()
            await server.close_listener()
            server.readiness.listening(False)
            server.abort_all(SHUTDOWN_MESSAGE)
            nursery.cancel_scope.cancel()


async def _start_observing(server: _Server, kube: KubeClient, hub: PodWatchHub,
                           nursery: trio.Nursery) -> None:
    """Metrics sources, the API probe behind readiness, and the HTTP endpoints."""
    options, metrics = server.options, server.metrics
    kube.observe_requests(metrics.api_request)
    nursery.start_soon(_unregister_on_exit, metrics.watch_pods(hub.phase_counts))
    metrics.watch_ready(lambda: server.readiness.ready)
    http = options.kubernetes.timeouts.http
    server.readiness.starting()
    server.readiness.watch_api(lambda: kube.last_answer, grace=2 * http)
    nursery.start_soon(probe_api, kube, server.readiness, http / 2)
    if options.metrics_endpoint is not None or options.health_endpoint is not None:
        server.gateway.endpoints = await nursery.start(functools.partial(
            serve_endpoints, metrics, server.readiness, loop_roundtrip,
            metrics_at=options.metrics_endpoint, health_at=options.health_endpoint))


async def _unregister_on_exit(undo: Callable[[], None]) -> None:
    try:
        await trio.sleep_forever()
    finally:
        undo()


@contextlib.asynccontextmanager
async def open_gateway(options: GatewayOptions) -> AsyncIterator[Gateway]:
    """Run the gateway for the duration of the block; yields the :class:`Gateway`."""
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(functools.partial(serve_gateway, options))
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
