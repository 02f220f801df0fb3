"""One container of a pod: pull, start, supervise, restart with back-off.

Theory of operation
-------------------
A :class:`Container` holds the container's status fields (``state``,
``lastState``, ``restartCount``, IDs) and runs its loop as a task of the pod
worker:

    pull (faults: ErrImagePull <-> ImagePullBackOff, doubling back-off)
      -> environment (CreateContainerConfigError) -> start delay (faults)
      -> Created/Started -> running, ready
      -> exit: lastState.terminated, restart policy, CrashLoopBackOff back-off
      -> start again (restartCount + 1) ...

Every state change is written at once through the worker's ``sync``. While
an instance runs, its stdout/stderr are pumped into that instance's
:class:`~.logs.LogBuffer` (the last two instances are kept, for
``previous``) and to the attachers (:mod:`.attach`). When the main process
ends, the rest of its process group and its execs are killed, as runc does.
:meth:`Container.idle` is every wait (pull, back-off, start delay): it ends
early -- and the loop with it -- once the pod starts terminating.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
from typing import TYPE_CHECKING

import trio

from .attach import Attachment
from .backoff import Backoff, go_duration
from .env import EnvError, container_env, expand
from .logs import LogBuffer, select_log
from .podstatus import Obj, now_rfc3339
from .sandbox import ContainerProcess, ContainerSandbox, ContainerStartError, SandboxError

if TYPE_CHECKING:
    from .podworker import PodWorker


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


class Container:
    """One container of a pod: its status fields and its pull/run/restart loop."""

    def __init__(self, worker: PodWorker, spec: Obj) -> None:
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
        self.crash_backoff = Backoff(k.backoff_base, k.backoff_max)
        self.pull_backoff = Backoff(k.backoff_base, k.backoff_max)

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
            attachment.end()
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
            except EnvError as exc:
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
        env = container_env(self.spec, self.w.pod, self.w.downward_fields())
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
                attachment.end()
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
                    await attachment.deliver(channel, bytes(data))
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
        """The instance ``kubectl logs`` reads (:func:`~.logs.select_log`)."""
        return select_log(
            self.logs,
            pod=self.w.name,
            name=self.name,
            state=self.state,
            last_state=self.last_state,
            container_id=self.container_id,
            previous=previous,
        )
