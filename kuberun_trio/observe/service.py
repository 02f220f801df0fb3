"""The gateway's HTTP endpoints: metrics and health, as one trio service.

Theory of operation
-------------------
:func:`serve_endpoints` binds the configured endpoints, reports their addresses through
``task_status`` and serves them until cancelled; :func:`~kuberun_trio.gateway.serve.serve_gateway`
starts it in its own nursery right before the SSH listener (so ``/readyz`` answers 503
while the listener is not up yet) and it stops with the gateway.

* metrics (``metrics.listen``): ``metrics.path`` answers the Prometheus text format, every
  other path 404;
* health (``health.listen``): ``/healthz`` is liveness (200 ``ok`` while the event loops
  answer), ``/readyz`` and every other path are readiness, as ContainerSSH's health
  endpoint: 200 ``ok`` or 503 ``not ok``.

When both name the same address, one server answers both (the metrics path first).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..errors import KuberunError
from .health import LIVENESS_WAIT, Readiness
from .http import Handler, Response, bound_address, open_listeners, serve_http
from .metrics import CONTENT_TYPE, GatewayMetrics

log = logging.getLogger(__name__)

OK = Response(200, b"ok")
NOT_OK = Response(503, b"not ok")


@attrs.frozen
class MetricsEndpoint:
    """Where the metrics are served (``metrics.listen`` and ``metrics.path``)."""

    host: str = "0.0.0.0"
    port: int = 9100
    """0 picks a free port (see :attr:`Gateway.metrics_address`)."""
    path: str = "/metrics"
    next_free: int = 0
    """If the port is taken, try this many following ports (the demo uses 100)."""


@attrs.frozen
class HealthEndpoint:
    """Where the health endpoint is served (``health.listen``)."""

    host: str = "0.0.0.0"
    port: int = 7000
    next_free: int = 0


@attrs.frozen
class EndpointAddresses:
    """Where the endpoints listen (None: not served)."""

    metrics: tuple[str, int] | None = None
    health: tuple[str, int] | None = None


def metrics_handler(metrics: GatewayMetrics, path: str) -> Callable[[str], Response | None]:
    def answer(request_path: str) -> Response | None:
        if request_path != path:
            return None
        return Response(200, metrics.exposition(), CONTENT_TYPE)
    return answer


def health_handler(readiness: Readiness,
                   liveness: Callable[[], Awaitable[None]]) -> Handler:
    async def answer(method: str, path: str) -> Response:
        if path == "/healthz":
            with trio.move_on_after(LIVENESS_WAIT):
                await liveness()
                return OK
            return NOT_OK
        return OK if readiness.ready else NOT_OK
    return answer


async def _not_found(method: str, path: str) -> Response:
    return Response(404, b"not found\n")


def _combine(metrics: Callable[[str], Response | None] | None, other: Handler) -> Handler:
    async def answer(method: str, path: str) -> Response:
        response = metrics(path) if metrics is not None else None
        return response if response is not None else await other(method, path)
    return answer


async def _bind(name: str, host: str, port: int, next_free: int) -> list[trio.SocketListener]:
    try:
        return await open_listeners(host, port, next_free=next_free)
    except OSError as exc:
        raise KuberunError(f"cannot serve the {name} endpoint on {host}:{port}: "
                           f"{exc.strerror or exc}") from exc


async def serve_endpoints(metrics: GatewayMetrics, readiness: Readiness,
                          liveness: Callable[[], Awaitable[None]], *,
                          metrics_at: MetricsEndpoint | None,
                          health_at: HealthEndpoint | None,
                          task_status: trio.TaskStatus[EndpointAddresses]
                          = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the configured endpoints until cancelled. Trio-flavoured."""
    same = (metrics_at is not None and health_at is not None and metrics_at.port != 0
            and (metrics_at.host, metrics_at.port) == (health_at.host, health_at.port))
    servers: list[tuple[list[trio.SocketListener], Handler]] = []
    addresses: dict[str, tuple[str, int] | None] = {"metrics": None, "health": None}
    try:
        if metrics_at is not None:
            listeners = await _bind("metrics", metrics_at.host, metrics_at.port,
                                    metrics_at.next_free)
            answer = metrics_handler(metrics, metrics_at.path)
            other = health_handler(readiness, liveness) if same else _not_found
            servers.append((listeners, _combine(answer, other)))
            addresses["metrics"] = bound_address(listeners)
            if same:
                addresses["health"] = addresses["metrics"]
        if health_at is not None and not same:
            listeners = await _bind("health", health_at.host, health_at.port,
                                    health_at.next_free)
            servers.append((listeners, health_handler(readiness, liveness)))
            addresses["health"] = bound_address(listeners)
    except BaseException:
        for listeners, _ in servers:
            for listener in listeners:
                await listener.aclose()
        raise
    for name, address in addresses.items():
        if address is not None:
            log.info("%s endpoint on http://%s:%d", name, *address,
                     extra={"event": f"{name}-listening", "address": f"{address[0]}:{address[1]}"})
    async with trio.open_nursery() as nursery:
        for listeners, handler in servers:
            nursery.start_soon(serve_http, listeners, handler)
        task_status.started(EndpointAddresses(addresses["metrics"], addresses["health"]))
