"""Fault injection for the embedded cluster.

:class:`Faults` is a plain state holder with two sides. Tests (and the soak
harness) call the *injection* methods -- ``fail_image``, ``delay_start``,
``fail_requests``, ``stall``/``resume``, ``drop_watches``, ``expire_watches``,
``cut_exec``, ``serve_v4_only``, ``evict``, ``kill``. The cluster's parts call the *query*
methods at the point where the fault bites: the kubelet asks
:meth:`image_pull_error` and :meth:`start_delay`, the HTTP server waits in
:meth:`pass_stall` and asks :meth:`take_request_failure` before routing, watches wait on
:meth:`watch_dropped`, exec streams ask :meth:`take_exec_cut` and
:attr:`v5_refused`.

Faults that act on running things (expire, evict, kill) are delegated to the
store and kubelet, which the assembly in :mod:`kuberun_trio.cluster` binds with
:meth:`bind`.

Every fault that bites is recorded in :attr:`Faults.hits` with what it hit (a
:class:`FaultHit`: the request line, the exec stream's pod, the pod evicted,
or every open watch), so a harness can tell a failure the fault caused from
one that merely happened at the same time. The record is bounded (the newest
``MAX_HITS``).
"""

from __future__ import annotations

import collections
import fnmatch
from collections.abc import Awaitable, Callable

import attrs
import trio


@attrs.frozen
class RequestFailure:
    """An injected API error for one request."""

    code: int
    """500 or 429 (or any other status)."""
    retry_after: int | None = None
    """Seconds for the ``Retry-After`` header (429)."""


MAX_HITS = 10_000
"""How many :class:`FaultHit` records :attr:`Faults.hits` keeps (the newest)."""


@attrs.frozen
class FaultHit:
    """One injected fault reaching its target."""

    kind: str
    """``api-<code>``, ``exec-cut``, ``watch-drop``, ``evict`` or ``kill``."""
    time: float
    """``trio.current_time()`` when it bit."""
    target: str
    """What it hit: ``GET /api/v1/...?query``, ``exec stream of pod p``, ``pod ns/p``, ..."""
    pod: str | None = None
    """The one pod it hit, if it hit one (None: a collection request or every watch)."""


@attrs.define
class _RequestRule:
    verb: str
    resource: str
    remaining: int
    failure: RequestFailure


@attrs.define
class _ExecCut:
    pod: str | None
    after_bytes: int


PodAction = Callable[[str, str], Awaitable[None]]


