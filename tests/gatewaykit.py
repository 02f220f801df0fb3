"""Test support: an embedded cluster plus an in-process gateway, and an asyncssh client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.limits import Limits
from kuberun_trio.gateway.serve import Gateway, GatewayOptions, open_gateway


@attrs.frozen
class Rig:
    cluster: EmbeddedCluster
    gateway: Gateway
    client_key: asyncssh.SSHKey
    host_key: asyncssh.SSHKey

    @property
    def port(self) -> int:
        return self.gateway.address[1]

    def pods(self) -> list[dict[str, Any]]:
        return self.cluster.pods()

    async def connect(self, username: str = "alice", **kw: Any) -> asyncssh.SSHClientConnection:
        """An asyncssh client connection (asyncio object: use it through aio_as_trio)."""
        async def go() -> asyncssh.SSHClientConnection:
            return await asyncssh.connect(
                "127.0.0.1", self.port, username=username, client_keys=[self.client_key],
                known_hosts=None, **kw)

        conn: asyncssh.SSHClientConnection = await trio_asyncio.aio_as_trio(go)()
        return conn


def kube_config(cluster: EmbeddedCluster, **pod: Any) -> KubernetesConfig:
    data: dict[str, Any] = {"connection": {"kubeconfig": str(cluster.kubeconfig_path)},
                            "timeouts": {"podStart": "20s", "podStop": "10s"}}
    if pod:
        data["pod"] = pod
    return parse_config(data)


@contextlib.asynccontextmanager
async def open_rig(tmp_path: Path, limits: Limits | None = None, *,
                   options: dict[str, Any] | None = None, **pod: Any) -> AsyncIterator[Rig]:
    """``options``: more :class:`GatewayOptions` fields (e.g. ``time_limits``)."""
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with open_aio_loop(), open_embedded_cluster(
            https=True, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2) as cluster:
        gateway_options = GatewayOptions(
            kubernetes=kube_config(cluster, **pod),
            authenticator=PublicKeyAuthenticator(
                [client_key.export_public_key("openssh").decode()]),
            host_keys=(host_key.export_private_key("openssh"),), port=0, instance="test-gw",
            limits=limits or Limits(), **(options or {}))
        async with open_gateway(gateway_options) as gateway:
            yield Rig(cluster, gateway, client_key, host_key)
