"""The default command: run the gateway server until SIGTERM/SIGINT.

Theory of operation
-------------------
:func:`run` checks everything it can before an event loop exists (configuration, files,
the kubeconfig, host keys; in demo mode it first takes the state directory's lock, so a
second demo stops before touching the first one's files), then ``trio.run``\\ s
:func:`serve`. One nursery tree::

    serve
    ├── signal watcher       SIGHUP: authenticator.reload(); SIGTERM/SIGINT: see below
    └── startup/serve scope
        ├── embedded cluster (demo mode only)
        └── serve_gateway    the library: Lease (refuses to start if a live namesake holds
                             it), start-up sweep of this instance's pods left by a run that
                             died, reaper and periodic sweeps, listener + one task per
                             connection (:func:`gateway_options` turns ``lease``/``gc`` into
                             the library's options)

Shutdown: the first SIGTERM/SIGINT sets ``shutdown``. While still starting, that cancels
the start. Once serving, the gateway shuts down gracefully -- if the library offers
``Gateway.shutdown(grace, message)``, it stops accepting, tells every open session, and
waits up to ``--grace`` seconds; then the serve scope is cancelled, which closes the
listener, ends every connection and deletes every pod (shielded, bounded by
``timeouts.podStop``). Exit 0. A second signal cancels at once (skipping the grace
period; pods are still deleted) and exits 1; a third leaves without any clean-up
(``os._exit(1)``): the next start's orphan sweep, or another replica once the Lease has
expired, removes what is left. Signals are
received with ``trio.open_signal_receiver`` -- no handler ever raises or exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import logging
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from ..aio.bridge import open_aio_loop
from ..aio.kube import open_kube_client
from ..core.auth import Authenticator
from ..core.config import ConnectionConfig, KubernetesConfig
from ..core.connsettings import Configure
from ..errors import ConfigError, KuberunError
from ..gateway.lease import LeaseOptions
from ..gateway.reaper import GcOptions
from ..gateway.serve import Gateway, GatewayOptions, serve_gateway
from ..observe import GatewayMetrics, HealthEndpoint, MetricsEndpoint
from .authconfig import AuthConfig
from .config import ServerConfig, check_files
from .demo import connect_host, ssh_command
from .gc import collect_orphans
from .keys import fingerprint, load_private_key
from .settings import Settings

log = logging.getLogger("kuberun_trio.server")

DEFAULT_GRACE = 10.0
SHUTDOWN_MESSAGE = "the gateway is shutting down"
"""What each open session reads on stderr (the library prefixes ``kuberun: ``)."""
EXIT_OK, EXIT_FORCED = 0, 1


@attrs.frozen
class HostKey:
    """A host key as the server uses it."""

    data: bytes = attrs.field(repr=False)
    """The private key file's bytes (OpenSSH or PEM)."""
    source: str
    """Where it came from (a path)."""
    fingerprint: str
    """``SHA256:...``."""
    generated: bool = False
    """Made by this run (no host key was configured and the state dir had none)."""


def load_host_keys(settings: Settings) -> list[HostKey]:
    """The configured host keys, or the state dir's ed25519 key (generated if missing)."""
    paths = settings.config.ssh.host_keys
    if not paths:
        key, created = settings.state.ensure_host_key()
        generated = settings.state.host_key
        return [HostKey(generated.read_bytes(), str(generated), fingerprint(key), created)]
    keys = []
    for path in paths:
        data = Path(os.path.expanduser(path)).read_bytes()
        keys.append(HostKey(data, path, fingerprint(load_private_key(data))))
    return keys


def build_authenticator(auth: AuthConfig, metrics: GatewayMetrics | None = None
                        ) -> Authenticator:
    """The server's authenticator for the ``auth`` section (see :mod:`kuberun_trio.server.auth`)."""
    from .auth import build_authenticator as build

    authenticator: Authenticator = build(auth, logger=logging.getLogger("kuberun_trio.auth"),
                                         metrics=metrics)
    return authenticator


async def reload_authenticator(authenticator: Authenticator) -> None:
    """SIGHUP: re-read authorized keys and password files (if the authenticator can)."""
    reload: Callable[[], Any] | None = getattr(authenticator, "reload", None)
    if reload is None:
        log.warning("SIGHUP ignored: the authenticator cannot reload", extra={"event": "reload"})
        return
    try:
        result = reload()
        if inspect.isawaitable(result):
            await result
    except (KuberunError, OSError, ValueError) as exc:
        log.error("reload failed, keeping the old credentials: %s", exc,
                  extra={"event": "reload-failed"})
    else:
        log.info("authentication reloaded", extra={"event": "reload"})


