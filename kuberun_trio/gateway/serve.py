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
    ├── (Lease acquired; start-up sweep of this instance's pods, if configured)
    ├── LeaseKeeper.run                 renews the instance's Lease (lease.py), if configured
    ├── Reaper.run                      delete retries + periodic orphan sweeps (reaper.py)
    ├── PodWatchHub                     one shared pod watch per namespace (all connections)
    ├── SSH listener                    asyncssh; each handshake → make_portal()
    └── connection task xN              ConnectionRuntime.run (pod + sessions)

With ``GatewayOptions.lease``, the Lease is taken *before* anything touches pods: a
gateway whose instance name a live namesake holds raises
:class:`~kuberun_trio.gateway.lease.LeaseHeldError` and never starts. While the Lease
cannot be renewed the listener is closed (:attr:`Gateway.accepting` is False; open
connections go on) and reopened on the same port once it is back. On the way out,
after every pod is deleted, the Lease is released. Every pod carries the process's
holder identity (and the Lease's name) as annotations, which the sweeps go by.

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
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from ..aio import sshserver, sshsession
from ..aio.bridge import ensure_aio_loop, loop_roundtrip, run_aio
from ..aio.kube import KubeClient, open_kube_client
from ..aio.linger import Lingering
from ..core.audit import AuditPolicy, ConnectionEnd
from ..core.auth import Authenticator, AuthResult
from ..core.config import KubernetesConfig
from ..core.connsettings import Configure, ConnectionSettings, LoginInfo
from ..core.forwarding import AgentOptions, ForwardingPolicy
from ..core.limits import Admission, Limits, fd_limit, open_fds
from ..core.podtemplate import label_selector_for_instance
from ..core.session import SessionConfig
from ..observe import GatewayMetrics, HealthEndpoint, MetricsEndpoint, Readiness
from ..observe.health import probe_api
from ..observe.service import EndpointAddresses, serve_endpoints
from ..recording import Recorder, RecordingOptions
from .connection import ConnectionRuntime
from .lease import (
    ANNOTATION_HOLDER,
    ANNOTATION_LEASE,
    LeaseKeeper,
    LeaseOptions,
    default_instance,
    holder_identity,
)
from .login import LoginGate
from .pod import ConnectedPod, ConnectionHandler
from .podwatch import PodWatchHub
from .reaper import GcOptions, Reaper
from .throttle import LoginPolicy
from .timelimits import SessionTimeLimits

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
    instance: str = attrs.field(factory=default_instance)
    """This gateway's name, written into every pod's labels (orphan clean-up); default:
    ``POD_NAME`` in a cluster, else the host name."""
    lease: LeaseOptions | None = None
    """Hold a Lease for the instance (one live gateway per name; siblings sweep a dead
    one's pods). None: no Lease, and no cross-replica sweep."""
    gc: GcOptions = attrs.Factory(GcOptions)
    """The reaper and the orphan sweeps."""
    login: LoginPolicy = attrs.Factory(LoginPolicy)
    """Login throttling and tries per connection (one limiter per gateway; :mod:`.throttle`)."""
    limits: Limits = attrs.Factory(Limits)
    """Connection, session and signal limits (:mod:`kuberun_trio.core.limits`)."""
    audit: AuditPolicy = attrs.field(factory=AuditPolicy)
    """What the audit log records of client input (commands: on, cut at 1024 bytes)."""
    metrics: GatewayMetrics | None = None
    """Where to count (see :attr:`Gateway.metrics`); None: a new one for this run."""
    metrics_endpoint: MetricsEndpoint | None = None
    """Serve the metrics over HTTP here (None: not served)."""
    health_endpoint: HealthEndpoint | None = None
    """Serve ``/healthz`` and ``/readyz`` here (None: not served)."""
    readiness: Readiness | None = None
    """The readiness state to use (see :attr:`Gateway.readiness`); None: a new one."""
    time_limits: SessionTimeLimits = attrs.Factory(SessionTimeLimits)
    """Idle and maximum session time (:mod:`.timelimits`; both off by default). With a
    maximum, every pod gets ``activeDeadlineSeconds`` (duration + grace + podStop)."""
    recording: RecordingOptions | None = None
    """Record every session channel as an asciicast v2 file (:mod:`kuberun_trio.recording`);
    None: no recording."""
    forwarding: ForwardingPolicy = attrs.Factory(ForwardingPolicy)
    """Port forwarding (``ssh -L``/``-D`` to the pod; :mod:`..core.forwarding`); off by default."""
    agent: AgentOptions = attrs.Factory(AgentOptions)
    """Agent forwarding (``ssh -A``, :mod:`.agent`); off by default."""
    configure: Configure | None = None
    """Decide each connection's own settings after its login (its ``kubernetes`` config,
    environment, files; :mod:`..core.connsettings`); None: every connection gets ``kubernetes``.
    The server's is ContainerSSH's configuration webhook (``configserver``)."""


SHUTDOWN_MESSAGE = "the gateway is shutting down"


@attrs.define(eq=False)
class Gateway:
    """A running gateway (reported by :func:`serve_gateway`'s ``task_status``)."""

    address: tuple[str, int]
    """The bound SSH address."""
    connections: dict[str, ConnectionRuntime] = attrs.field(factory=dict)
    """Live connections by connection id."""
    accepting: bool = False
    """The listener is open (False before start, after shutdown began, and while the
    Lease cannot be renewed): what a readiness check reports."""
    lease: LeaseKeeper | None = None
    """The instance's Lease (``lease.held``), if the gateway runs with one."""
    reaper: Reaper | None = None
    """Delete retries and orphan sweeps (``reaper.orphan_pods_deleted``)."""
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
                 hub: PodWatchHub | None = None, reaper: Reaper | None = None) -> None:
        self.options = options
        self.kube = kube
        self.hub = hub
        self.reaper = reaper
        self.recorder: Recorder | None = None
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
        self.login = LoginGate(options.authenticator, options.login)
        """Every login attempt of every connection waits its turn here."""
        self.admission = Admission(options.limits, fd_limit=fd_limit(),
                                   fds_at_start=open_fds() or 0)
        """Counts connections, users and sessions against ``options.limits``."""
        self.lingering = Lingering()
        """Sockets the gateway closed that wait for their client to read why."""

    def ssh_server(self) -> sshserver.GatewaySSHServer:
        """asyncssh's server factory: one per TCP connection."""
        return sshserver.GatewaySSHServer(self.make_portal, self.login,
                                          connection_id=secrets.token_hex(8),
                                          admission=self.admission,
                                          audit_policy=self.options.audit,
                                          metrics=self.metrics,
                                          forwarding=self.options.forwarding,
                                          lingering=self.lingering,
                                          configure=(self._configure if self.options.configure
                                                     is not None else None))

    async def _configure(self, login: LoginInfo) -> ConnectionSettings:
        """``options.configure``, with what the gateway adds to every pod kept: the
        cluster connection, the holder/Lease annotations, ``activeDeadlineSeconds``."""
        assert self.options.configure is not None
        settings = await self.options.configure(login)
        static = self.options.kubernetes
        pod = settings.kubernetes.pod
        metadata = dict(pod.metadata)
        ours = {key: value for key, value in static.pod.metadata["annotations"].items()
                if key in (ANNOTATION_HOLDER, ANNOTATION_LEASE)}
        metadata["annotations"] = {**(metadata.get("annotations") or {}), **ours}
        kubernetes = attrs.evolve(settings.kubernetes, connection=static.connection,
                                  pod=attrs.evolve(pod, metadata=metadata))
        options = _with_deadline(attrs.evolve(self.options, kubernetes=kubernetes))
        return attrs.evolve(settings, kubernetes=options.kubernetes)

    def make_portal(self, ssh: sshserver.GatewaySSHServer) -> ConnectionRuntime:
        """Called on handshake success: start the connection's task."""
        cid = ssh.connection_id
        client = ssh.audit.remote_address
        ssh.audit.on_end = lambda end: self.metrics.connection_ended(end.value)
        adapter = logging.LoggerAdapter(log, ssh.audit.fields)
        settings: ConnectionSettings | None = ssh.settings
        kubernetes = settings.kubernetes if settings is not None else self.options.kubernetes
        handler = ConnectionHandler(kubernetes, cid, client,
                                    adapter, kube=self.kube, instance=self.options.instance,
                                    hub=self.hub, reaper=self.reaper,
                                    metrics=self.metrics)
        auth: AuthResult = ssh.auth_result or AuthResult()
        session_config = self.session_config
        forwarding, agent = self.options.forwarding, self.options.agent
        if settings is not None:
            auth = settings.auth_for(auth)
            session_config = session_config_for(settings.kubernetes)
            forwarding = settings.forwarding or forwarding
            agent = settings.agent or agent
        runtime = ConnectionRuntime(handler, session_config, username=ssh.username,
                                    auth=auth, make_target=self._target, close_connection=ssh.close,
                                    audit=ssh.audit, metrics=self.metrics,
                                    time_limits=self.options.time_limits,
                                    recorder=self.recorder,
                                    forwarding=forwarding, agent=agent,
                                    files=settings.files if settings is not None else None)
        if self.closing is not None:  # authenticated while the gateway shuts down
            self.metrics.connection_rejected("shutdown")
            runtime.abort(self.closing)
            ssh.audit.connection_end(self.closing, ConnectionEnd.SHUTDOWN)
            return runtime
        log.info("connection %s: %r from %s authenticated (%s)", cid, ssh.username, client,
                 auth.method or "?", extra={"event": "connection-start", **ssh.audit.fields,
                                            "username": ssh.username})
        self.gateway.connections[cid] = runtime
        self.nursery.start_soon(self._run_connection, runtime)
        return runtime

    def _target(self, pod: ConnectedPod) -> sshsession.ExecTarget:
        return sshsession.ExecTarget(self.kube.exec_client, pod.namespace, pod.name, pod.container,
                                     throttle=self.kube.exec_throttle,
                                     metrics=self.metrics)

    async def _run_connection(self, runtime: ConnectionRuntime) -> None:
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
            runtime.audit.connection_end(runtime.end_reason or "ended",
                                         runtime.end_kind or ConnectionEnd.ERROR,
                                         username=runtime.username)

    async def _wait_connections_gone(self) -> None:
        while self.gateway.connections:
            self._changed = trio.Event()
            await self._changed.wait()

    async def close_listener(self) -> None:
        acceptor, self.acceptor = self.acceptor, None
        self.gateway.accepting = False
        self.readiness.listening(False)
        if acceptor is not None:
            with trio.move_on_after(5, shield=True):
                await run_aio(sshserver.close_listener, acceptor)

    async def listen(self, port: int) -> None:
        keys = [sshserver.load_host_key(k) for k in self.options.host_keys]
        interval, count = self.options.limits.keepalive()
        # The login grace time is the server's own timer (it tells the client why).
        ssh_options = {"login_timeout": None, "keepalive_interval": interval,
                       "keepalive_count_max": count}
        self.acceptor = await run_aio(functools.partial(
            sshserver.listen, self.options.host, port, host_keys=keys,
            server_factory=self.ssh_server, options=ssh_options))
        sockname = self.acceptor.sockets[0].getsockname()
        self.gateway.address = (str(sockname[0]), int(sockname[1]))
        self.gateway.accepting = True
        self.readiness.listening()

    def lease_lost(self, why: str) -> None:
        """The Lease cannot be renewed: stop accepting (open connections go on)."""
        log.error("not accepting connections: the Lease is lost (%s)", why,
                  extra={"event": "accepting-stopped", "reason": why})
        self.readiness.set_unready("lease", f"the Lease is lost: {why}")
        self.nursery.start_soon(self.close_listener)

    def lease_regained(self) -> None:
        """The Lease is back: listen again on the same port."""
        self.readiness.set_ready("lease")
        if self.closing is None and self.acceptor is None:
            self.nursery.start_soon(self._listen_again)

    async def _listen_again(self) -> None:
        try:
            await self.listen(self.gateway.address[1])
        except OSError as exc:
            log.error("cannot listen again on port %d: %s", self.gateway.address[1], exc,
                      extra={"event": "listen-failed", "reason": str(exc)})
            return
        log.info("accepting connections again on %s:%d", *self.gateway.address,
                 extra={"event": "accepting-resumed"})

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
            count = len(self.gateway.connections)
            log.info("shutting down: %d connection%s, grace %gs", count,
                     "" if count == 1 else "s", grace, extra={"event": "shutdown"})
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
    async with ensure_aio_loop(), open_kube_client(options.kubernetes) as kube:
        keeper: LeaseKeeper | None = None
        if options.lease is not None:
            keeper = LeaseKeeper(kube, options.lease, options.instance)
            await keeper.acquire()  # before anything touches pods
        try:
            await _serve(_with_deadline(_with_identity(options, keeper)), kube, keeper,
                         task_status)
        finally:
            if keeper is not None:
                await keeper.release()


def _with_identity(options: GatewayOptions, keeper: LeaseKeeper | None) -> GatewayOptions:
    """``options`` whose pods carry the holder identity (and Lease) annotations."""
    holder = keeper.holder if keeper is not None else holder_identity(options.instance)
    pod = options.kubernetes.pod
    metadata = dict(pod.metadata)
    annotations = {**(metadata.get("annotations") or {}), ANNOTATION_HOLDER: holder}
    if keeper is not None:
        annotations[ANNOTATION_LEASE] = keeper.ref
    metadata["annotations"] = annotations
    kubernetes = attrs.evolve(options.kubernetes, pod=attrs.evolve(pod, metadata=metadata))
    return attrs.evolve(options, kubernetes=kubernetes)


def _with_deadline(options: GatewayOptions) -> GatewayOptions:
    """``options`` whose pods carry ``activeDeadlineSeconds`` for ``maxSessionDuration``
    (the smaller one if the configured spec has its own); not in ``persistent`` mode."""
    deadline = options.time_limits.active_deadline(options.kubernetes.timeouts.pod_stop)
    if deadline is None or options.kubernetes.pod.mode == "persistent":
        return options  # a user's pod outlives connections: no per-connection deadline
    pod = options.kubernetes.pod
    spec = dict(pod.spec)
    own = spec.get("activeDeadlineSeconds")
    spec["activeDeadlineSeconds"] = min(deadline, own) if isinstance(own, int) else deadline
    kubernetes = attrs.evolve(options.kubernetes, pod=attrs.evolve(pod, spec=spec))
    return attrs.evolve(options, kubernetes=kubernetes)


async def _serve(options: GatewayOptions, kube: KubeClient, keeper: LeaseKeeper | None,
                 task_status: trio.TaskStatus[Gateway]) -> None:
    holder = str(options.kubernetes.pod.metadata["annotations"][ANNOTATION_HOLDER])
    namespace = str(options.kubernetes.pod.metadata.get("namespace") or "default")
    if options.metrics is None:  # one registry from the start-up sweep on
        options = attrs.evolve(options, metrics=GatewayMetrics())
    assert options.metrics is not None
    lingering: Lingering | None = None
    try:
        async with trio.open_nursery() as nursery:
            connections: dict[str, ConnectionRuntime] = {}
            reaper = Reaper(kube, namespace=namespace, instance=options.instance, holder=holder,
                            options=options.gc, live_connections=lambda: list(connections),
                            keeper=keeper, delete_timeout=options.kubernetes.timeouts.pod_stop)
            reaper.on_orphan_deleted = options.metrics.orphan_pods_deleted
            reaper.persistent_idle_timeout = options.kubernetes.pod.persistent_idle_timeout
            reaper.on_persistent_deleted = options.metrics.persistent_pods_deleted
            if options.gc.startup_sweep:
                await reaper.sweep_at_start()
            hub = await nursery.start(PodWatchHub(
                kube, label_selector_for_instance(options.instance)).run)
            server = _Server(options, kube, nursery, hub, reaper)
            lingering = server.lingering
            if options.recording is not None:
                server.recorder = Recorder(options.recording)
                await nursery.start(server.recorder.run)
            server.gateway.connections = connections
            server.gateway.lease, server.gateway.reaper = keeper, reaper
            await _start_observing(server, kube, hub, nursery)
            await nursery.start(reaper.run)
            if keeper is not None:
                keeper.on_lost, keeper.on_regained = server.lease_lost, server.lease_regained
                await nursery.start(keeper.run)
            await server.listen(options.port)
            try:
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
    finally:
        if lingering is not None:  # the connections' closes have run
            lingering.abort_all()


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
