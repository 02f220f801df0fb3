"""The kubelet: drives each pod from Pending to its end, with real processes.

Theory of operation
-------------------
:meth:`Kubelet.run` consumes :meth:`Store.subscribe` and keeps one
:class:`_PodWorker` task per pod (keyed by namespace/name, checked by uid) in
its nursery. Our own status writes come back as MODIFIED events; only a new
``deletionTimestamp`` (or a shorter grace period) matters in them.

A worker schedules the pod (``spec.nodeName``, ``PodScheduled``, event
Scheduled), writes the first status (Pending, hostIP, startTime, containers
waiting in ContainerCreating), creates the :class:`~.sandbox.PodSandbox` and runs
one :class:`_Container` loop per container:

    pull (faults: ErrImagePull <-> ImagePullBackOff, doubling back-off)
      -> start delay (faults) -> Created/Started -> running, ready
      -> exit: lastState.terminated, restart policy, CrashLoopBackOff back-off
      -> start again (restartCount + 1) ...

Every state change is written synchronously with :meth:`_PodWorker.sync`, which
derives phase and conditions the way the kubelet's ``getPhase`` and
``status/generate.go`` do. Back-off follows client-go's ``flowcontrol.Backoff``:
the first restart is immediate, then base, 2*base, ... up to the cap, reset
after a clean run of twice the cap.

Termination: a graceful delete sends SIGTERM to each running container (event
Killing), SIGKILLs the container's process group once the grace period is over,
destroys the sandbox, writes the terminal status and removes the pod
(DELETED). A DELETED event (grace 0) cancels the worker, whose ``finally``
destroys the sandbox. Eviction is a grace-0 termination that leaves the pod in
phase Failed, reason Evicted. When a container's main process ends, the rest
of its process group and its execs are killed, as runc does.

Container output is pumped into per-instance :class:`LogBuffer`\\ s (bounded,
oldest bytes dropped) for ``logs``, and broadcast to attachers.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import secrets
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import attrs
import trio

from ..errors import ClusterError
from . import status as api_status
from .faults import Faults
from .sandbox import (
    ContainerProcess,
    ContainerSandbox,
    ContainerStartError,
    PodSandbox,
    SandboxError,
)

log = logging.getLogger(__name__)

Obj = dict[str, Any]
_CONDITION_ORDER = (
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
    "DisruptionTarget",
)
EVICTED_MESSAGE = "The node was low on resource: memory. "


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


# -- small values and helpers ---------------------------------------------------


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_duration(seconds: float) -> str:
    """``time.Duration.String()``: ``10s``, ``1m20s``, ``5m0s``, ``200ms``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        for unit, scale in (("ms", 1e3), ("µs", 1e6), ("ns", 1e9)):
            if seconds * scale >= 1:
                return f"{round(seconds * scale, 3):g}{unit}"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 9):g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = text.find(")", i + 2) if text[i + 1] == "(" else -1
            if end != -1:
                name = text[i + 2 : end]
                out.append(env[name] if name in env else text[i : end + 1])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def normalize_image(image: str) -> tuple[str, str]:
    """``busybox`` -> (``docker.io/library/busybox:latest``, repository without tag)."""
    name, _, digest = image.partition("@")
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name}" if rest else f"docker.io/library/{name}"
    repo = name
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo = name[: name.rindex(":")]
    elif not digest:
        name += ":latest"
    return (f"{repo}@{digest}" if digest else name), repo


@attrs.define
class _Backoff:
    """client-go ``flowcontrol.Backoff`` for one key."""

    base: float
    cap: float
    current: float = 0.0
    last: float | None = None

    def _expired(self, at: float) -> bool:
        return self.last is None or at - self.last > 2 * self.cap

    def remaining(self, event_time: float) -> float:
        """How long to wait after an event at ``event_time`` (0: not in back-off)."""
        if self._expired(event_time):
            return 0.0
        return max(0.0, self.current - (trio.current_time() - event_time))

    def next(self, event_time: float) -> None:
        self.current = self.base if self._expired(event_time) else min(self.current * 2, self.cap)
        self.last = event_time


