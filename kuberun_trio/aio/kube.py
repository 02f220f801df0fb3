"""The gateway's Kubernetes REST client: trio outside, kubernetes-asyncio inside.

Theory of operation
-------------------
:func:`open_kube_client` builds a kubernetes-asyncio ``ApiClient`` *inside* the
trio-asyncio loop (aiohttp needs a running loop) from one of three sources of
:class:`~kuberun_trio.core.config.ConnectionConfig`: an explicit ``host``
(CA / client certificate / key as PEM text or files, bearer token or token file
-- re-read whenever the file changes -- or basic auth), a kubeconfig
(+ context), or the in-cluster service account. The aiohttp session is
replaced by one with ``trust_env=False``: proxy variables and ``~/.netrc`` are
ignored, the API server is always dialled directly.

:class:`KubeClient` is trio-flavoured (pods, events, and the ``coordination.k8s.io/v1``
Leases of :mod:`kuberun_trio.gateway.lease`). Each method crosses into asyncio exactly
once (:func:`kuberun_trio.aio.bridge.run_aio`); retries, rate limiting and whole
watch loops run on the asyncio side of that one crossing. Cancelling the trio
caller cancels the asyncio task. Responses are read raw
(``_preload_content=False``) and returned as plain JSON dicts -- no models, so
no model validation surprises.

Every request attempt (including each watch (re)connect) first takes a token
from a :class:`TokenBucket` (``qps``/``burst``) and runs under the per-request
timeout ``timeouts.http``. Failed attempts are retried per :class:`RetryPolicy`:
429 always (the request provably did not happen; ``Retry-After`` is honoured),
5xx, timeouts and broken connections only for idempotent calls (get, list,
delete, watch); a connection that could not be opened at all is retried for
create too. Everything else becomes :class:`~kuberun_trio.errors.KubernetesError`
(:class:`~kuberun_trio.errors.NotFoundError` for 404) carrying the Status reason.

Pod watches (:meth:`KubeClient.wait_for_pod`,
:meth:`KubeClient.watch_pod_gone_or_failed`) follow one pod with
``fieldSelector=metadata.name=<pod>``: a stream that ends or breaks is resumed
from the last resourceVersion seen (BOOKMARKs included); a 410 Expired (an
``ERROR`` event or HTTP 410) triggers a re-list and a new watch from the list's
resourceVersion. The judgement of each pod state is a pure function of
:mod:`kuberun_trio.core.podstate`. The caller bounds the
whole wait with a trio cancel scope (``timeouts.podStart``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiohttp
import attrs
import trio
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.stream import WsApiClient

from ..core.podstate import Pod, PodLoss, judge_start, pod_loss
from ..errors import ConfigError, KubernetesError, NotFoundError
from .bridge import run_aio

if TYPE_CHECKING:
    from ..core.config import ConnectionConfig, KubernetesConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

EXEC_HEARTBEAT = 60.0
"""Seconds between WebSocket pings on exec streams (aiohttp closes if no pong in half)."""

WATCH_SECONDS = 300
"""``timeoutSeconds`` of one watch request; the stream is resumed when it ends."""


# == values ======================================================================================


@attrs.frozen
class RetryPolicy:
    """How often and how patiently failed requests are retried."""

    attempts: int = 5
    """Tries in all (the first one included) before the error is raised."""
    base_delay: float = 0.2
    """Back-off before the first retry; doubled for each further one."""
    max_delay: float = 5.0
    """Upper bound of one back-off; ``Retry-After`` is honoured up to 12 times this."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay * 12)
        backoff = min(self.max_delay, self.base_delay * 2.0**attempt)
        return backoff * random.uniform(0.75, 1.0)


REST_RETRY = RetryPolicy()
"""Default for single REST calls: 5 tries within about 3 s (plus ``Retry-After``)."""
WATCH_RETRY = RetryPolicy(attempts=8, base_delay=0.25, max_delay=8.0)
"""Default for watch resumes: consecutive failures without any event in between (~25 s)."""


@attrs.frozen
class KubeClientStatistics:
    """Counters of a :class:`KubeClient` since it was opened."""

    requests: int
    """Request attempts sent (REST calls and watch connects, retries included)."""
    retries: int
    """Attempts that were repeated after a retryable failure."""
    watches_opened: int
    """Watch streams that answered 200."""
    watch_resumes: int
    """Watch streams resumed after they ended or broke."""
    relists: int
    """Re-lists after a 410 Expired."""
    throttled_seconds: float
    """Total time requests waited for the rate limiter."""


