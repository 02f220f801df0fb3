"""One pod's lifecycle on the node, from scheduling to removal.

Theory of operation
-------------------
The kubelet runs one :class:`PodWorker` task per pod. It schedules the pod
(``spec.nodeName``, ``PodScheduled``, event Scheduled), writes the first
status (Pending, hostIP, startTime, containers waiting in ContainerCreating),
creates the :class:`~.sandbox.PodSandbox` and runs one
:class:`~.container.Container` loop per container in a nursery. Every state
change goes through :meth:`PodWorker.sync`, which writes the status derived by
:mod:`.podstatus` if it changed. A 404 from the store means the pod is gone:
the worker stops quietly (:meth:`PodWorker.store_write`).

Termination: a graceful delete (:meth:`PodWorker.request_delete`) sends
SIGTERM to each running container (event Killing), SIGKILLs the containers'
process groups once the grace period is over, destroys the sandbox, writes
the terminal status and removes the pod (DELETED). A DELETED event (grace 0)
cancels the worker (:meth:`PodWorker.gone`), whose ``finally`` destroys the
sandbox. Eviction is a grace-0 termination that leaves the pod in phase
Failed, reason Evicted.

``spec.activeDeadlineSeconds``: as the kubelet does, counted from the pod's start
(``status.startTime``); a task re-reads the (possibly updated) spec at least once a
second. When the deadline passes, the event ``DeadlineExceeded`` is recorded, the
containers are stopped (SIGTERM, SIGKILL after ``terminationGracePeriodSeconds``) and
the pod ends in phase Failed, reason ``DeadlineExceeded``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from . import status as api_status
from .container import Container
from .env import downward_fields
from .podstatus import (
    DEADLINE_MESSAGE,
    EVICTED_MESSAGE,
    Conditions,
    Obj,
    merged,
    now_rfc3339,
    pod_phase,
    pod_status,
)
from .sandbox import PodSandbox

if TYPE_CHECKING:
    from .kubelet import Kubelet

# The kubelet's logger, as before the worker had a module of its own.
log = logging.getLogger("kuberun_trio.cluster.kubelet")


class PodWorker:
    """One pod's lifecycle, as a task in the kubelet's nursery."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.ns: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.restart_policy: str = pod["spec"].get("restartPolicy") or "Always"
        self.containers = [Container(self, c) for c in pod["spec"].get("containers") or ()]
        self.sandbox: PodSandbox | None = None
        self.scope = trio.CancelScope()
        self.conditions = Conditions()
        self.start_time: str | None = None
        self.terminal_phase: str | None = None
        self.terminating = False
        self.deleting = False
        self.evicted = False
        self.failure: tuple[str, str] | None = None
        """(reason, message) of a kubelet-made failure other than eviction."""
        self._started_at = 0.0
        self.removed = False
        self.finished = trio.Event()  # terminal status written
        self.done = trio.Event()  # task over
        self._delete_requested = trio.Event()
        self._kill_scope: trio.CancelScope | None = None
        self._loops_done = trio.Event()
        self._outer: trio.Nursery | None = None
        self._written: Obj | None = None

    @property
    def containers_stopped(self) -> trio.Event:
        """Set once every container loop has ended (the sandbox is about to go)."""
        return self._loops_done

    def container(self, name: str) -> Container | None:
        if not name and len(self.containers) == 1:
            return self.containers[0]
        return next((c for c in self.containers if c.name == name), None)

    # -- store access (a 404 means the pod is gone: stop quietly) --------------
    def store_write(self, fn: Callable[[], Obj]) -> Obj | None:
        if self.removed:
            return None
        try:
            return fn()
        except api_status.ApiStatusError as exc:
            if exc.code != 404:
                raise
            self.removed = True
            self.scope.cancel()
            return None

    def event(
        self, type_: str, reason: str, message: str, *, field_path: str | None = None
    ) -> None:
        k = self.kubelet
        self.store_write(
            lambda: k.store.record_event(
                self.ns, self.pod, type_, reason, message, host=k.node_name, field_path=field_path
            )
        )

    def sync(self) -> None:
        """Write the status derived from the in-memory state, if it changed."""
        st = pod_status(
            phase=self.phase(),
            containers=self.containers,
            conditions=self.conditions,
            sandbox_up=self.sandbox is not None and not self.sandbox.destroyed,
            has_sandbox=self.sandbox is not None,
            evicted=self.evicted,
            host_ip=self.kubelet.host_ip,
            start_time=self.start_time,
            failure=self.failure,
        )
        if st == self._written:
            return

        def mutate(pod: Obj) -> None:
            pod["status"] = merged(pod.get("status") or {}, st)

        pod = self.store_write(lambda: self.kubelet.store.update_pod(self.ns, self.name, mutate))
        if pod is not None:
            self.pod, self._written = pod, st

    # -- status --------------------------------------------------------------
    def phase(self, terminal: bool = False) -> str:
        """The kubelet's ``getPhase`` (the terminal phase once it is fixed)."""
        if self.terminal_phase is not None:
            return self.terminal_phase
        return pod_phase(self.containers, self.restart_policy, terminal)

    def downward_fields(self) -> dict[str, str]:
        """The downward API's simple ``fieldRef`` values for this pod."""
        k = self.kubelet
        return downward_fields(
            self.pod,
            ns=self.ns,
            name=self.name,
            uid=self.uid,
            node_name=k.node_name,
            host_ip=k.host_ip,
        )

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
        except Exception:
            log.exception("pod %s/%s: kubelet worker failed", self.ns, self.name)
            self.event("Warning", "FailedCreatePodSandBox", "the pod worker failed, see the log")
        finally:
            with trio.CancelScope(shield=True):
                for c in self.containers:
                    c.close()
                if self.sandbox is not None:
                    with trio.move_on_after(10):
                        await self.sandbox.destroy()
            self.finished.set()
            self.done.set()

    async def _run(self) -> None:
        k = self.kubelet
        node = self.pod["spec"].get("nodeName")
        if not node:
            self._schedule()
        self.start_time = now_rfc3339()
        self._started_at = trio.current_time()
        self.sync()
        if not self.terminating:
            self.sandbox = await PodSandbox.create(
                self.name, namespaces=k.use_namespaces, image_roots=k.image_roots,
                private_tmp=k.private_tmp,
            )
            self.sync()
            async with trio.open_nursery() as outer:
                self._outer = outer
                outer.start_soon(self._watch_deadline)
                async with trio.open_nursery() as inner:
                    for c in self.containers:
                        inner.start_soon(c.run)
                self._loops_done.set()
                outer.cancel_scope.cancel()  # the deadline watch (a killer has finished)
            self._outer = None
            await self.sandbox.destroy()
        failed = self.evicted or self.failure is not None
        self.terminal_phase = "Failed" if failed else self.phase(terminal=True)
        self.sync()
        self.finished.set()
        if not self.deleting:
            await self._delete_requested.wait()
        self.store_write(lambda: k.store.remove_pod(self.ns, self.name))
        self.removed = True

    def _schedule(self) -> None:
        k = self.kubelet

        def bind(pod: Obj) -> None:
            pod["spec"]["nodeName"] = k.node_name

        pod = self.store_write(
            lambda: k.store.update_pod(
                self.ns, self.name, bind, manager="kube-scheduler", subresource="binding"
            )
        )
        if pod is not None:
            self.pod = pod
        self.conditions.set("PodScheduled", True)
        self.sync()
        self.store_write(
            lambda: k.store.record_event(
                self.ns,
                self.pod,
                "Normal",
                "Scheduled",
                f"Successfully assigned {self.ns}/{self.name} to {k.node_name}",
                component="default-scheduler",
            )
        )

    def request_delete(self, grace: float) -> None:
        """The pod got (or shortened) a deletionTimestamp."""
        self.deleting = True
        self._delete_requested.set()
        self.terminate(grace)

    def terminate(self, grace: float) -> None:
        """Stop every container: SIGTERM now, SIGKILL after ``grace`` seconds."""
        deadline = trio.current_time() + max(grace, 0)
        if self._kill_scope is not None:
            self._kill_scope.deadline = min(self._kill_scope.deadline, deadline)
            return
        self.terminating = True
        self._kill_scope = trio.CancelScope(deadline=deadline)
        for c in self.containers:
            c.stop(grace)
        if self._outer is not None:
            self._outer.start_soon(self._killer, self._kill_scope)

    async def _killer(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._loops_done.wait()
        if not self._loops_done.is_set():
            for c in self.containers:
                if c.process is not None:
                    c.process.kill_group()

    async def _watch_deadline(self) -> None:
        """End the pod once ``spec.activeDeadlineSeconds`` since its start have passed."""
        while not self.terminating:
            seconds = self.pod["spec"].get("activeDeadlineSeconds")
            now = trio.current_time()
            if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0:
                left = self._started_at + seconds - now
                if left <= 0:
                    self.deadline_exceeded()
                    return
                await trio.sleep(min(left, 1.0))
            else:
                await trio.sleep(1.0)

    def deadline_exceeded(self) -> None:
        if self.terminal_phase is not None or self.terminating:
            return
        self.failure = ("DeadlineExceeded", DEADLINE_MESSAGE)
        self.terminal_phase = "Failed"  # at once, as the kubelet reports it
        self.event("Warning", "DeadlineExceeded", DEADLINE_MESSAGE)
        grace = self.pod["spec"].get("terminationGracePeriodSeconds")
        self.terminate(float(grace) if isinstance(grace, int | float) else 30.0)
        self.sync()

    def evict(self) -> None:
        if self.terminal_phase is not None or self.evicted:
            return
        self.evicted = True
        self.event("Warning", "Evicted", EVICTED_MESSAGE)
        self.terminate(0)

    def gone(self) -> None:
        """The pod left the store (DELETED): kill everything, write nothing."""
        self.removed = True
        self.scope.cancel()
