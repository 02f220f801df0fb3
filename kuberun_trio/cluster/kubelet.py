"""The kubelet: the embedded cluster's one node, running every pod with real processes.

Theory of operation
-------------------
:meth:`Kubelet.run` consumes :meth:`Store.subscribe` and keeps one
:class:`~.podworker.PodWorker` task per pod (keyed by namespace/name, checked
by uid) in its nursery. Our own status writes come back as MODIFIED events;
only a new ``deletionTimestamp`` (or a shorter grace period) matters in them.
A DELETED event cancels the pod's worker; an event about an older pod of the
same name is ignored.

The rest of the node is split by concern:

* :mod:`.podworker` -- one pod's lifecycle: schedule, sandbox, terminate, remove;
* :mod:`.container` -- one container's pull/start/restart loop;
* :mod:`.podstatus` -- phase and conditions, as ``getPhase`` and
  ``status/generate.go`` derive them;
* :mod:`.env`, :mod:`.backoff` -- environment building, back-off timing;
* :mod:`.logs` -- per-instance output buffers behind :meth:`Kubelet.logs`;
* :mod:`.attach` -- :class:`RunningContainer` and attachers, for
  :mod:`.streaming` (exec and attach look containers up with
  :meth:`Kubelet.running_container`).

Faults reach the node through :meth:`Kubelet.evict` (a grace-0 termination
leaving phase Failed, reason Evicted) and :meth:`Kubelet.kill` (SIGKILL; the
restart policy applies); :meth:`Kubelet.shutdown` kills every pod and writes
nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

import trio

from ..errors import ClusterError
from . import status as api_status
from .attach import Attachment, RunningContainer
from .backoff import go_duration
from .container import normalize_image
from .env import expand
from .faults import Faults
from .logs import LogBuffer
from .podstatus import EVICTED_MESSAGE, Obj, now_rfc3339
from .podworker import PodWorker

__all__ = [
    "EVICTED_MESSAGE",
    "Attachment",
    "ContainerNotRunning",
    "Kubelet",
    "KubeletStore",
    "LogBuffer",
    "RunningContainer",
    "expand",
    "go_duration",
    "normalize_image",
    "now_rfc3339",
]


class KubeletStore(Protocol):
    """What the kubelet uses of :class:`~.store.Store`."""

    def subscribe(self) -> trio.MemoryReceiveChannel[tuple[str, Obj]]: ...
    def list_pods(self, ns: str | None) -> Obj: ...
    def update_pod(
        self,
        ns: str,
        name: str,
        mutate: Callable[[Obj], None],
        *,
        manager: str = ...,
        subresource: str = ...,
    ) -> Obj: ...
    def remove_pod(self, ns: str, name: str) -> Obj: ...
    def record_event(
        self,
        ns: str,
        pod: Obj,
        type_: str,
        reason: str,
        message: str,
        *,
        component: str = ...,
        host: str | None = ...,
        field_path: str | None = ...,
    ) -> Obj: ...


class ContainerNotRunning(ClusterError, LookupError):
    """The container is not running (the kubelet answers ``container not found ("c")``)."""

    def __init__(self, container: str) -> None:
        super().__init__(f'container not found ("{container}")')
        self.container = container


# -- the kubelet -------------------------------------------------------------------


class Kubelet:
    """The embedded cluster's one node: runs every pod of the store as process sandboxes."""

    def __init__(
        self,
        store: KubeletStore,
        faults: Faults,
        node_name: str = "kuberun-node",
        *,
        image_roots: Mapping[str, str] | None = None,
        backoff_base: float = 10.0,
        backoff_max: float = 300.0,
        use_namespaces: bool | None = None,
        host_ip: str = "127.0.0.1",
        log_limit: int = 10 * 1024 * 1024,
        private_tmp: bool = False,
    ) -> None:
        self.store, self.faults, self.node_name = store, faults, node_name
        self.image_roots = dict(image_roots or {})
        self.backoff_base, self.backoff_max = backoff_base, max(backoff_max, backoff_base)
        self.use_namespaces, self.host_ip, self.log_limit = use_namespaces, host_ip, log_limit
        self.private_tmp = private_tmp
        """Each pod gets its own empty ``/tmp`` (a tmpfs in its mount namespace)."""
        self.images: set[str] = set()
        """Images pulled so far (``IfNotPresent`` skips the pull for these)."""
        self._workers: dict[tuple[str, str], PodWorker] = {}
        self._nursery: trio.Nursery | None = None
        self._shutting_down = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """React to pod changes until cancelled (which kills every pod)."""
        events = self.store.subscribe()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for pod in self.store.list_pods(None).get("items") or ():
                self._on_event("ADDED", pod)
            task_status.started()
            async with events:
                async for kind, pod in events:
                    self._on_event(kind, pod)

    def _on_event(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        key = (meta.get("namespace", "default"), meta["name"])
        worker = self._workers.get(key)
        if worker is not None and worker.uid != meta.get("uid", ""):
            if kind == "DELETED":
                return  # a stale event about an older pod of that name
            worker.gone()
            worker = None
        if kind == "DELETED":
            if worker is not None:
                worker.gone()
                del self._workers[key]
            return
        if worker is None:
            if self._shutting_down or spec.get("nodeName") not in (None, "", self.node_name):
                return
            if meta.get("deletionTimestamp"):
                with contextlib.suppress(api_status.ApiStatusError):
                    self.store.remove_pod(*key)
                return
            assert self._nursery is not None
            worker = self._workers[key] = PodWorker(self, pod)
            self._nursery.start_soon(worker.run)
            return
        worker.pod = pod
        if meta.get("deletionTimestamp"):
            if worker.done.is_set():  # its task ended early (error): just finish the delete
                worker.store_write(lambda: self.store.remove_pod(*key))
            worker.request_delete(float(meta.get("deletionGracePeriodSeconds") or 0))

    def _worker(self, ns: str, pod: str) -> PodWorker:
        worker = self._workers.get((ns, pod))
        if worker is None:
            raise ClusterError(f"pod {ns}/{pod} is not running on node {self.node_name}")
        return worker

    def running_container(self, ns: str, pod: str, container: str) -> RunningContainer:
        """The running container, for exec/attach; raises :class:`ContainerNotRunning`."""
        worker = self._workers.get((ns, pod))
        c = worker.container(container) if worker is not None else None
        if c is None or c.process is None or not c.process.running or c.view is None:
            raise ContainerNotRunning(container)
        return RunningContainer(
            sandbox=c.view,
            env=dict(c.env),
            working_dir=c.spec.get("workingDir") or None,
            name=c.name,
            process=c.process,
            container=c,
        )

    def sandbox_state(self, ns: str, pod: str, uid: str) -> str:
        """The pod sandbox as the CRI sees it: ``ready``, ``stopped`` or ``missing``.

        ``missing`` before the sandbox exists and once the pod (this ``uid``) is gone;
        ``stopped`` once every container loop has ended (terminal pods, deletion).
        """
        worker = self._workers.get((ns, pod))
        if worker is None or worker.uid != uid or worker.sandbox is None or worker.removed:
            return "missing"
        if worker.sandbox.destroyed or worker.containers_stopped.is_set():
            return "stopped"
        return "ready"

    async def wait_sandbox_stopped(self, ns: str, pod: str, uid: str) -> None:
        """Return once the sandbox of pod ``uid`` is no longer ready (at once if it is not)."""
        worker = self._workers.get((ns, pod))
        if worker is None or worker.uid != uid:
            return
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, worker.containers_stopped)
            nursery.start_soon(until, worker.done)

    async def logs(
        self, ns: str, pod: str, container: str, *, follow: bool = False, previous: bool = False
    ) -> AsyncIterator[bytes]:
        """The output of a container instance, chosen as the kubelet does.

        Await it (errors such as "waiting to start" raise a 400 ``ApiStatusError``
        here), then iterate; with ``follow`` the iteration ends when that instance ends.
        """
        await trio.lowlevel.checkpoint()
        worker = self._workers.get((ns, pod))
        c = worker.container(container) if worker is not None else None
        if c is None:
            raise api_status.bad_request(f"container {container} is not valid for pod {pod}")
        return c.log_buffer(previous).read(follow=follow)

    async def evict(self, ns: str, pod: str) -> None:
        """Node-pressure eviction: kill the containers, phase Failed, reason Evicted."""
        worker = self._worker(ns, pod)
        worker.evict()
        await worker.finished.wait()

    async def kill(self, ns: str, pod: str) -> None:
        """SIGKILL every container of the pod (exit 137); the restart policy applies."""
        worker = self._worker(ns, pod)
        waits = []
        for c in worker.containers:
            if c.process is not None and c.process.running:
                c.process.kill_group()
                waits.append(c.exited)
        for exited in waits:
            await exited.wait()

    async def shutdown(self) -> None:
        """Kill every pod (sandboxes destroyed, nothing written) and wait for it."""
        self._shutting_down = True
        workers = list(self._workers.values())
        self._workers.clear()
        for worker in workers:
            worker.gone()
        for worker in workers:
            await worker.done.wait()

    def statistics(self) -> Obj:
        return {
            "pods": len(self._workers),
            "running_containers": sum(
                c.running for w in self._workers.values() for c in w.containers
            ),
        }

    def __repr__(self) -> str:
        return f"<Kubelet {self.node_name} pods={len(self._workers)}>"