# == rate limiting (sans-IO) =====================================================================


class TokenBucket:
    """A client-side token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    :meth:`reserve` takes a token and says how long to wait before using it. Tokens may
    go into debt, so concurrent callers are served in call order without a lock.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def reserve(self, now: float) -> float:
        """Take one token at time ``now``; return the seconds to wait before sending."""
        if self._last is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# == configuration (asyncio side, runs once) =====================================================


class _TokenFile:
    """A ``refresh_api_key_hook`` that re-reads a bearer token file whenever it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def __call__(self, cfg: Any) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                cfg.api_key["BearerToken"] = Path(self.path).read_text().strip()
                self._stamp = stamp
        except OSError as exc:  # mid-rotation: keep the token we have
            log.warning("cannot re-read bearer token file %s: %s", self.path, exc)


def _base_url(conn: ConnectionConfig) -> str:
    assert conn.host is not None
    host = conn.host.rstrip("/")
    if "://" not in host:
        host = "https://" + host
    if not conn.path.endswith("/api"):
        raise ConfigError("kubernetes.connection.path", "must end in /api (the core group path)")
    return host + conn.path[: -len("/api")].rstrip("/")


def _explicit_configuration(conn: ConnectionConfig) -> tuple[Any, dict[str, str]]:
    cfg = k8s.Configuration(host=_base_url(conn))
    cfg.verify_ssl = not conn.insecure
    cfg.tls_server_name = conn.server_name
    cfg.ssl_ca_cert = conn.cacert_file
    cfg.cert_file, cfg.key_file = conn.cert_file, conn.key_file
    cfg.api_key_prefix["BearerToken"] = "Bearer"
    headers: dict[str, str] = {}
    if conn.bearer_token is not None:
        cfg.api_key["BearerToken"] = conn.bearer_token
    elif conn.bearer_token_file is not None:
        hook = _TokenFile(conn.bearer_token_file)
        hook(cfg)
        if "BearerToken" not in cfg.api_key:
            raise ConfigError("kubernetes.connection.bearerTokenFile",
                              f"cannot read {conn.bearer_token_file}")  # fmt: skip
        cfg.refresh_api_key_hook = hook
    if conn.username is not None and conn.password is not None:
        raw = f"{conn.username}:{conn.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    return cfg, headers


def _ssl_context(cfg: Any, conn: ConnectionConfig | None) -> ssl.SSLContext:
    """The TLS context for ``cfg``, with ``conn``'s inline PEM text (explicit source)."""
    cadata = conn.cacert if conn is not None else None
    try:
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert, cadata=cadata)
        if conn is not None and conn.cert is not None and conn.key is not None:
            with tempfile.TemporaryDirectory(prefix="kuberun-tls-") as tmp:
                cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                cert.write_text(conn.cert)
                key.touch(mode=0o600)
                key.write_text(conn.key)
                ctx.load_cert_chain(str(cert), str(key))
        elif cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("kubernetes.connection", f"TLS setup failed: {exc}") from exc
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _load_configuration(conn: ConnectionConfig) -> tuple[Any, dict[str, str]]:
    if conn.source == "host":
        return _explicit_configuration(conn)
    cfg = k8s.Configuration()
    try:
        if conn.source == "inCluster":
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(config_file=conn.kubeconfig_path(),
                                              context=conn.context, client_configuration=cfg,
                                              persist_config=False)  # fmt: skip
    except (k8s_config.ConfigException, OSError, ValueError) as exc:
        key = "inCluster" if conn.source == "inCluster" else "kubeconfig"
        raise ConfigError(f"kubernetes.connection.{key}", str(exc)) from exc
    return cfg, {}