class _Signals:
    """What the signal watcher has seen; the serve task acts on it."""

    def __init__(self) -> None:
        self.shutdown = trio.Event()
        self.forced = False
        self.serving = False
        self.start_scope = trio.CancelScope()
        self.serve_scope = trio.CancelScope()

    async def watch(self, receiver: AsyncIterator[int], authenticator: Authenticator) -> None:
        async for signum in receiver:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                await reload_authenticator(authenticator)
            elif not self.shutdown.is_set():
                log.info("%s: shutting down", name, extra={"event": "shutdown-requested"})
                self.shutdown.set()
                if not self.serving:
                    self.start_scope.cancel()
            elif not self.forced:
                log.warning("%s again: forcing shutdown now", name,
                            extra={"event": "shutdown-forced"})
                self.forced = True
                self.start_scope.cancel()
                self.serve_scope.cancel()
            else:
                log.error("%s a third time: exiting without clean-up", name,
                          extra={"event": "shutdown-abandoned"})
                os._exit(EXIT_FORCED)


def _banner(settings: Settings, gateway: Gateway, host_keys: list[HostKey],
            out: TextIO) -> None:
    host, port = gateway.address
    mode = "embedded cluster" if settings.demo else settings.config.kubernetes.connection.source
    print(f"kuberun_trio gateway listening on {host}:{port} "
          f"(instance {settings.config.instance}, {mode})", file=out)
    for key in host_keys:
        note = " (generated)" if key.generated else ""
        print(f"host key {key.fingerprint} {key.source}{note}", file=out)
    if gateway.endpoints.metrics is not None:
        mhost, mport = gateway.endpoints.metrics
        print(f"metrics at http://{connect_host(mhost)}:{mport}{settings.config.metrics.path}",
              file=out)
    if gateway.endpoints.health is not None:
        hhost, hport = gateway.endpoints.health
        print(f"health at http://{connect_host(hhost)}:{hport}/readyz", file=out)
    print("connect with:", file=out)
    if settings.demo:
        print(f"  {ssh_command(settings.state, connect_host(host), port)}", file=out)
    else:
        command = shlex.join(["ssh", "-p", str(port), f"USER@{connect_host(host)}"])
        fingerprints = ", ".join(key.fingerprint for key in host_keys)
        print(f"  {command}   # ssh must show the host key {fingerprints}", file=out)
    out.flush()


SFTP_PACKAGE = "openssh-sftp-server"
DEFAULT_SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def check_demo_sftp(kubernetes: KubernetesConfig) -> str | None:
    """Demo pods run the host's files: warn (one line) if the sftp server is not there."""
    program = kubernetes.pod.subsystems.get("sftp")
    if program is None or os.access(program, os.X_OK):
        return None
    if program == DEFAULT_SFTP_SERVER:
        hint = f"install it: sudo apt-get install {SFTP_PACKAGE}"
    else:
        hint = "fix kubernetes.pod.subsystems.sftp"
    message = (f"sftp and scp will fail: {program} is missing on this host (the demo's pods "
               f"run on the host's files); {hint}")
    log.warning(message, extra={"event": "sftp-server-missing", "program": program})
    return message


async def serve(settings: Settings, host_keys: list[HostKey], *, grace: float = DEFAULT_GRACE,
                out: TextIO | None = None) -> int:
    """Run the server until a signal ends it. Trio-flavoured; returns the exit code."""
    out = out or sys.stdout
    auth = settings.config.auth
    if settings.demo:
        settings.state.ensure_client_key()
        auth = attrs.evolve(auth, authorized_keys=(*auth.authorized_keys,
                                                   str(settings.state.authorized_keys)))
    metrics = GatewayMetrics()
    authenticator = build_authenticator(auth, metrics)
    if settings.demo:
        check_demo_sftp(settings.config.kubernetes)
    state = _Signals()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as receiver:
        async with trio.open_nursery() as watchers:
            watchers.start_soon(state.watch, receiver, authenticator)
            with state.start_scope:
                await _serve(settings, host_keys, authenticator, state, grace, out, metrics)
            watchers.cancel_scope.cancel()
    if state.forced:
        return EXIT_FORCED
    return EXIT_OK