class LogBuffer:
    """The output of one container instance: bounded (oldest bytes go), followable."""

    def __init__(self, limit: int = 10 * 1024 * 1024) -> None:
        self._chunks: deque[bytes] = deque()
        self._start = 0
        self._end = 0
        self._limit = limit
        self._changed = trio.Event()
        self.closed = False

    def append(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._end += len(data)
        while self._end - self._start > self._limit and len(self._chunks) > 1:
            self._start += len(self._chunks.popleft())
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _since(self, pos: int) -> bytes:
        offset, parts = self._start, []
        for chunk in self._chunks:
            if offset + len(chunk) > pos:
                parts.append(chunk[max(0, pos - offset) :])
            offset += len(chunk)
        return b"".join(parts)

    def read(self, *, follow: bool) -> _LogReader:
        """Everything kept so far; with ``follow``, then new output until the instance ends."""
        return _LogReader(self, follow)


class _LogReader:
    """An async iterator over a :class:`LogBuffer` (a plain class: safe to abandon)."""

    def __init__(self, buffer: LogBuffer, follow: bool) -> None:
        self._buffer, self._follow = buffer, follow
        self._pos = buffer._start

    def __aiter__(self) -> _LogReader:
        return self

    async def __anext__(self) -> bytes:
        buffer = self._buffer
        while True:
            self._pos = max(self._pos, buffer._start)
            data = buffer._since(self._pos)
            if data:
                self._pos += len(data)
                await trio.lowlevel.checkpoint()
                return data
            if not self._follow or buffer.closed:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await buffer._changed.wait()


# -- attach ---------------------------------------------------------------------


class _AttachStdin(trio.abc.SendStream):
    def __init__(self, target: trio.abc.SendStream, lock: trio.Lock, once: bool) -> None:
        self._target, self._lock, self._once = target, lock, once
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("detached")
        async with self._lock:
            await self._target.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._target.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._closed = True
        if self._once:  # stdinOnce: the first attacher's EOF is the container's
            await self._target.aclose()
        else:
            await trio.lowlevel.checkpoint()


class Attachment:
    """One attacher of a container's main process."""

    def __init__(self, container: _Container, process: ContainerProcess) -> None:
        self._container, self._process = container, process
        self._send, self.output = trio.open_memory_channel[tuple[int, bytes]](16)
        """``(1 | 2, data)`` from now on; ends when the main process exits."""
        self.stdin: trio.abc.SendStream | None = None
        if process.stdin is not None:
            once = bool(container.spec.get("stdinOnce"))
            self.stdin = _AttachStdin(process.stdin, container.stdin_lock, once)

    def resize(self, width: int, height: int) -> None:
        self._process.resize(width, height)

    async def aclose(self) -> None:
        self._container.attachments.discard(self)
        self.output.close()
        if self.stdin is not None:
            await self.stdin.aclose()
        await trio.lowlevel.checkpoint()


@attrs.frozen
class RunningContainer:
    """A running container, for exec and attach."""

    sandbox: ContainerSandbox
    """Exec runs here (the container's root; execs end when the container ends)."""
    env: dict[str, str]
    """The container's environment (HOSTNAME and PATH included)."""
    working_dir: str | None
    name: str
    process: ContainerProcess
    _container: _Container

    async def attach(self) -> Attachment:
        attachment = Attachment(self._container, self.process)
        self._container.attachments.add(attachment)
        await trio.lowlevel.checkpoint()
        return attachment


# -- one container ---------------------------------------------------------------


class _EnvError(Exception):
    pass


class _Container:
    """One container of a pod: its status fields and its pull/run/restart loop."""

    def __init__(self, worker: _PodWorker, spec: Obj) -> None:
        self.w, self.spec = worker, spec
        self.name: str = spec["name"]
        self.image: str = spec.get("image", "")
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.restart_count = -1  # incremented per started instance
        self.container_id = ""
        self.image_ref, self.image_id = self.image, ""
        self.process: ContainerProcess | None = None
        self.view: ContainerSandbox | None = None
        self.env: dict[str, str] = {}
        self.logs: dict[str, LogBuffer] = {}  # containerID -> output (last two instances)
        self.attachments: set[Attachment] = set()
        self.stdin_lock = trio.Lock()
        self.exited = trio.Event()
        self.idle_scope: trio.CancelScope | None = None
        self.finished_at = 0.0  # trio time of the last instance's exit
        k = worker.kubelet
        self.crash_backoff = _Backoff(k.backoff_base, k.backoff_max)
        self.pull_backoff = _Backoff(k.backoff_base, k.backoff_max)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def status(self) -> Obj:
        st: Obj = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": "running" in self.state,
            "restartCount": max(self.restart_count, 0),
            "image": self.image_ref,
            "imageID": self.image_id,
        }
        if self.container_id:
            st["containerID"] = self.container_id
        st["started"] = "running" in self.state
        return st

    def event(self, type_: str, reason: str, message: str) -> None:
        self.w.event(type_, reason, message, field_path=f"spec.containers{{{self.name}}}")

    async def idle(self, seconds: float) -> bool:
        """Sleep (pull/back-off/delay); False if the pod started terminating meanwhile."""
        with trio.CancelScope() as self.idle_scope:
            if not self.w.terminating:
                await trio.sleep(seconds)
        self.idle_scope = None
        return not self.w.terminating

    def stop(self, grace: float) -> None:
        """Termination began: end any wait; SIGTERM the main process (SIGKILL if no grace)."""
        if self.idle_scope is not None:
            self.idle_scope.cancel()
        if self.process is not None and self.process.running:
            self.event("Normal", "Killing", f"Stopping container {self.name}")
            if grace > 0:
                self.process.kill(signal.SIGTERM)
            else:
                self.process.kill_group()

    def close(self) -> None:
        for buffer in self.logs.values():
            buffer.close()
        for attachment in list(self.attachments):
            attachment._send.close()
        if self.view is not None:
            self.view.close()
        self.exited.set()

    async def run(self) -> None:
        w = self.w
        while not w.terminating:
            if not await self._pull():
                return
            try:
                env = self._environment()
            except _EnvError as exc:
                self._waiting("CreateContainerConfigError", str(exc))
                self.event("Warning", "Failed", f"Error: {exc}")
                if await self.idle(self.crash_backoff.base):
                    continue
                return
            delay = w.kubelet.faults.start_delay(self.image)
            if delay and not await self.idle(delay):
                return
            code = await self._start_and_wait(env)
            if w.terminating:
                return
            if code is None:  # CreateContainerError: retried after a pause
                if await self.idle(self.crash_backoff.base):
                    continue
                return
            policy = w.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            if not await self._crash_backoff():
                return

    async def _pull(self) -> bool:
        k, image = self.w.kubelet, self.image
        policy = self.spec.get("imagePullPolicy") or (
            "Always" if ":" not in image.rsplit("/", 1)[-1] else "IfNotPresent"
        )
        while True:
            error = k.faults.image_pull_error(image)
            if error is None and (
                policy == "Never" or (policy == "IfNotPresent" and image in k.images)
            ):
                self.event(
                    "Normal", "Pulled", f'Container image "{image}" already present on machine'
                )
                return True
            if policy == "Never":
                message = f'Container image "{image}" is not present with pull policy of Never'
                self._waiting("ErrImageNeverPull", message)
                self.event("Warning", "ErrImageNeverPull", message)
                if not await self.idle(self.pull_backoff.base):
                    return False
                continue
            self.event("Normal", "Pulling", f'Pulling image "{image}"')
            began = trio.current_time()
            await trio.lowlevel.checkpoint()
            if error is None:
                k.images.add(image)
                took = go_duration(trio.current_time() - began)
                self.event(
                    "Normal",
                    "Pulled",
                    f'Successfully pulled image "{image}" in {took} ({took} including waiting). '
                    "Image size: 0 bytes.",
                )
                return True
            self.pull_backoff.next(trio.current_time())
            self._waiting("ErrImagePull", error)
            self.event("Warning", "Failed", f'Failed to pull image "{image}": {error}')
            self.event("Warning", "Failed", "Error: ErrImagePull")
            total = self.pull_backoff.current
            if not await self.idle(min(1.0, total / 4)):
                return False
            message = f'Back-off pulling image "{image}"'
            self._waiting("ImagePullBackOff", message)
            self.event("Normal", "BackOff", message)
            self.event("Warning", "Failed", "Error: ImagePullBackOff")
            if not await self.idle(self.pull_backoff.remaining(self.pull_backoff.last or 0)):
                return False

    def _waiting(self, reason: str, message: str) -> None:
        if "terminated" in self.state:
            self.last_state = {"terminated": self.state["terminated"]}
        self.state = {"waiting": {"reason": reason, "message": message}}
        self.w.sync()

    def _environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in self.spec.get("env") or ():
            if "valueFrom" in item:
                env[item["name"]] = self.w.value_from(item["valueFrom"])
            else:
                env[item["name"]] = expand(str(item.get("value", "")), env)
        for source in self.spec.get("envFrom") or ():
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            if not ref.get("optional"):
                kind = "configmap" if "configMapRef" in source else "secret"
                raise _EnvError(f'{kind} "{ref.get("name", "")}" not found')
        assert self.w.sandbox is not None
        return self.w.sandbox.process_env(env)

    async def _start_and_wait(self, env: dict[str, str]) -> int | None:
        """Start one instance and supervise it; its exit code (None: not created)."""
        w = self.w
        assert w.sandbox is not None
        spec = dict(self.spec)
        for key in ("command", "args"):
            if spec.get(key):
                spec[key] = [expand(str(a), env) for a in spec[key]]
        cid = secrets.token_hex(32)
        try:
            process = await w.sandbox.start_container(spec, env)
        except ContainerStartError as exc:
            if exc.reason != "StartError":
                self._waiting(exc.reason, exc.message)
                self.event("Warning", "Failed", f"Error: {exc.message}")
                return None
            self._new_instance(cid)
            self.event("Normal", "Created", f"Created container: {self.name}")
            self.event("Warning", "Failed", f"Error: {exc.message}")
            self.finished_at = trio.current_time()
            self._terminated(exc.exit_code, "StartError", "1970-01-01T00:00:00Z", exc.message)
            return exc.exit_code
        except SandboxError:
            return None  # destroyed under us: the pod is going away
        self._new_instance(cid)
        self.env, self.process = env, process
        self.view = ContainerSandbox(w.sandbox, w.sandbox.root_for(self.image))
        started_at = now_rfc3339()
        self.state = {"running": {"startedAt": started_at}}
        self.event("Normal", "Created", f"Created container: {self.name}")
        self.event("Normal", "Started", f"Started container {self.name}")
        w.sync()
        if w.terminating:
            process.kill(signal.SIGTERM)
        buffer = self.logs[self.container_id]
        try:
            async with trio.open_nursery() as pumps:
                for channel, stream in ((1, process.stdout), (2, process.stderr)):
                    if stream is not None:
                        pumps.start_soon(self._pump, stream, channel, buffer)
                code = await process.wait()
                process.kill_group()  # like runc: the rest of the container goes too
                self.view.close()
                pumps.cancel_scope.deadline = trio.current_time() + 1.0
        finally:
            self.process = None
            buffer.close()
            for attachment in list(self.attachments):
                attachment._send.close()
            self.attachments.clear()
            self.exited.set()
            with trio.CancelScope(shield=True):
                await process.aclose()
        self.finished_at = trio.current_time()
        self._terminated(code, "Completed" if code == 0 else "Error", started_at, None)
        return code

    def _new_instance(self, cid: str) -> None:
        if "terminated" in self.state:
            self.last_state = {"terminated": self.state["terminated"]}
        self.restart_count += 1
        self.container_id = f"containerd://{cid}"
        self.image_ref, repo = normalize_image(self.image)
        self.image_id = f"{repo}@sha256:{hashlib.sha256(self.image.encode()).hexdigest()}"
        self.exited = trio.Event()
        self.logs = {key: self.logs[key] for key in list(self.logs)[-1:]}
        self.logs[self.container_id] = LogBuffer(self.w.kubelet.log_limit)

    def _terminated(self, code: int, reason: str, started: str, message: str | None) -> None:
        term: Obj = {"exitCode": code, "reason": reason}
        if message:
            term["message"] = message
        term.update(startedAt=started, finishedAt=now_rfc3339(), containerID=self.container_id)
        self.state = {"terminated": term}
        self.w.sync()

    async def _pump(self, stream: trio.abc.ReceiveStream, channel: int, buffer: LogBuffer) -> None:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buffer.append(bytes(data))
            for attachment in list(self.attachments):
                try:
                    await attachment._send.send((channel, bytes(data)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.attachments.discard(attachment)

    async def _crash_backoff(self) -> bool:
        finished = self.finished_at
        wait = self.crash_backoff.remaining(finished)
        if wait > 0:
            w = self.w
            pod = f"{w.name}_{w.ns}({w.uid})"
            self._waiting(
                "CrashLoopBackOff",
                f"back-off {go_duration(self.crash_backoff.current)} restarting failed "
                f"container={self.name} pod={pod}",
            )
            self.event(
                "Warning",
                "BackOff",
                f"Back-off restarting failed container {self.name} in pod {pod}",
            )
            if not await self.idle(wait):
                return False
        self.crash_backoff.next(finished)
        return True

    def log_buffer(self, previous: bool) -> LogBuffer:
        """The kubelet's ``validateContainerLogStatus`` choice of instance."""
        pod, name = self.w.name, self.name
        last = self.last_state.get("terminated") or {}
        if previous:
            if not last.get("containerID") or last["containerID"] not in self.logs:
                raise api_status.bad_request(
                    f'previous terminated container "{name}" in pod "{pod}" not found'
                )
            return self.logs[last["containerID"]]
        if "running" in self.state or "terminated" in self.state:
            return self.logs[self.container_id]
        if last.get("containerID") in self.logs:
            return self.logs[last["containerID"]]
        reason = self.state.get("waiting", {}).get("reason", "ContainerCreating")
        reason = {
            "ErrImagePull": "image can't be pulled",
            "ImagePullBackOff": "trying and failing to pull image",
        }.get(reason, reason)
        raise api_status.bad_request(
            f'container "{name}" in pod "{pod}" is waiting to start: {reason}'
        )


# -- one pod ---------------------------------------------------------------------


class _PodWorker:
    """One pod's lifecycle, as a task in the kubelet's nursery."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.ns: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid", "")
        self.restart_policy: str = pod["spec"].get("restartPolicy") or "Always"
        self.containers = [_Container(self, c) for c in pod["spec"].get("containers") or ()]
        self.sandbox: PodSandbox | None = None
        self.scope = trio.CancelScope()
        self.conditions: dict[str, Obj] = {}
        self.start_time: str | None = None
        self.terminal_phase: str | None = None
        self.terminating = False
        self.deleting = False
        self.evicted = False
        self.removed = False
        self.finished = trio.Event()  # terminal status written
        self.done = trio.Event()  # task over
        self._delete_requested = trio.Event()
        self._kill_scope: trio.CancelScope | None = None
        self._loops_done = trio.Event()
        self._outer: trio.Nursery | None = None
        self._written: Obj | None = None

    def container(self, name: str) -> _Container | None:
        if not name and len(self.containers) == 1:
            return self.containers[0]
        return next((c for c in self.containers if c.name == name), None)

    # -- store access (a 404 means the pod is gone: stop quietly) --------------
    def _store_write(self, fn: Callable[[], Obj]) -> Obj | None:
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
        self._store_write(
            lambda: k.store.record_event(
                self.ns, self.pod, type_, reason, message, host=k.node_name, field_path=field_path
            )
        )

    def sync(self) -> None:
        """Write the status derived from the in-memory state, if it changed."""
        st = self._status()
        if st == self._written:
            return

        def mutate(pod: Obj) -> None:
            old = pod.get("status") or {}
            pod["status"] = {**{k: v for k, v in old.items() if k not in _MANAGED}, **st}

        pod = self._store_write(lambda: self.kubelet.store.update_pod(self.ns, self.name, mutate))
        if pod is not None:
            self.pod, self._written = pod, st

    # -- status --------------------------------------------------------------
    def phase(self, terminal: bool = False) -> str:
        """The kubelet's ``getPhase``."""
        if self.terminal_phase is not None:
            return self.terminal_phase
        running = waiting = stopped = succeeded = 0
        for c in self.containers:
            if "running" in c.state:
                running += 1
            elif "terminated" in c.state:
                stopped += 1
                succeeded += c.state["terminated"]["exitCode"] == 0
            elif "terminated" in c.last_state:
                stopped += 1
            else:
                waiting += 1
        if terminal:
            return "Succeeded" if stopped == succeeded == len(self.containers) else "Failed"
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if self.restart_policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        return "Failed" if self.restart_policy == "Never" else "Running"

    def _condition(self, type_: str, ok: bool, reason: str = "", message: str = "") -> None:
        value = "True" if ok else "False"
        old = self.conditions.get(type_)
        cond: Obj = {"type": type_, "status": value, "lastProbeTime": None}
        same = old is not None and old["status"] == value
        cond["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now_rfc3339()
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self.conditions[type_] = cond

    def _status(self) -> Obj:
        phase = self.phase()
        sandbox_up = self.sandbox is not None and not self.sandbox.destroyed
        self._condition("PodReadyToStartContainers", sandbox_up)
        self._condition("Initialized", True)
        unready = [c.name for c in self.containers if "running" not in c.state]
        for type_ in ("Ready", "ContainersReady"):
            if phase in ("Succeeded", "Failed"):
                self._condition(
                    type_, False, "PodCompleted" if phase == "Succeeded" else "PodFailed"
                )
            elif unready:
                message = f"containers with unready status: [{' '.join(unready)}]"
                self._condition(type_, False, "ContainersNotReady", message)
            else:
                self._condition(type_, True)
        if self.evicted:
            self._condition("DisruptionTarget", True, "TerminationByKubelet", EVICTED_MESSAGE)
        st: Obj = {"phase": phase}
        st["conditions"] = [self.conditions[t] for t in _CONDITION_ORDER if t in self.conditions]
        if self.evicted:
            st.update(message=EVICTED_MESSAGE, reason="Evicted")
        ip = self.kubelet.host_ip
        st.update(hostIP=ip, hostIPs=[{"ip": ip}])
        if self.sandbox is not None:
            st.update(podIP=ip, podIPs=[{"ip": ip}])
        st["startTime"] = self.start_time
        st["containerStatuses"] = [c.status() for c in self.containers]
        return st

    def value_from(self, source: Obj) -> str:
        """``env[].valueFrom``: the downward API; secrets and config maps do not exist here."""
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            meta, ip = self.pod["metadata"], self.kubelet.host_ip
            simple: dict[str, str] = {
                "metadata.name": self.name,
                "metadata.namespace": self.ns,
                "metadata.uid": self.uid,
                "spec.nodeName": self.kubelet.node_name,
                "spec.serviceAccountName": str(self.pod["spec"].get("serviceAccountName", "")),
                "status.podIP": ip,
                "status.podIPs": ip,
                "status.hostIP": ip,
                "status.hostIPs": ip,
            }
            if path in simple:
                return simple[path]
            for prefix, key in (
                ("metadata.labels['", "labels"),
                ("metadata.annotations['", "annotations"),
            ):
                if path.startswith(prefix) and path.endswith("']"):
                    return str((meta.get(key) or {}).get(path[len(prefix) : -2], ""))
            raise _EnvError(f"unsupported fieldPath: {path}")
        for ref, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
            if ref in source:
                if source[ref].get("optional"):
                    return ""
                raise _EnvError(f'{kind} "{source[ref].get("name", "")}" not found')
        return ""

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
        self.sync()
        if not self.terminating:
            self.sandbox = await PodSandbox.create(
                self.name, namespaces=k.use_namespaces, image_roots=k.image_roots
            )
            self.sync()
            async with trio.open_nursery() as outer:
                self._outer = outer
                async with trio.open_nursery() as inner:
                    for c in self.containers:
                        inner.start_soon(c.run)
                self._loops_done.set()
            self._outer = None
            await self.sandbox.destroy()
        self.terminal_phase = "Failed" if self.evicted else self.phase(terminal=True)
        self.sync()
        self.finished.set()
        if not self.deleting:
            await self._delete_requested.wait()
        self._store_write(lambda: k.store.remove_pod(self.ns, self.name))
        self.removed = True

    def _schedule(self) -> None:
        k = self.kubelet

        def bind(pod: Obj) -> None:
            pod["spec"]["nodeName"] = k.node_name

        pod = self._store_write(
            lambda: k.store.update_pod(
                self.ns, self.name, bind, manager="kube-scheduler", subresource="binding"
            )
        )
        if pod is not None:
            self.pod = pod
        self._condition("PodScheduled", True)
        self.sync()
        self._store_write(
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


_MANAGED = frozenset(
    (
        "phase",
        "conditions",
        "message",
        "reason",
        "hostIP",
        "hostIPs",
        "podIP",
        "podIPs",
        "startTime",
        "containerStatuses",
    )
)


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
    ) -> None:
        self.store, self.faults, self.node_name = store, faults, node_name
        self.image_roots = dict(image_roots or {})
        self.backoff_base, self.backoff_max = backoff_base, max(backoff_max, backoff_base)
        self.use_namespaces, self.host_ip, self.log_limit = use_namespaces, host_ip, log_limit
        self.images: set[str] = set()
        """Images pulled so far (``IfNotPresent`` skips the pull for these)."""
        self._workers: dict[tuple[str, str], _PodWorker] = {}
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
            worker = self._workers[key] = _PodWorker(self, pod)
            self._nursery.start_soon(worker.run)
            return
        worker.pod = pod
        if meta.get("deletionTimestamp"):
            if worker.done.is_set():  # its task ended early (error): just finish the delete
                worker._store_write(lambda: self.store.remove_pod(*key))
            worker.request_delete(float(meta.get("deletionGracePeriodSeconds") or 0))

    def _worker(self, ns: str, pod: str) -> _PodWorker:
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
