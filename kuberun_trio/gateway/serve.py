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
    ├── SSH listener                    asyncssh; each handshake → make_portal()
    └── connection task xN              ConnectionRuntime.run (pod + sessions)

On cancellation the listener closes first (no new connections), then every
connection task is cancelled: its sessions end, its exec streams close, and
its pod is deleted (shielded, bounded by ``timeouts.podStop``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from ..aio import sshserver
from ..aio.bridge import ensure_aio_loop, run_aio
from ..aio.kube import KubeClient, open_kube_client
from .auth import Authenticator, AuthResult
from .config import KubernetesConfig
from .connection import ConnectionRuntime
from .pod import ConnectedPod, ConnectionHandler
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


@attrs.define
class Gateway:
    """A running gateway."""

    address: tuple[str, int]
    connections: dict[str, ConnectionRuntime] = attrs.field(factory=dict)
    """Live connections by connection id."""


class _Server:
    def __init__(self, options: GatewayOptions, kube: KubeClient, nursery: trio.Nursery) -> None:
        self.options = options
        self.kube = kube
        self.nursery = nursery
        self.session_config = session_config_for(options.kubernetes)
        self.gateway = Gateway(("", 0))

    def ssh_server(self) -> sshserver.GatewaySSHServer:
        """asyncssh's server factory: one per TCP connection."""
        return sshserver.GatewaySSHServer(self.make_portal, self.options.authenticator,
                                          connection_id=secrets.token_hex(8))

    def make_portal(self, ssh: sshserver.GatewaySSHServer) -> ConnectionRuntime:
        """Called on handshake success: start the connection's task."""
        cid = ssh.connection_id
        adapter = logging.LoggerAdapter(log, {"connection_id": cid})
        handler = ConnectionHandler(self.options.kubernetes, cid, f"{ssh.peer[0]}:{ssh.peer[1]}",
                                    adapter, kube=self.kube, instance=self.options.instance)
        auth: AuthResult = ssh.auth_result or AuthResult()
        runtime = ConnectionRuntime(handler, self.session_config, username=ssh.username,
                                    auth=auth, make_target=self._target, close_connection=ssh.close)
        self.gateway.connections[cid] = runtime
        self.nursery.start_soon(self._run_connection, runtime)
        return runtime

    def _target(self, pod: ConnectedPod) -> sshserver.ExecTarget:
        return sshserver.ExecTarget(self.kube.exec_client, pod.namespace, pod.name, pod.container)

    async def _run_connection(self, runtime: ConnectionRuntime) -> None:
        try:
            await runtime.run()
        finally:
            self.gateway.connections.pop(runtime.connection_id, None)


async def serve_gateway(
    options: GatewayOptions,
    *,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SSH until cancelled. Trio-flavoured; reports the :class:`Gateway` when ready."""
    async with ensure_aio_loop(), open_kube_client(options.kubernetes) as kube, \
            trio.open_nursery() as nursery:
        server = _Server(options, kube, nursery)
        keys = [sshserver.load_host_key(k) for k in options.host_keys]
        acceptor: Any = await run_aio(functools.partial(
            sshserver.listen, options.host, options.port, host_keys=keys,
            server_factory=server.ssh_server))
        try:
            sockname = acceptor.sockets[0].getsockname()
            server.gateway.address = (str(sockname[0]), int(sockname[1]))
            log.info("gateway listening on %s:%d", *server.gateway.address)
            task_status.started(server.gateway)
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(5, shield=True):
                await run_aio(sshserver.close_listener, acceptor)
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_gateway(options: GatewayOptions) -> AsyncIterator[Gateway]:
    """Run the gateway for the duration of the block; yields the :class:`Gateway`."""
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(functools.partial(serve_gateway, options))
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
