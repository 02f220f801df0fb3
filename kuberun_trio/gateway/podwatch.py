"""One shared pod watch per namespace for a whole gateway instance.

Theory of operation
-------------------
Without a hub, every connection follows its own pod with two watches of its own
(:meth:`KubeClient.wait_for_pod`, then :meth:`KubeClient.watch_pod_gone_or_failed`):
hundreds of connections mean hundreds of open watch streams on the API server.
A :class:`PodWatchHub` replaces them with *one* watch per namespace on the label
selector of this gateway instance
(:func:`~kuberun_trio.core.podtemplate.label_selector_for_instance`).

:meth:`PodWatchHub.run` is a trio service (start it with ``nursery.start``). The
first waiter in a namespace starts that namespace's follower: one call of
:meth:`KubeClient.watch_pods`, which lists, watches, resumes from the last
resourceVersion on drops, re-lists on 410 and retries forever, all on the asyncio
side of one crossing. Its synchronous sink puts each event into an unbounded trio
memory channel; a trio task takes everything that is queued at once (a batch) and
applies it in order.

Per namespace the hub keeps the latest state of every pod it has seen, and the
waiters by pod name. Each waiter has a pure *judge* (the same ones the per-pod
watches use: :func:`pod_ready`/:func:`pod_start_failure` and :func:`pod_loss`),
which is applied to the current state when the waiter registers and then to
*every* later event of its pod, in order -- no state is skipped, so the verdicts
are those of a per-pod watch. A ``SYNC`` (the list after a 410) is judged like a
watch event for every pod in it, and as a deletion for every waited-for pod the
hub knew but the list no longer holds.

The create/watch race: a connection may wait for a pod the hub has not seen yet
(the create's response can arrive before the watch event). Such a waiter waits
for the hub; if the hub still has not seen the pod after :data:`GET_FALLBACK`
seconds it reads the pod once with a GET and judges that (404 = deleted) unless
the hub has seen the pod meanwhile.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import trio

from ..aio.kube import KubeClient
from ..core.podstate import Pod, PodLoss, judge_start, pod_loss
from ..errors import KuberunError, NotFoundError

log = logging.getLogger(__name__)

T = TypeVar("T")

GET_FALLBACK = 2.0
"""Seconds a waiter waits for the hub to see its pod before it reads the pod itself."""


@attrs.define(eq=False)
class _Waiter(Generic[T]):
    judge: Callable[[Pod | None], T | None]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None

    def offer(self, pod: Pod | None) -> None:
        """Judge one state of the pod (None: deleted)."""
        if self.done.is_set():
            return
        try:
            verdict = self.judge(pod)
        except Exception as exc:
            self.error = exc
            self.done.set()
            return
        if verdict is not None:
            self.result = verdict
            self.done.set()


@attrs.define(eq=False)
class _Namespace:
    name: str
    pods: dict[str, Pod] = attrs.field(factory=dict)
    waiters: dict[str, set[_Waiter[Any]]] = attrs.field(factory=dict)
    seen: set[str] = attrs.field(factory=set)
    """Names of pods the hub saw while someone waited for them (deletion detection)."""
    synced: trio.Event = attrs.field(factory=trio.Event)


class PodWatchHub:
    """Shared pod watches of one gateway instance. Trio-flavoured; run with :meth:`run`."""

    def __init__(self, kube: KubeClient, label_selector: str, *,
                 get_fallback: float = GET_FALLBACK) -> None:
        self.kube = kube
        self.label_selector = label_selector
        self.get_fallback = get_fallback
        self._namespaces: dict[str, _Namespace] = {}
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        pods = sum(len(ns.pods) for ns in self._namespaces.values())
        waiters = sum(len(w) for ns in self._namespaces.values() for w in ns.waiters.values())
        return (f"<PodWatchHub {self.label_selector!r} namespaces={len(self._namespaces)} "
                f"pods={pods} waiters={waiters}>")

    async def run(self, *, task_status: trio.TaskStatus[PodWatchHub] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve waiters until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def phase_counts(self) -> dict[str, int]:
        """This instance's pods the hub knows, by phase (``Terminating`` once deleted)."""
        counts: dict[str, int] = {}
        for ns in self._namespaces.values():
            for pod in ns.pods.values():
                if (pod.get("metadata") or {}).get("deletionTimestamp"):
                    phase = "Terminating"
                else:
                    phase = str((pod.get("status") or {}).get("phase") or "Pending")
                counts[phase] = counts.get(phase, 0) + 1
        return counts

    # -- waiting ------------------------------------------------------------
    async def wait_ready(self, namespace: str, name: str) -> Pod:
        """Wait until pod ``name`` is Running and Ready and return it; :class:`PodStartError`
        (the reasons of :meth:`KubeClient.wait_for_pod`) if it fails to start or is deleted.
        No timeout: use a cancel scope."""
        pod: Pod = await self._wait(namespace, name, functools.partial(judge_start, name))
        return pod

    async def wait_lost(self, namespace: str, name: str,
                        container: str | None = None) -> PodLoss:
        """Return when the pod is deleted (or being deleted), has failed, or ``container``
        (None: any) is no longer running (see :func:`pod_loss`). Runs until then."""
        loss: PodLoss = await self._wait(namespace, name, lambda pod: pod_loss(pod, container))
        return loss

    async def _wait(self, namespace: str, name: str, judge: Callable[[Pod | None], T | None]
                    ) -> T:
        ns = self._namespace(namespace)
        waiter: _Waiter[T] = _Waiter(judge)
        ns.waiters.setdefault(name, set()).add(waiter)
        try:
            if name in ns.pods:
                ns.seen.add(name)
                waiter.offer(ns.pods[name])
            if not waiter.done.is_set():
                async with trio.open_nursery() as nursery:
                    if name not in ns.pods:
                        nursery.start_soon(self._fallback, ns, name, waiter)
                    await waiter.done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            waiters = ns.waiters.get(name)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del ns.waiters[name]
                    ns.seen.discard(name)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    async def _fallback(self, ns: _Namespace, name: str, waiter: _Waiter[Any]) -> None:
        """The hub has not seen the pod: after a while, read it once ourselves."""
        await trio.sleep(self.get_fallback)
        if name in ns.seen:
            return
        try:
            pod: Pod | None = await self.kube.get_pod(ns.name, name)
        except NotFoundError:
            pod = None
        except KuberunError as exc:
            log.info("pod %s: fallback read failed: %s", name, exc)
            return
        if name not in ns.seen:
            waiter.offer(pod)

    # -- the followers ------------------------------------------------------
    def _namespace(self, namespace: str) -> _Namespace:
        ns = self._namespaces.get(namespace)
        if ns is None:
            if self._nursery is None:
                raise KuberunError("the pod watch hub is not running")
            ns = self._namespaces[namespace] = _Namespace(namespace)
            self._nursery.start_soon(self._follow, namespace, ns)
        return ns

    async def _follow(self, namespace: str, ns: _Namespace) -> None:
        send, receive = trio.open_memory_channel[tuple[str, list[Pod]]](math.inf)

        def sink(kind: str, pods: list[Pod]) -> None:
            send.send_nowait((kind, pods))

        async with trio.open_nursery() as nursery, receive:
            nursery.start_soon(self._watch, namespace, sink)
            async for first in receive:
                batch = [first]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                for kind, pods in batch:
                    self._apply(ns, kind, pods)
                await trio.lowlevel.checkpoint()

    async def _watch(self, namespace: str, sink: Callable[[str, list[Pod]], None]) -> None:
        while True:  # watch_pods retries on its own; this only guards against the unforeseen
            try:
                await self.kube.watch_pods(namespace, self.label_selector, sink)
            except Exception:
                log.exception("pod watch of %s crashed; restarting", namespace)
            await trio.sleep(1)

    def _apply(self, ns: _Namespace, kind: str, pods: list[Pod]) -> None:
        if kind == "SYNC":
            listed = {str((p.get("metadata") or {}).get("name")): p for p in pods}
            for name in [n for n in ns.pods if n not in listed]:
                self._update(ns, name, None)
            for name, pod in listed.items():
                self._update(ns, name, pod)
            ns.synced.set()
            return
        for pod in pods:
            self._update(ns, str((pod.get("metadata") or {}).get("name")),
                         None if kind == "DELETED" else pod)

    def _update(self, ns: _Namespace, name: str, pod: Pod | None) -> None:
        if pod is None:
            ns.pods.pop(name, None)
        else:
            ns.pods[name] = pod
        waiters = ns.waiters.get(name)
        if waiters:
            ns.seen.add(name)
            for waiter in list(waiters):
                waiter.offer(pod)
