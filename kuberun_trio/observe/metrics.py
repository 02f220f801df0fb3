"""The gateway's Prometheus metrics: one registry per gateway, one method per event.

Theory of operation
-------------------
:class:`GatewayMetrics` owns a ``prometheus_client.CollectorRegistry`` of its own -- never
the global default -- so two gateways in one process (or one test run) count apart.
Every event point of the gateway makes one synchronous call on it
(``metrics.connection_rejected("max-startups")``); each call is a dictionary lookup and a
locked float add, cheap enough for per-connection and per-request events. Nothing calls
it per chunk of data: the byte counts are plain integer attributes of :class:`ByteCounts`
(``counts.to_pod += len(data)``) that a custom collector reads at scrape time, as it does
the pod phases (from the gateway's shared pod watch, see :meth:`GatewayMetrics.watch_pods`).

The series are ContainerSSH's (same names and labels; ``country`` is always ``"XX"``, as
there is no GeoIP database) plus our own under ``kuberun_``; see docs/operations.md for
the list. :meth:`GatewayMetrics.exposition` renders the text format without the
``_created`` series (filtered here rather than by prometheus-client's process-wide switch,
which would change the embedding application's own metrics).

Labels never carry a username, an address or a pod name: every label value is one of a
fixed set, and free-form reasons (``connection_rejected``, ``pod_start_failed``) are
reduced to a short identifier (:func:`label_token`) -- callers pass fixed words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

COUNTRY = "XX"
"""The ``country`` label of ContainerSSH's series (no GeoIP database)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`GatewayMetrics.exposition`."""
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown", "Terminating")
"""The ``phase`` values of ``kuberun_pods`` (``Terminating``: a deletion is under way)."""
SESSION_TYPES = ("shell", "exec", "subsystem")
SESSION_RESULTS = ("success", "failure", "error", "closed")
"""``success``: exit status 0; ``failure``: another exit status or signal; ``error``: the
command could not be started or its stream ended without a status (pod lost, ...);
``closed``: ended before its command did (the client left, or the gateway ended it)."""
POD_START_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
EXEC_START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


def label_token(value: str, default: str = "other") -> str:
    """``value`` if it is a short identifier (letters, digits, ``_.-``), else ``default``."""
    return value if _TOKEN.fullmatch(value) else default


@attrs.define
class ByteCounts:
    """Channel data bytes, counted with plain integer adds on the data path."""

    to_pod: int = 0
    """Bytes from SSH clients to the processes in the pods (stdin)."""
    from_pod: int = 0
    """Bytes from the processes in the pods to SSH clients (stdout and stderr)."""


PodPhaseSource = Callable[[], Mapping[str, int]]
"""Returns the number of this gateway's pods by phase (see :data:`POD_PHASES`)."""