async def _serve(settings: Settings, host_keys: list[HostKey], authenticator: Authenticator,
                 state: _Signals, grace: float, out: TextIO, metrics: GatewayMetrics) -> None:
    async with open_aio_loop(), contextlib.AsyncExitStack() as stack:
        kubernetes = settings.config.kubernetes
        if settings.demo:
            from ..cluster import open_embedded_cluster

            cluster = await stack.enter_async_context(open_embedded_cluster(
                https=True, kubeconfig_path=settings.state.kubeconfig, private_tmp=True))
            kubernetes = attrs.evolve(kubernetes, connection=ConnectionConfig(
                kubeconfig=str(cluster.kubeconfig_path)))
            log.info("embedded cluster serving at %s", cluster.url,
                     extra={"event": "cluster-started",
                            "kubeconfig": str(cluster.kubeconfig_path)})
        host, port = settings.config.ssh.address
        options = GatewayOptions(kubernetes=kubernetes, authenticator=authenticator,
                                 host_keys=tuple(k.data for k in host_keys), host=host,
                                 port=port, instance=settings.config.instance,
                                 login=settings.config.auth.login_policy(),
                                 limits=settings.config.limits,
                                 audit=settings.config.log.audit, metrics=metrics,
                                 **endpoint_options(settings),
                                 time_limits=settings.config.ssh.time_limits,
                                 recording=settings.config.audit.recording,
                                 forwarding=settings.config.security.forwarding.policy(),
                                 agent=settings.config.security.forwarding.agent,
                                 configure=config_hook(settings, metrics),
                                 **gateway_options(settings.config, kubernetes))
        with state.serve_scope:
            async with trio.open_nursery() as nursery:
                try:
                    gateway: Gateway = await nursery.start(serve_gateway, options)
                except* OSError as group:
                    _raise_bind_error(group, host, port)
                    raise
                state.serving = True
                if settings.demo:
                    keys = [load_private_key(k.data) for k in host_keys]
                    settings.state.write_known_hosts(connect_host(gateway.address[0]),
                                                     gateway.address[1], keys)
                _banner(settings, gateway, host_keys, out)
                log.info("serving", extra={"event": "gateway-started",
                                           "address": f"{host}:{gateway.address[1]}"})
                await state.shutdown.wait()
                await _graceful(gateway, grace)
                nursery.cancel_scope.cancel()
        log.info("all connections closed", extra={"event": "shutdown-complete"})


def config_hook(settings: Settings, metrics: GatewayMetrics | None = None
                ) -> Configure | None:
    """``GatewayOptions.configure`` for ``configserver`` (None when it has no url)."""
    from .configwebhook import ConfigWebhook

    if not settings.config.configserver.url:
        return None
    webhook = ConfigWebhook(settings.config.configserver, settings.data, metrics=metrics,
                            logger=logging.getLogger("kuberun_trio.configserver"))
    if webhook.plain_http_remote:
        log.warning("configserver.url %s uses plain http:// to a host that is not loopback: "
                    "the login's metadata and the pods' settings travel unprotected",
                    webhook.url, extra={"event": "config-webhook"})
    return webhook.configure


def gateway_options(config: ServerConfig, kubernetes: KubernetesConfig,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``lease`` and ``gc`` of :class:`GatewayOptions` from the ``lease``/``gc`` sections.

    The Lease's namespace: ``lease.namespace``, else ``POD_NAMESPACE`` in a cluster, else
    the pods' namespace. The server always runs the start-up sweep (after the Lease)."""
    env = os.environ if environ is None else environ
    pods_ns = str(kubernetes.pod.metadata.get("namespace") or "default")
    gc = GcOptions(sweep_interval=config.gc.sweep_interval, margin=config.gc.margin,
                   cross_instance=config.gc.cross_instance, startup_sweep=True)
    if not config.lease.enabled:
        log.warning("running without a Lease: a second gateway with instance %s would not "
                    "be refused, and other replicas' orphans are not collected",
                    config.instance, extra={"event": "lease-disabled"})
        return {"lease": None, "gc": gc}
    in_cluster = env.get("POD_NAMESPACE") if env.get("KUBERNETES_SERVICE_HOST") else None
    lease = LeaseOptions(namespace=config.lease.namespace or in_cluster or pods_ns,
                         duration=config.lease.duration,
                         renew_interval=config.lease.renew_interval)
    return {"lease": lease, "gc": gc}


def _raise_bind_error(group: BaseExceptionGroup[OSError], host: str, port: int) -> None:
    """A failed bind as a sentence that says what to do (other OSErrors pass on)."""
    for exc in _leaves(group):
        if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES,
                                                      errno.EADDRNOTAVAIL):
            reason = os.strerror(exc.errno)
            raise KuberunError(f"cannot listen on {host}:{port}: {reason}; pass --listen "
                               "HOST:PORT for another address (port 0 picks a free one)"
                               ) from exc