async def _connect(config: KubernetesConfig, rest_retry: RetryPolicy,
                   watch_retry: RetryPolicy) -> _Transport:
    """Build the asyncio half of a :class:`KubeClient`. Asyncio-flavoured."""
    conn = config.connection
    cfg, headers = await _load_configuration(conn)
    ctx = _ssl_context(cfg, conn if conn.source == "host" else None)
    api_client, watch_client = k8s.ApiClient(cfg), k8s.ApiClient(cfg)
    # The exec client: every call is a WebSocket upgrade; pings every minute keep
    # idle interactive sessions alive through proxies and load balancers.
    ws_client = WsApiClient(cfg, heartbeat=EXEC_HEARTBEAT)
    # Every exec WebSocket and every watch holds an HTTP connection for its whole
    # life, so those pools are not capped (with kubernetes-asyncio's default cap of
    # 100 the 101st concurrent SSH connection stalled). Plain REST calls are short:
    # their pool is capped, so a burst (a thousand clients leaving at once: a
    # thousand DELETEs) queues for REST_CONNECTIONS kept-alive connections instead
    # of opening a thousand new TLS connections, whose handshakes the API server
    # would have to do first (seen: DELETEs arriving 3 s late).
    for client_, limit in ((api_client, REST_CONNECTIONS), (watch_client, 0), (ws_client, 0)):
        client_.default_headers.update(headers)
        rest = client_.rest_client
        await rest.pool_manager.close()  # kubernetes-asyncio's session trusts proxy variables
        rest.pool_manager = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, ssl=ctx),
            trust_env=False, read_bufsize=2**21)  # fmt: skip
    transport = _Transport(api_client, TokenBucket(conn.qps, conn.burst), config.timeouts.http,
                           rest_retry, watch_retry)  # fmt: skip
    transport.ws_client = ws_client
    transport.watch_client = watch_client
    transport.watch_api = k8s.CoreV1Api(watch_client)
    return transport


REST_CONNECTIONS = 32
"""Most HTTP connections plain REST calls keep open at once (watches and execs are apart)."""


# == requests (asyncio side) =====================================================================


class _Retry(Exception):
    """A failed attempt worth repeating; ``error`` is raised if no tries are left."""

    def __init__(self, error: KubernetesError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


class _Expired(Exception):
    """The watch's resourceVersion is too old (410): re-list."""


@attrs.define
class _Counters:
    requests: int = 0
    retries: int = 0
    watches_opened: int = 0
    watch_resumes: int = 0
    relists: int = 0
    throttled_seconds: float = 0.0


def _status_error(status: int, body: bytes) -> KubernetesError:
    reason, message = "", body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        parsed = json.loads(body)
        reason, message = str(parsed.get("reason") or ""), str(parsed.get("message") or message)
    cls = NotFoundError if status == 404 else KubernetesError
    return cls(status, reason or f"HTTP{status}", message)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _transport_error(exc: BaseException) -> KubernetesError:
    kind = "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
    return KubernetesError(0, kind, str(exc) or "no response within the request timeout")


def _never_sent(exc: BaseException) -> bool:
    """The connection could not be opened, so the request did not reach the server."""
    return isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientSSLError)


RequestObserver = Callable[[str, str, "int | None"], None]
"""Called once per API request attempt with (verb, resource, HTTP status or None)."""

_VERBS = {"read": "get", "replace": "update"}


@functools.lru_cache(maxsize=64)
def verb_and_resource(method: str) -> tuple[str, str]:
    """``("get", "pods")`` for kubernetes-asyncio's ``read_namespaced_pod`` and so on."""
    if method == "get_code":
        return "get", "version"
    verb, _, rest = method.partition("_")
    resource = rest.removeprefix("namespaced_").removesuffix("_with_http_info")
    return _VERBS.get(verb, verb), (resource + "s" if resource else "?")


def _ignore(verb: str, resource: str, code: int | None) -> None:
    return None


@attrs.define
class _Follow(Generic[T]):
    """State of one pod follow: the judge and where the watch resumes."""

    judge: Callable[[str, Pod | None], T | None]
    rv: str | None
    failures: int = 0


