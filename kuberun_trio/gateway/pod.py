"""Where the pod is created, waited for and deleted: the connection's pod lifetime.

Theory of operation
-------------------
:meth:`ConnectionHandler.connected` is the structured form: an async context
manager that creates the connection's pod, waits until it is Running and
Ready within ``timeouts.podStart``, yields a :class:`ConnectedPod`, and deletes
the pod on the way out -- in a ``finally:`` under
``trio.move_on_after(timeouts.podStop, shield=True)``, so the cancellation that
ends a connection cannot skip the delete and a dead API server cannot hang it.
Callers keep every exec stream *inside* the block, so all of them are closed
before the DELETE is sent. A delete that fails or times out is handed to the
gateway's :class:`~kuberun_trio.gateway.reaper.Reaper` (when there is one),
which retries it until the pod is gone.

A pod that fails to start is deleted before :class:`PodStartError` reaches the
caller; the error carries the cluster's reason (waiting reason and message,
or the newest Warning event). If the create request itself is interrupted
(the client went away mid-creation) the pod may exist with a server-chosen
name, so the clean-up then deletes by the connection-id label instead.

Given a :class:`~kuberun_trio.gateway.podwatch.PodWatchHub` (as the server
does), the handler waits on the gateway's one shared pod watch; without one
(library use) it follows its pod with watches of its own.

The mode comes from the handler's own ``config`` (``kubernetes.pod.mode``): in
``session`` mode the connection uses :meth:`ConnectionHandler.session_pod` once per
session channel (same lifecycle, a pod each); in ``persistent`` mode
:meth:`ConnectionHandler.connected` gets or creates the user's pod, claims it and
releases the claim on the way out, leaving the pod (:mod:`.persistent`).

No cancel scope or nursery spans the ``yield``, so the unstructured form --
:meth:`on_handshake_success` / :meth:`on_disconnect`, mirroring ContainerSSH's
handler -- can drive the same context manager from different tasks.

Every lifecycle step is one log line on the handler's logger with ``event``
(``pod-created``, ``pod-running``, ``pod-deleted``, ``pod-delete-failed``),
``connection_id``, ``pod`` and, where it applies, ``duration_ms``. A
``LoggerAdapter`` passed in keeps its own ``extra`` fields (merged, not replaced).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from ..aio.kube import KubeClient
from ..core.auth import AuthResult
from ..core.config import KubernetesConfig
from ..core.podstate import PodLoss, last_warning
from ..core.podtemplate import (
    LABEL_CONNECTION_ID,
    LABEL_SESSION_ID,
    build_pod,
    sanitize_label_value,
)
from ..errors import KuberunError, PodStartError
from ..observe.metrics import GatewayMetrics, unobserved
from . import persistent
from .podwatch import PodWatchHub
from .reaper import Reaper


@attrs.frozen
class ConnectedPod:
    """The pod serving one SSH connection."""

    namespace: str
    name: str
    container: str
    """The console container: where session channels exec."""
    pod: dict[str, Any] = attrs.field(repr=False)
    """The pod as it was when it became Ready."""


class ConnectionHandler:
    """Creates and deletes the pod of one SSH connection (one handler per connection)."""

    def __init__(self, config: KubernetesConfig, connection_id: str, client_address: str,
                 logger: logging.Logger | logging.LoggerAdapter[logging.Logger], *,
                 kube: KubeClient, instance: str | None = None,
                 hub: PodWatchHub | None = None, reaper: Reaper | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.connection_id = connection_id
        self.client_address = client_address
        self.log = logger
        self.kube = kube
        self.instance = instance if instance is not None else socket.gethostname()
        """The gateway instance label (default: the host name)."""
        self.hub = hub
        """The gateway's shared pod watch; None: this handler watches its pod itself."""
        self.reaper = reaper
        """The gateway's reaper: a delete that fails or times out is retried there."""
        self._stack: contextlib.AsyncExitStack | None = None
        self.metrics = metrics or unobserved()

    def _emit(self, level: int, event: str, message: str, *args: Any, **fields: Any) -> None:
        extra = {"connection_id": self.connection_id, "event": event, **fields}
        if isinstance(self.log, logging.LoggerAdapter):
            extra = {**(self.log.extra or {}), **extra}
            self.log.logger.log(level, message, *args, extra=extra)
        else:
            self.log.log(level, message, *args, extra=extra)

    def __repr__(self) -> str:
        return f"<ConnectionHandler {self.connection_id} from {self.client_address}>"

    @contextlib.asynccontextmanager
    async def connected(self, username: str,
                        auth: AuthResult | None = None) -> AsyncIterator[ConnectedPod]:
        """Create the pod, wait until Ready, yield it, delete it. Trio-flavoured.

        In ``persistent`` mode: get (or create) the user's pod, claim it, wait until Ready,
        yield it, release the claim -- the pod stays. In ``session`` mode the connection
        has no pod of its own: use :meth:`session_pod` for each session channel."""
        if self.config.pod.mode == "persistent":
            async with self._persistent(username, auth or AuthResult()) as pod:
                yield pod
        else:
            async with self._fresh(username, auth or AuthResult()) as pod:
                yield pod

    def session_pod(self, username: str, auth: AuthResult | None,
                    session_id: str) -> contextlib.AbstractAsyncContextManager[ConnectedPod]:
        """``session`` mode: the pod of one session channel (created, yielded, deleted)."""
        return self._fresh(username, auth or AuthResult(), session_id)

    @contextlib.asynccontextmanager
    async def _fresh(self, username: str, auth: AuthResult,
                     session_id: str | None = None) -> AsyncIterator[ConnectedPod]:
        body = build_pod(self.config, connection_id=self.connection_id, username=username,
                         client_address=self.client_address, instance=self.instance,
                         auth_metadata=auth.metadata, auth_env=auth.environment,
                         session_id=session_id)
        more = {"session_id": session_id} if session_id is not None else {}
        namespace = str(body["metadata"].get("namespace") or "default")
        console = body["spec"]["containers"][self.config.pod.console_container_number]["name"]
        name: str | None = None
        started = time.monotonic()
        self.metrics.backend_request()
        try:
            created = await self.kube.create_pod(namespace, body)
            name = str(created["metadata"]["name"])
            self._emit(logging.INFO, "pod-created", "pod %s/%s created", namespace, name,
                       pod=name, duration_ms=_ms_since(started), **more)
            try:
                with trio.fail_after(self.config.timeouts.pod_start):
                    if self.hub is not None:
                        ready = await self.hub.wait_ready(namespace, name)
                    else:
                        ready = await self.kube.wait_for_pod(
                            namespace, name,
                            resource_version=created["metadata"].get("resourceVersion"))
            except trio.TooSlowError as exc:
                raise PodStartError(
                    name, "Timeout",
                    f"not Running and Ready within {self.config.timeouts.pod_start:g}s") from exc
            except PodStartError as exc:
                raise await self._explained(namespace, name, exc) from exc
            took = _ms_since(started)
            self.metrics.pod_started(time.monotonic() - started)
            self._emit(logging.INFO, "pod-running", "pod %s running and ready after %d ms",
                       name, took, pod=name, duration_ms=took, **more)
            yield ConnectedPod(namespace, name, console, ready)
        finally:
            await self._delete(namespace, name, session_id)

    @contextlib.asynccontextmanager
    async def _persistent(self, username: str, auth: AuthResult) -> AsyncIterator[ConnectedPod]:
        body = build_pod(self.config, connection_id=self.connection_id, username=username,
                         client_address=self.client_address, instance=self.instance,
                         auth_metadata=auth.metadata, auth_env=auth.environment)
        namespace = str(body["metadata"].get("namespace") or "default")
        name = str(body["metadata"]["name"])
        console = body["spec"]["containers"][self.config.pod.console_container_number]["name"]
        started = time.monotonic()
        self.metrics.backend_request()
        try:
            try:
                with trio.fail_after(self.config.timeouts.pod_start):
                    holder, lease = persistent.identity(self.config.pod.metadata)
                    await persistent.claim(
                        self.kube, body, connection_id=self.connection_id,
                        holder=holder or f"{self.instance}_{self.connection_id}", lease=lease,
                        create_missing=self.config.pod.create_missing_pods,
                        idle_timeout=self.config.pod.persistent_idle_timeout, emit=self._emit)
                    ready = await self.kube.wait_for_pod(namespace, name, resource_version=None)
            except trio.TooSlowError as exc:
                raise PodStartError(
                    name, "Timeout",
                    f"not Running and Ready within {self.config.timeouts.pod_start:g}s") from exc
            except PodStartError as exc:
                if exc.reason == "PodMissing":
                    raise
                raise await self._explained(namespace, name, exc) from exc
            took = _ms_since(started)
            self.metrics.pod_started(time.monotonic() - started)
            self._emit(logging.INFO, "pod-running", "pod %s running and ready after %d ms",
                       name, took, pod=name, duration_ms=took)
            yield ConnectedPod(namespace, name, console, ready)
        finally:
            await self._release(namespace, name)

    async def _release(self, namespace: str, name: str) -> None:
        """Drop this connection's claim on its persistent pod (shielded, bounded)."""
        with trio.move_on_after(self.config.timeouts.pod_stop, shield=True) as scope:
            try:
                await persistent.release(self.kube, namespace, name,
                                         connection_id=self.connection_id,
                                         idle_timeout=self.config.pod.persistent_idle_timeout)
            except KuberunError as exc:
                self._emit(logging.WARNING, "persistent-release-failed",
                           "pod %s: claim not released: %s; the sweep drops it", name, exc,
                           pod=name, reason=str(exc))
                return
        if scope.cancelled_caught:
            self._emit(logging.WARNING, "persistent-release-failed",
                       "pod %s: claim not released within %gs; the sweep drops it", name,
                       self.config.timeouts.pod_stop, pod=name, reason="Timeout")
        else:
            self._emit(logging.INFO, "persistent-pod-released",
                       "persistent pod %s released (kept for the next connection)", name,
                       pod=name)

    async def wait_lost(self, pod: ConnectedPod) -> PodLoss:
        """Return when ``pod`` is gone, failed, or its console container stopped."""
        if self.hub is not None and self.config.pod.mode != "persistent":
            return await self.hub.wait_lost(pod.namespace, pod.name, pod.container)
        return await self.kube.watch_pod_gone_or_failed(pod.namespace, pod.name, pod.container)

    async def _explained(self, namespace: str, name: str, exc: PodStartError) -> PodStartError:
        """Add the newest Warning event to a start error, if it says more."""
        with contextlib.suppress(KuberunError), trio.move_on_after(2):
            warning = last_warning(await self.kube.events_for_pod(namespace, name))
            if warning and warning not in exc.message:
                return PodStartError(exc.pod, exc.reason, f"{exc.message} ({warning})")
        return exc

    async def _delete(self, namespace: str, name: str | None,
                      session_id: str | None = None) -> None:
        started = time.monotonic()
        with trio.move_on_after(self.config.timeouts.pod_stop, shield=True) as scope:
            try:
                if name is not None:
                    await self.kube.delete_pod(namespace, name)
                else:  # the create may have happened: find it by its label
                    selector = (f"{LABEL_CONNECTION_ID}="
                                f"{sanitize_label_value(self.connection_id)}")
                    if session_id is not None:  # not the other sessions' pods
                        selector += f",{LABEL_SESSION_ID}={sanitize_label_value(session_id)}"
                    for pod in await self.kube.list_pods(namespace, selector):
                        name = str(pod["metadata"]["name"])
                        await self.kube.delete_pod(namespace, name)
            except KuberunError as exc:
                self._emit(logging.ERROR, "pod-delete-failed", "pod %s: delete failed: %s%s",
                           name or "(unknown)", exc, self._retry_note(), pod=name,
                           reason=str(exc))
                self._hand_over(namespace, name, session_id)
                return
        if scope.cancelled_caught:
            self._emit(logging.ERROR, "pod-delete-failed",
                       "pod %s: delete timed out after %gs%s", name or "(unknown)",
                       self.config.timeouts.pod_stop, self._retry_note(), pod=name,
                       reason="Timeout")
            self._hand_over(namespace, name, session_id)
        elif name is not None:
            took = _ms_since(started)
            self._emit(logging.INFO, "pod-deleted", "pod %s deleted in %d ms", name, took,
                       pod=name, duration_ms=took)

    def _retry_note(self) -> str:
        return "; the reaper retries it" if self.reaper is not None else ""

    def _hand_over(self, namespace: str, name: str | None, session_id: str | None) -> None:
        # A session pod whose name is unknown is not handed over: the reaper would delete
        # by connection id, taking the other sessions' pods; the sweep finds it later.
        if self.reaper is not None and (name is not None or session_id is None):
            self.reaper.submit(namespace, name, self.connection_id)

    # -- the unstructured form (ContainerSSH's handler API) ----------------
    async def on_handshake_success(self, username: str,
                                   auth: AuthResult | None = None) -> ConnectedPod:
        """Create the pod and wait for it; pair with :meth:`on_disconnect`."""
        if self._stack is not None:
            raise KuberunError("on_handshake_success called twice")
        stack = contextlib.AsyncExitStack()
        pod = await stack.enter_async_context(self.connected(username, auth))
        self._stack = stack
        return pod

    async def on_disconnect(self) -> None:
        """Delete the pod (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


def _ms_since(started: float) -> int:
    return round(1000 * (time.monotonic() - started))