DEMO_NEXT_FREE = 100
"""The demo tries this many ports after a taken metrics/health port."""


def endpoint_options(settings: Settings) -> dict[str, Any]:
    """``metrics_endpoint`` and ``health_endpoint`` of :class:`GatewayOptions`."""
    config, next_free = settings.config, DEMO_NEXT_FREE if settings.demo else 0
    out: dict[str, Any] = {}
    if config.metrics.enable:
        mhost, mport = config.metrics.address
        out["metrics_endpoint"] = MetricsEndpoint(mhost, mport, config.metrics.path,
                                                  next_free=next_free)
    if config.health.enable:
        hhost, hport = config.health.address
        out["health_endpoint"] = HealthEndpoint(hhost, hport, next_free=next_free)
    return out


async def _graceful(gateway: Gateway, grace: float) -> None:
    """Give open connections up to ``grace`` seconds to end on their own.

    With the library's ``Gateway.shutdown(grace, message)`` it stops accepting and tells
    every open session first; without it, the connections are merely waited for.
    """
    shutdown: Callable[..., Any] | None = getattr(gateway, "shutdown", None)
    with trio.move_on_after(grace + 1 if shutdown else grace):
        if shutdown is not None:
            result = shutdown(grace, SHUTDOWN_MESSAGE)
            if inspect.isawaitable(result):
                await result
            return
        while gateway.connections:  # noqa: ASYNC110 -- the library offers no event for this
            await trio.sleep(0.1)


async def sweep_orphans(kubernetes: KubernetesConfig, instance: str, *,
                        dry_run: bool = False, namespace: str | None = None) -> list[str]:
    """Delete (or list) the pods of ``instance``; returns their names. Trio-flavoured.

    Needs a trio-asyncio loop (:func:`~kuberun_trio.aio.bridge.open_aio_loop`).
    """
    ns = namespace or str(kubernetes.pod.metadata.get("namespace") or "default")
    async with open_kube_client(kubernetes) as kube:
        orphans = await collect_orphans(kube, ns, instance, dry_run=dry_run)
    return [o.name for o in orphans]


def run(args: argparse.Namespace) -> int:
    """``python -m kuberun_trio [options]``: serve until SIGTERM/SIGINT."""
    from .logs import configure_logging
    from .settings import load_settings

    settings = load_settings(args)
    configure_logging(settings.config.log.format, settings.config.log.level)
    check_files(settings.config, cluster=not settings.demo)
    lock = settings.state.lock() if settings.demo else None  # before touching the state dir
    try:
        try:
            host_keys = load_host_keys(settings)
        except (OSError, ValueError) as exc:
            raise ConfigError("ssh.hostKeys", f"cannot use the host key: {exc}") from exc
        grace = float(getattr(args, "grace", None) or DEFAULT_GRACE)
        return run_trio_main(lambda: serve(settings, host_keys, grace=grace))
    finally:
        if lock is not None:
            os.close(lock)


def run_trio_main(main: Callable[[], Any]) -> int:
    """``trio.run(main)`` with the errors of its nurseries mapped onto the CLI's exit codes.

    Configuration errors come out as one :class:`ConfigError` (exit 2 in the CLI); other
    errors of ours as one :class:`KuberunError` (exit 1); a failed bind as exit 1.
    """
    try:
        code: int = trio.run(main)
    except (KuberunError, OSError, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, KuberunError | OSError) for e in leaves):
            raise
        configs = [e for e in leaves if isinstance(e, ConfigError)]
        if len(leaves) == 1 and (configs or isinstance(leaves[0], KuberunError)):
            raise leaves[0] from leaves[0].__cause__
        if configs:
            raise ConfigError("", "; ".join(str(e) for e in configs)) from exc
        reasons = [str(e) or type(e).__name__ for e in leaves]
        raise KuberunError("; ".join(reasons)) from exc
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
