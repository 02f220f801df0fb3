"""Test support for metrics and health: a gateway with both endpoints, an HTTP GET, parsing."""

from __future__ import annotations

import contextlib
import functools
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import trio
import trio_asyncio
from prometheus_client.parser import text_string_to_metric_families

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.gateway.serve import Gateway, GatewayOptions, serve_gateway
from kuberun_trio.observe import HealthEndpoint, MetricsEndpoint, Readiness

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(url, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


async def http_get(address: tuple[str, int] | None, path: str) -> tuple[int, bytes]:
    """GET ``http://address/path`` (in a thread): (status, body); HTTP errors included."""
    assert address is not None, "endpoint not served"
    return await trio.to_thread.run_sync(_get, f"http://{address[0]}:{address[1]}{path}")


def samples(text: bytes) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of an exposition: (name, labels, value)."""
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples]


def value(text: bytes, name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, sample_value in samples(text):
        if sample_name == name and sample_labels == labels:
            return sample_value
    return None


async def aio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio_asyncio.aio_as_trio(functools.partial(fn, *args, **kwargs))()


@attrs.frozen
class ObservedRig:
    cluster: EmbeddedCluster
    gateway: Gateway
    client_key: asyncssh.SSHKey
    nursery: trio.Nursery

    async def connect(self, username: str = "alice", **kw: Any) -> asyncssh.SSHClientConnection:
        kw.setdefault("client_keys", [self.client_key])
        conn: asyncssh.SSHClientConnection = await aio(
            asyncssh.connect, "127.0.0.1", self.gateway.address[1], username=username,
            known_hosts=None, **kw)
        return conn

    async def scrape(self) -> bytes:
        status, body = await http_get(self.gateway.endpoints.metrics, "/metrics")
        assert status == 200, body
        return body


@contextlib.asynccontextmanager
async def open_observed(
    tmp_path: Path, *, https: bool = True, timeouts: dict[str, Any] | None = None,
    connection: Callable[[EmbeddedCluster, trio.Nursery], Awaitable[dict[str, Any]]] | None
    = None, readiness: Readiness | None = None,
) -> AsyncIterator[ObservedRig]:
    """Embedded cluster + gateway with metrics and health on free ports of 127.0.0.1.

    ``connection(cluster, nursery)`` gives ``kubernetes.connection`` instead of the
    cluster's kubeconfig (e.g. through a proxy it starts in the nursery).
    """
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with open_aio_loop(), open_embedded_cluster(
            https=https, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2) as cluster, \
            trio.open_nursery() as nursery:
        conn = (await connection(cluster, nursery) if connection is not None
                else {"kubeconfig": str(cluster.kubeconfig_path)})
        options = GatewayOptions(
            kubernetes=parse_config({"connection": conn, "timeouts": {
                "podStart": "20s", "podStop": "10s", **(timeouts or {})}}),
            authenticator=PublicKeyAuthenticator(
                [client_key.export_public_key("openssh").decode()]),
            host_keys=(host_key.export_private_key("openssh"),), port=0, instance="test-gw",
            metrics_endpoint=MetricsEndpoint("127.0.0.1", 0),
            health_endpoint=HealthEndpoint("127.0.0.1", 0), readiness=readiness)
        gateway: Gateway = await nursery.start(serve_gateway, options)
        try:
            yield ObservedRig(cluster, gateway, client_key, nursery)
        finally:
            nursery.cancel_scope.cancel()