class _Live:
    """A custom collector: values read at scrape time (bytes, pods by phase)."""

    def __init__(self, owner: GatewayMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        counts = self._owner.bytes
        family = CounterMetricFamily(
            "kuberun_bytes", "Channel data bytes between SSH clients and pods.",
            labels=["direction"])
        family.add_metric(["in"], counts.to_pod)
        family.add_metric(["out"], counts.from_pod)
        yield family
        phases = dict.fromkeys(POD_PHASES, 0)
        for source in self._owner._pod_sources:
            for phase, n in source().items():
                key = phase if phase in phases else "Unknown"
                phases[key] += n
        pods = GaugeMetricFamily("kuberun_pods", "This gateway's pods by phase.",
                                 labels=["phase"])
        for phase, n in phases.items():
            pods.add_metric([phase], n)
        yield pods
        if self._owner._ready_source is not None:
            yield GaugeMetricFamily("kuberun_ready", "1 while the gateway is ready (what "
                                    "/readyz says), else 0.",
                                    value=1 if self._owner._ready_source() else 0)


class _WithoutCreated:
    """A registry view whose families lack the ``_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class GatewayMetrics:
    """Every metric of one gateway, with one method per event. Thread-safe, synchronous.

    Pass one to :class:`~kuberun_trio.gateway.serve.GatewayOptions` (``metrics=``) to count
    into it; serve it with the gateway's own endpoint or read :attr:`registry` (e.g. to
    expose it through the embedding application's own HTTP server).
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        """The registry holding every series (only this gateway's)."""
        self.bytes = ByteCounts()
        """Plain byte counters (the data path adds to them directly)."""
        self._pod_sources: list[PodPhaseSource] = []
        self._ready_source: Callable[[], bool] | None = None
        geo = ["country"]
        self._connections = Counter("containerssh_ssh_connections",
                                    "SSH connections accepted (TCP).", geo, registry=r)
        self._current = Gauge("containerssh_ssh_current_connections",
                              "SSH connections open now.", geo, registry=r)
        self._handshakes_ok = Counter("containerssh_ssh_successful_handshakes",
                                      "SSH handshakes completed (authenticated).", geo,
                                      registry=r)
        self._handshakes_failed = Counter("containerssh_ssh_failed_handshakes",
                                          "SSH connections that ended before authentication "
                                          "completed.", geo, registry=r)
        self._auth_server_requests = Counter(
            "containerssh_auth_server_requests", "Requests to the authentication webhook.",
            ["authtype", "retry"], registry=r)
        self._auth_server_failures = Counter(
            "containerssh_auth_server_failures",
            "Failed requests to the authentication webhook (no usable answer).",
            ["type", "authtype", "retry", "reason"], registry=r)
        self._config_server_requests = Counter(
            "containerssh_config_server_requests", "Requests to the configuration webhook.",
            ["retry"], registry=r)
        self._config_server_failures = Counter(
            "containerssh_config_server_failures",
            "Failed requests to the configuration webhook (no usable answer).",
            ["type", "retry", "reason"], registry=r)
        self._auth_success = Counter("containerssh_auth_success",
                                     "Credentials accepted.", ["authtype", "country"],
                                     registry=r)
        self._auth_failures = Counter("containerssh_auth_failures",
                                      "Credentials refused.", ["authtype", "country"],
                                      registry=r)
        self._backend_requests = Counter("containerssh_backend_requests",
                                         "Backend (pod) starts requested: one per "
                                         "authenticated connection.", registry=r)
        self._backend_errors = Counter("containerssh_backend_errors",
                                       "Backend failures: pod start failures and "
                                       "connection errors.", registry=r)
        self._pod_start = Histogram("kuberun_pod_start_seconds",
                                    "Seconds from pod create to Running and Ready.",
                                    buckets=POD_START_BUCKETS, registry=r)
        self._pod_start_failures = Counter("kuberun_pod_start_failures",
                                           "Pods that did not become Ready, by reason.",
                                           ["reason"], registry=r)
        self._sessions_active = Gauge("kuberun_sessions_active",
                                      "Session channels running a command now.", ["type"],
                                      registry=r)
        self._sessions = Counter("kuberun_sessions", "Session channels ended.",
                                 ["type", "result"], registry=r)
        self._exec_start = Histogram("kuberun_exec_start_seconds",
                                     "Seconds to open a session's pods/exec stream.",
                                     buckets=EXEC_START_BUCKETS, registry=r)
        self._api_requests = Counter("kuberun_api_requests",
                                     "Kubernetes API request attempts by verb, resource and "
                                     "HTTP status (<error>: no response).",
                                     ["verb", "resource", "code"], registry=r)
        self._orphans = Counter("kuberun_orphan_pods_deleted",
                                "Pods of dead gateway runs deleted by the sweep.", registry=r)
        self._persistent_reaped = Counter(
            "kuberun_persistent_pods_deleted",
            "Persistent pods (kubernetes.pod.mode: persistent) deleted by the sweep after "
            "persistentIdleTimeout without a connection.", registry=r)
        self._rejected = Counter("kuberun_connections_rejected",
                                 "Connections refused or ended by the gateway before they "
                                 "were served, by reason.", ["reason"], registry=r)
        self._refused_requests = Counter(
            "kuberun_requests_refused",
            "Requests refused on authenticated connections, by request (env, exec, subsystem, "
            "signal, port-forwarding, ...) or by the limit that refused them (max-sessions, "
            "signal-rate).", ["request"], registry=r)
        self._ended = Counter("kuberun_connections_ended",
                              "Authenticated connections ended, by reason (idle, max-duration, "
                              "client, shutdown, pod-lost, error).", ["reason"], registry=r)
        self._forwards = Counter("kuberun_forwards",
                                 "Port-forward (direct-tcpip) channels by result, counted when "
                                 "they end: opened (the client's open was confirmed), failed "
                                 "(the pod side could not be reached), refused (by policy).",
                                 ["result"], registry=r)
        for kind in SESSION_TYPES:  # the series exist from the start (rate() needs them)
            self._sessions_active.labels(kind)
        self._current.labels(COUNTRY)
        self._connections.labels(COUNTRY)
        r.register(_Live(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._view = _WithoutCreated(r)

    def __repr__(self) -> str:
        return f"<GatewayMetrics in={self.bytes.to_pod} out={self.bytes.from_pod}>"

    # -- rendering -------------------------------------------------------------
    def exposition(self) -> bytes:
        """The Prometheus text format of every series (without ``_created``)."""
        return generate_latest(self._view)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The current value of one sample (tests, embedders); None if it does not exist."""
        return self.registry.get_sample_value(name, dict(labels or {}))

    def watch_pods(self, source: PodPhaseSource) -> Callable[[], None]:
        """Read ``kuberun_pods`` from ``source`` at scrape time; returns the undo."""
        self._pod_sources.append(source)
        return lambda: self._pod_sources.remove(source)

    def watch_ready(self, source: Callable[[], bool] | None) -> None:
        """Export ``kuberun_ready`` from ``source()`` at scrape time (None: not exported)."""
        self._ready_source = source

    # -- SSH connections ---------------------------------------------------------
    def connection_opened(self) -> None:
        self._connections.labels(COUNTRY).inc()
        self._current.labels(COUNTRY).inc()

    def connection_closed(self, *, authenticated: bool) -> None:
        self._current.labels(COUNTRY).dec()
        if not authenticated:
            self._handshakes_failed.labels(COUNTRY).inc()

    def handshake_succeeded(self) -> None:
        self._handshakes_ok.labels(COUNTRY).inc()

    def connection_rejected(self, reason: str) -> None:
        """A connection refused or ended before it was served; ``reason`` is a fixed word
        (``shutdown``, ``auth``, ``max-startups``, ``max-connections``, ...)."""
        self._rejected.labels(label_token(reason)).inc()

    def request_refused(self, request: str) -> None:
        """A channel or request was refused; ``request`` is a fixed word."""
        self._refused_requests.labels(label_token(request)).inc()

    def connection_ended(self, reason: str) -> None:
        """An authenticated connection ended; ``reason`` is a ``ConnectionEnd`` value."""
        self._ended.labels(label_token(reason)).inc()

    # -- authentication ---------------------------------------------------------
    def auth_result(self, authtype: str, *, accepted: bool) -> None:
        """One credential judged; ``authtype`` is ``password`` or ``pubkey``."""
        counter = self._auth_success if accepted else self._auth_failures
        counter.labels(label_token(authtype), COUNTRY).inc()

    def auth_server_request(self, authtype: str, retry: int = 0) -> None:
        """One request to the auth webhook (``retry`` 0 for the first attempt)."""
        self._auth_server_requests.labels(label_token(authtype), "1" if retry else "0").inc()

    def auth_server_failure(self, authtype: str, reason: str, *, retry: int = 0,
                            hard: bool = True) -> None:
        """A webhook request without a usable answer; ``hard``: given up (no retry left)."""
        self._auth_server_failures.labels("hard" if hard else "soft", label_token(authtype),
                                          "1" if retry else "0", label_token(reason)).inc()

    def config_server_request(self, retry: int = 0) -> None:
        """One request to the configuration webhook (``retry`` 0 for the first attempt)."""
        self._config_server_requests.labels("1" if retry else "0").inc()

    def config_server_failure(self, reason: str, *, retry: int = 0, hard: bool = True) -> None:
        """A configuration webhook request without a usable answer; ``hard``: given up."""
        self._config_server_failures.labels("hard" if hard else "soft", "1" if retry else "0",
                                            label_token(reason)).inc()

    # -- pods, sessions, the API ----------------------------------------------------
    def backend_request(self) -> None:
        self._backend_requests.inc()

    def backend_error(self) -> None:
        self._backend_errors.inc()

    def pod_started(self, seconds: float) -> None:
        self._pod_start.observe(seconds)

    def pod_start_failed(self, reason: str) -> None:
        """``reason`` as Kubernetes says it (``ErrImagePull``, ``Timeout``, ...)."""
        self._pod_start_failures.labels(label_token(reason, "Other")).inc()

    def session_started(self, kind: str) -> None:
        self._sessions_active.labels(label_token(kind)).inc()

    def session_ended(self, kind: str, result: str) -> None:
        """``result``: one of :data:`SESSION_RESULTS`."""
        kind = label_token(kind)
        self._sessions_active.labels(kind).dec()
        self._sessions.labels(kind, label_token(result)).inc()

    def forward_result(self, result: str) -> None:
        """A forward channel was opened, failed to open, or was refused (by policy)."""
        self._forwards.labels(label_token(result)).inc()

    def exec_started(self, seconds: float) -> None:
        self._exec_start.observe(seconds)

    def api_request(self, verb: str, resource: str, code: int | None) -> None:
        """One Kubernetes API request attempt; ``code`` None: no HTTP response."""
        self._api_requests.labels(verb, resource, "<error>" if code is None else str(code)).inc()

    def orphan_pods_deleted(self, count: int = 1) -> None:
        if count:
            self._orphans.inc(count)

    def persistent_pods_deleted(self, count: int = 1) -> None:
        if count:
            self._persistent_reaped.inc(count)


_UNOBSERVED: list[GatewayMetrics] = []


def unobserved() -> GatewayMetrics:
    """A process-wide metrics object (no process collector) for parts used on their own,
    outside a gateway: they count into it and nobody serves it."""
    if not _UNOBSERVED:
        _UNOBSERVED.append(GatewayMetrics(process=False))
    return _UNOBSERVED[0]