class _Transport:
    """The asyncio half: one ApiClient, the rate limiter, retries. Asyncio-flavoured."""

    def __init__(self, api_client: Any, bucket: TokenBucket, http_timeout: float,
                 rest_retry: RetryPolicy, watch_retry: RetryPolicy) -> None:
        self.api_client = api_client
        self.api: Any = k8s.CoreV1Api(api_client)
        self.coordination: Any = k8s.CoordinationV1Api(api_client)
        self.bucket = bucket
        self.http_timeout = http_timeout
        self.rest_retry = rest_retry
        self.watch_retry = watch_retry
        self.counters = _Counters()
        self.observe: RequestObserver = _ignore
        """Told about every request attempt (the gateway's metrics)."""
        self.answered_at: float | None = None
        """``time.monotonic()`` of the newest answer of the API server (status < 500)."""
        self.ws_client: Any = None
        self.watch_client: Any = None
        self.watch_api: Any = self.api
        """Watches use their own pool (see ``_connect``)."""

    async def close(self) -> None:
        await self.api_client.close()
        for client_ in (self.watch_client, self.ws_client):
            if client_ is not None:
                await client_.close()

    async def _throttle(self) -> None:
        delay = self.bucket.reserve(asyncio.get_running_loop().time())
        self.counters.requests += 1
        if delay > 0:
            self.counters.throttled_seconds += delay
            await asyncio.sleep(delay)

    async def _attempt(self, call: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                       kwargs: dict[str, Any], idempotent: bool) -> Any:
        await self._throttle()
        verb, resource = verb_and_resource(getattr(call, "__name__", "?"))
        try:
            resp = await call(*args, _preload_content=False,
                              _request_timeout=aiohttp.ClientTimeout(total=self.http_timeout),
                              **kwargs)  # fmt: skip
            async with resp:
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.observe(verb, resource, None)
            if idempotent or _never_sent(exc):
                raise _Retry(_transport_error(exc)) from exc
            raise _transport_error(exc) from exc
        self.answered(verb, resource, resp.status)
        if 200 <= resp.status < 300:
            return json.loads(body) if body else {}
        error = _status_error(resp.status, body)
        if resp.status == 429 or (idempotent and resp.status >= 500 and resp.status != 501):
            raise _Retry(error, _retry_after(resp.headers))
        raise error

    def answered(self, verb: str, resource: str, status: int) -> None:
        """The API server answered a request with ``status``."""
        self.observe(verb, resource, status)
        if status < 500:
            self.answered_at = time.monotonic()

    async def ping(self) -> bool:
        """One ``GET /version`` attempt, no retries: did the API server answer?"""
        try:
            await self._attempt(k8s.VersionApi(self.api_client).get_code, (), {}, True)
        except (_Retry, KubernetesError):
            return False
        return True

    async def call(self, call: Callable[..., Awaitable[Any]], *args: Any,
                   idempotent: bool = True, **kwargs: Any) -> Any:
        """One REST call with retries; the parsed JSON body."""
        for attempt in range(self.rest_retry.attempts):
            try:
                return await self._attempt(call, args, kwargs, idempotent)
            except _Retry as retry:
                if attempt + 1 >= self.rest_retry.attempts:
                    raise retry.error from retry.__cause__
                log.info("retrying after %s", retry.error)
                self.counters.retries += 1
                await asyncio.sleep(self.rest_retry.delay(attempt, retry.retry_after))
        raise AssertionError("unreachable")

    # -- following one pod --------------------------------------------------
    async def follow_pod(self, namespace: str, name: str, follow: _Follow[T]) -> T:
        """Watch pod ``name`` until ``follow.judge(event_type, pod)`` returns non-None."""
        while True:
            if follow.rv is None:
                verdict = await self._relist(namespace, name, follow)
                if verdict is not None:
                    return verdict
            try:
                verdict = await self._watch_once(namespace, name, follow)
            except _Expired:
                self.counters.relists += 1
                follow.rv = None
                continue
            except _Retry as retry:
                follow.failures += 1
                if follow.failures >= self.watch_retry.attempts:
                    raise retry.error from retry.__cause__
                log.info("watch of pod %s/%s broke (%s); resuming", namespace, name, retry.error)
                await asyncio.sleep(self.watch_retry.delay(follow.failures - 1, retry.retry_after))
            else:
                if verdict is not None:
                    return verdict
            self.counters.watch_resumes += 1

    async def _relist(self, namespace: str, name: str, follow: _Follow[T]) -> T | None:
        listed = await self.call(self.api.list_namespaced_pod, namespace,
                                 field_selector=f"metadata.name={name}")  # fmt: skip
        items = listed.get("items") or []
        follow.rv = str((listed.get("metadata") or {}).get("resourceVersion") or "") or None
        return follow.judge("LISTED", items[0] if items else None)

    async def _watch_once(self, namespace: str, name: str, follow: _Follow[T]) -> T | None:
        """One watch stream: the verdict, or None when the stream ended (resume)."""
        timeout = aiohttp.ClientTimeout(connect=self.http_timeout, sock_connect=self.http_timeout,
                                        sock_read=WATCH_SECONDS + self.http_timeout)
        await self._throttle()
        try:
            resp = await self.watch_api.list_namespaced_pod(
                namespace, field_selector=f"metadata.name={name}", watch=True,
                resource_version=follow.rv, allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS, _preload_content=False, _request_timeout=timeout)
            async with resp:
                self.answered("watch", "pods", resp.status)
                if resp.status != 200:
                    self._raise_watch_status(resp.status, await resp.read(), resp.headers)
                self.counters.watches_opened += 1
                while line := await resp.content.readline():
                    self.answered_at = time.monotonic()
                    if not line.strip():
                        continue
                    verdict = self._watch_event(json.loads(line), follow)
                    if verdict is not None:
                        return verdict
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.observe("watch", "pods", None)
            raise _Retry(_transport_error(exc)) from exc
        return None

    def _raise_watch_status(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        if status == 410:
            raise _Expired()
        error = _status_error(status, body)
        if status == 429 or (status >= 500 and status != 501):
            raise _Retry(error, _retry_after(headers))
        raise error

    def _watch_event(self, event: dict[str, Any], follow: _Follow[T]) -> T | None:
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR" or (etype is None and "code" in event):
            status = obj if etype == "ERROR" else event
            code = int(status.get("code") or 500)
            self._raise_watch_status(code, json.dumps(status).encode(), {})
        follow.failures = 0
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            follow.rv = str(rv)
        if etype == "BOOKMARK":
            return None
        return follow.judge(str(etype), None if etype == "DELETED" else obj)


# == watching many pods (asyncio side) ===========================================================


PodSink = Callable[[str, list[Pod]], None]
"""Receives ``("SYNC", all pods)`` after each (re-)list and ``(event type, [pod])`` after
each ADDED/MODIFIED/DELETED event. Synchronous; called on the asyncio side."""


async def _watch_pods(t: _Transport, namespace: str, label_selector: str,
                      sink: PodSink) -> None:
    """Follow every pod matching ``label_selector`` forever (see :meth:`KubeClient.watch_pods`)."""
    rv: str | None = None
    failures = 0
    while True:
        try:
            if rv is None:
                listed = await t.call(t.api.list_namespaced_pod, namespace,
                                      label_selector=label_selector or None)  # fmt: skip
                rv = str((listed.get("metadata") or {}).get("resourceVersion") or "") or None
                sink("SYNC", list(listed.get("items") or []))
            rv = await _watch_pods_once(t, namespace, label_selector, rv, sink)
            failures = 0
        except _Expired:
            t.counters.relists += 1
            rv = None
            continue
        except (_Retry, KubernetesError) as exc:
            error = exc.error if isinstance(exc, _Retry) else exc
            retry_after = exc.retry_after if isinstance(exc, _Retry) else None
            if isinstance(exc, KubernetesError):
                rv = None  # a list failed or the watch was refused: start over
            failures += 1
            level = logging.INFO if failures < t.watch_retry.attempts else logging.WARNING
            log.log(level, "pod watch %s/%s broke (%s); resuming", namespace, label_selector,
                    error)
            await asyncio.sleep(t.watch_retry.delay(min(failures, t.watch_retry.attempts) - 1,
                                                    retry_after))
        t.counters.watch_resumes += 1


async def _watch_pods_once(t: _Transport, namespace: str, label_selector: str, rv: str | None,
                           sink: PodSink) -> str | None:
    """One watch stream from ``rv``; returns the resourceVersion to resume from."""
    timeout = aiohttp.ClientTimeout(connect=t.http_timeout, sock_connect=t.http_timeout,
                                    sock_read=WATCH_SECONDS + t.http_timeout)
    await t._throttle()
    try:
        resp = await t.watch_api.list_namespaced_pod(
            namespace, label_selector=label_selector or None, watch=True,
            resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
            _preload_content=False, _request_timeout=timeout)
        async with resp:
            t.answered("watch", "pods", resp.status)
            if resp.status != 200:
                t._raise_watch_status(resp.status, await resp.read(), resp.headers)
            t.counters.watches_opened += 1
            while line := await resp.content.readline():
                t.answered_at = time.monotonic()
                if not line.strip():
                    continue
                event = json.loads(line)
                etype, obj = event.get("type"), event.get("object") or {}
                if etype == "ERROR" or (etype is None and "code" in event):
                    status = obj if etype == "ERROR" else event
                    t._raise_watch_status(int(status.get("code") or 500),
                                          json.dumps(status).encode(), {})
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    sink(str(etype), [obj])
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        t.observe("watch", "pods", None)
        raise _Retry(_transport_error(exc)) from exc
    return rv


# == the trio-facing client ======================================================================


def _start_judge(name: str) -> Callable[[str, Pod | None], Pod | None]:
    return lambda etype, pod: judge_start(name, pod)


class KubeClient:
    """Pod operations against one API server. Trio-flavoured; open with :func:`open_kube_client`.

    Each method crosses into asyncio once. Errors: :class:`KubernetesError` (status 0 for
    transport failures and timeouts), :class:`NotFoundError`, :class:`PodStartError`.
    """

    def __init__(self, transport: _Transport) -> None:
        self._t = transport

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<KubeClient {self._t.api_client.configuration.host} requests={s.requests} "
                f"retries={s.retries} watches={s.watches_opened}>")

    @property
    def exec_client(self) -> Any:
        """The kubernetes-asyncio ``WsApiClient`` for exec streams (asyncio-side object)."""
        return self._t.ws_client

    @property
    def exec_throttle(self) -> Callable[[], Awaitable[None]]:
        """Asyncio-flavoured: take a token from the ``qps``/``burst`` rate limiter (exec opens)."""
        return self._t._throttle

    @property
    def last_answer(self) -> float | None:
        """``time.monotonic()`` of the API server's newest answer (status < 500), or None."""
        return self._t.answered_at

    def observe_requests(self, observer: RequestObserver) -> None:
        """Call ``observer(verb, resource, status or None)`` for every request attempt."""
        self._t.observe = observer

    async def ping(self) -> bool:
        """Ask the API server once (``GET /version``, no retry): did it answer?"""
        answered: bool = await run_aio(self._t.ping)
        return answered

    def statistics(self) -> KubeClientStatistics:
        """Counters since the client was opened."""
        return KubeClientStatistics(**attrs.asdict(self._t.counters))

    async def create_pod(self, namespace: str, body: Pod) -> Pod:
        """Create a pod; the stored pod (with its resourceVersion) as a dict."""
        t = self._t
        pod: Pod = await run_aio(t.call, t.api.create_namespaced_pod, namespace, body,
                                 idempotent=False)  # fmt: skip
        return pod

    async def get_pod(self, namespace: str, name: str) -> Pod:
        """The pod; :class:`NotFoundError` if there is none."""
        pod: Pod = await run_aio(self._t.call, self._t.api.read_namespaced_pod, name, namespace)
        return pod

    async def list_pods(self, namespace: str, label_selector: str = "") -> list[Pod]:
        """Pods in ``namespace`` matching ``label_selector`` (all if empty)."""
        t = self._t
        listed = await run_aio(t.call, t.api.list_namespaced_pod, namespace,
                               label_selector=label_selector or None)  # fmt: skip
        items: list[Pod] = listed.get("items") or []
        return items

    async def delete_pod(self, namespace: str, name: str,
                         grace_period_seconds: int | None = None, *,
                         resource_version: str | None = None) -> None:
        """Delete a pod (graceful unless ``grace_period_seconds`` is 0); gone already is fine.

        With ``resource_version`` only the pod at that version is deleted (409 ``Conflict``
        as :class:`KubernetesError` if it changed since)."""
        t = self._t
        kwargs: dict[str, Any] = {}
        if resource_version is not None:
            kwargs["body"] = k8s.V1DeleteOptions(
                grace_period_seconds=grace_period_seconds,
                preconditions=k8s.V1Preconditions(resource_version=resource_version))
        with contextlib.suppress(NotFoundError):
            await run_aio(t.call, t.api.delete_namespaced_pod, name, namespace,
                          grace_period_seconds=grace_period_seconds, **kwargs)  # fmt: skip

    async def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> Pod:
        """JSON merge-patch (RFC 7386) of a pod's metadata; the pod as stored afterwards.

        A ``None`` value removes the key; :class:`NotFoundError` if there is no pod."""
        t = self._t
        pod: Pod = await run_aio(t.call, t.api.patch_namespaced_pod, name, namespace, patch,
                                 _content_type="application/merge-patch+json")  # fmt: skip
        return pod

    async def events_for_pod(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Events with ``involvedObject.name`` ``name``, as listed (see :func:`last_warning`)."""
        t = self._t
        listed = await run_aio(t.call, t.api.list_namespaced_event, namespace,
                               field_selector=f"involvedObject.name={name}")  # fmt: skip
        items: list[dict[str, Any]] = listed.get("items") or []
        return items

    # -- Leases (coordination.k8s.io/v1): see gateway/lease.py --------------
    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        """The Lease; :class:`NotFoundError` if there is none."""
        t = self._t
        lease: dict[str, Any] = await run_aio(t.call, t.coordination.read_namespaced_lease,
                                              name, namespace)  # fmt: skip
        return lease

    async def list_leases(self, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        """Leases in ``namespace`` matching ``label_selector``."""
        t = self._t
        listed = await run_aio(t.call, t.coordination.list_namespaced_lease, namespace,
                               label_selector=label_selector or None)  # fmt: skip
        items: list[dict[str, Any]] = listed.get("items") or []
        return items

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a Lease (409 ``AlreadyExists`` as :class:`KubernetesError`)."""
        t = self._t
        lease: dict[str, Any] = await run_aio(t.call, t.coordination.create_namespaced_lease,
                                              namespace, body, idempotent=False)  # fmt: skip
        return lease

    async def replace_lease(self, namespace: str, name: str,
                            body: dict[str, Any]) -> dict[str, Any]:
        """PUT a Lease; a stale ``metadata.resourceVersion`` is a 409 ``Conflict``."""
        t = self._t
        lease: dict[str, Any] = await run_aio(t.call, t.coordination.replace_namespaced_lease,
                                              name, namespace, body,
                                              idempotent=False)  # fmt: skip
        return lease

    async def delete_lease(self, namespace: str, name: str,
                           resource_version: str | None = None) -> None:
        """Delete a Lease (only at ``resource_version`` if given: 409 otherwise); gone is fine."""
        t = self._t
        body = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(
            resource_version=resource_version)) if resource_version else None
        with contextlib.suppress(NotFoundError):
            await run_aio(t.call, t.coordination.delete_namespaced_lease, name, namespace,
                          body=body)  # fmt: skip

    async def wait_for_pod(self, namespace: str, name: str, *,
                           resource_version: str | None) -> Pod:
        """Wait until the pod is Running and Ready and return it.

        Watches from ``resource_version`` (the create's; None = list first). Raises
        :class:`PodStartError` with the cluster's reason when the pod fails to start (see
        :func:`pod_start_failure`) or is deleted. No timeout: use a cancel scope.
        """
        follow: _Follow[Pod] = _Follow(_start_judge(name), resource_version)
        pod: Pod = await run_aio(self._t.follow_pod, namespace, name, follow)
        return pod

    async def watch_pod_gone_or_failed(self, namespace: str, name: str,
                                       container: str | None = None) -> PodLoss:
        """Return when the pod is deleted (or being deleted), has failed or been evicted, or
        ``container`` (None: any container) is no longer running. Call it once the pod is
        Running. Runs until then: cancel it when the connection ends."""
        judge = lambda _etype, pod: pod_loss(pod, container)  # noqa: E731
        follow: _Follow[PodLoss] = _Follow(judge, None)
        loss: PodLoss = await run_aio(self._t.follow_pod, namespace, name, follow)
        return loss


    async def watch_pods(self, namespace: str, label_selector: str, sink: PodSink) -> None:
        """Follow every pod in ``namespace`` matching ``label_selector``; never returns.

        One crossing for the whole life of the watch: ``sink`` is called synchronously on
        the asyncio side with ``("SYNC", pods)`` after every (re-)list -- the first one and
        each after a 410 Expired -- and ``(type, [pod])`` for each ADDED/MODIFIED/DELETED
        event. Streams that end or break are resumed from the last resourceVersion seen
        (BOOKMARKs included); failures are retried forever with :attr:`watch_retry`
        back-off. Cancel it to stop.
        """
        await run_aio(_watch_pods, self._t, namespace, label_selector, sink)


@contextlib.asynccontextmanager
async def open_kube_client(
    config: KubernetesConfig,
    *,
    rest_retry: RetryPolicy = REST_RETRY,
    watch_retry: RetryPolicy = WATCH_RETRY,
) -> AsyncIterator[KubeClient]:
    """A :class:`KubeClient` for ``config.connection``. Trio-flavoured.

    Needs a running trio-asyncio loop (:func:`kuberun_trio.aio.bridge.open_aio_loop`).
    Raises :class:`ConfigError` if the connection source cannot be loaded.
    """
    transport = await run_aio(_connect, config, rest_retry, watch_retry)
    try:
        yield KubeClient(transport)
    finally:
        with trio.move_on_after(5, shield=True):
            await run_aio(transport.close)