class Faults:
    """The fault API of a running embedded cluster."""

    def __init__(self) -> None:
        self._image_patterns: list[tuple[str, str | None]] = []
        self._start_delays: list[tuple[str, float]] = []
        self._request_rules: list[_RequestRule] = []
        self._watch_drop = trio.Event()
        self._unstalled = trio.Event()
        self._unstalled.set()
        self.stalled_requests = 0
        """Requests held by :meth:`stall` so far."""
        self._exec_cuts: list[_ExecCut] = []
        self.v5_refused = False
        """True after :meth:`serve_v4_only`: exec/attach never negotiate ``v5.channel.k8s.io``."""
        self._expire: Callable[[], None] | None = None
        self._evict: PodAction | None = None
        self._kill: PodAction | None = None
        self.hits: collections.deque[FaultHit] = collections.deque(maxlen=MAX_HITS)
        """The faults that bit, oldest first (the newest ``MAX_HITS``)."""

    def _hit(self, kind: str, target: str, pod: str | None = None) -> None:
        self.hits.append(FaultHit(kind, trio.current_time(), target, pod))

    def bind(self, *, expire: Callable[[], None], evict: PodAction, kill: PodAction) -> None:
        """Connect the faults that act on the store and kubelet (done by the assembly)."""
        self._expire, self._evict, self._kill = expire, evict, kill

    # -- images and start-up ------------------------------------------------
    def fail_image(self, pattern: str, message: str | None = None) -> None:
        """Images matching the glob ``pattern`` fail to pull (ErrImagePull ⇄ ImagePullBackOff)."""
        self._image_patterns.append((pattern, message))

    def image_pull_error(self, image: str) -> str | None:
        """The pull error message for ``image``, or None if it pulls fine."""
        for pattern, message in self._image_patterns:
            if fnmatch.fnmatchcase(image, pattern):
                return message or (
                    f'failed to pull and unpack image "{image}": failed to resolve reference '
                    f'"{image}": not found'
                )
        return None

    def delay_start(self, seconds: float, pattern: str = "*") -> None:
        """Containers whose image matches ``pattern`` take ``seconds`` longer to start."""
        self._start_delays.append((pattern, seconds))

    def start_delay(self, image: str) -> float:
        return sum(s for p, s in self._start_delays if fnmatch.fnmatchcase(image, p))

    # -- API requests -------------------------------------------------------
    def fail_requests(
        self,
        verb: str,
        resource: str,
        count: int,
        *,
        code: int = 500,
        retry_after: int | None = None,
    ) -> None:
        """The next ``count`` requests of ``verb`` on ``resource`` fail with ``code``.

        ``verb`` is a Kubernetes verb (``create``, ``get``, ``list``, ``watch``,
        ``delete``, ...) or ``*``; ``resource`` is e.g. ``pods``, ``pods/exec`` or ``*``.
        """
        self._request_rules.append(
            _RequestRule(verb, resource, count, RequestFailure(code, retry_after))
        )

    def clear_request_failures(self) -> None:
        """Disarm every :meth:`fail_requests` rule."""
        self._request_rules.clear()

    def take_request_failure(self, verb: str, resource: str, *, target: str = "",
                             pod: str | None = None) -> RequestFailure | None:
        """Consume and return the failure for this request, if one is armed.

        ``target`` (the request line) and ``pod`` (the pod it names) go into :attr:`hits`.
        """
        for rule in self._request_rules:
            if rule.remaining > 0 and rule.verb in ("*", verb) and rule.resource in ("*", resource):
                rule.remaining -= 1
                self._hit(f"api-{rule.failure.code}", target or f"{verb} {resource}", pod)
                return rule.failure
        return None

    def stall(self) -> None:
        """Hold every API request from now on (read, then not answered) until :meth:`resume`,
        like an API server that was sent SIGSTOP. Open streams are not affected."""
        if self._unstalled.is_set():
            self._unstalled = trio.Event()

    def resume(self) -> None:
        """Let the held requests through (in no particular order) and stop holding."""
        self._unstalled.set()

    @property
    def stalled(self) -> bool:
        return not self._unstalled.is_set()

    async def pass_stall(self) -> None:
        """Wait while the API server is stalled (the HTTP server calls this per request)."""
        if not self._unstalled.is_set():
            self.stalled_requests += 1
            await self._unstalled.wait()

    # -- watches ------------------------------------------------------------
    def drop_watches(self) -> None:
        """End every open watch stream abruptly (clients must resume)."""
        self._hit("watch-drop", "every open watch")
        self._watch_drop.set()
        self._watch_drop = trio.Event()

    def watch_dropped(self) -> trio.Event:
        """An event set when the open watches are to be dropped."""
        return self._watch_drop

    def expire_watches(self) -> None:
        """Make every resourceVersion so far too old (410 on resume), and drop open watches."""
        if self._expire is not None:
            self._expire()
        self.drop_watches()

    # -- exec streams -------------------------------------------------------
    def cut_exec(self, pod: str | None = None, after_bytes: int = 0) -> None:
        """Cut the next exec stream (of ``pod``, or any) after ``after_bytes`` of output."""
        self._exec_cuts.append(_ExecCut(pod, after_bytes))

    def serve_v4_only(self, enabled: bool = True) -> None:
        """Refuse ``v5.channel.k8s.io`` from now on, like a cluster before 1.30 (or one with
        ``TranslateStreamCloseWebsocketRequests`` off): streams take the v4 path."""
        self.v5_refused = enabled

    def take_exec_cut(self, pod: str) -> int | None:
        """Consume a cut armed for ``pod``: the byte count after which to cut, or None."""
        for cut in self._exec_cuts:
            if cut.pod in (None, pod):
                self._exec_cuts.remove(cut)
                self._hit("exec-cut", f"exec stream of pod {pod}", pod)
                return cut.after_bytes
        return None

    # -- pods ---------------------------------------------------------------
    async def evict(self, namespace: str, pod: str) -> None:
        """Evict a running pod, like node-pressure eviction: phase Failed, reason Evicted."""
        assert self._evict is not None, "Faults not bound to a cluster"
        await self._evict(namespace, pod)
        self._hit("evict", f"pod {namespace}/{pod}", pod)

    async def kill(self, namespace: str, pod: str) -> None:
        """SIGKILL every process of the pod's containers (they exit 137)."""
        assert self._kill is not None, "Faults not bound to a cluster"
        await self._kill(namespace, pod)
        self._hit("kill", f"pod {namespace}/{pod}", pod)
