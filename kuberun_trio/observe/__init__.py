"""Observability: Prometheus metrics, readiness and the HTTP endpoints that serve them.

Modules: :mod:`.metrics` (:class:`GatewayMetrics`: the registry and one method per
event), :mod:`.health` (:class:`Readiness` and the API probe), :mod:`.http` (a tiny h11
server), :mod:`.service` (the endpoints as one trio service). See docs/operations.md.
"""

from .health import Readiness as Readiness
from .metrics import ByteCounts as ByteCounts
from .metrics import GatewayMetrics as GatewayMetrics
from .service import HealthEndpoint as HealthEndpoint
from .service import MetricsEndpoint as MetricsEndpoint
