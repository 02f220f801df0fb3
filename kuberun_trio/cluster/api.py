"""REST handlers of the embedded cluster: routing, namespaces, pods, logs, events.

Theory of operation
-------------------
:func:`handle` is the one entry point :mod:`.http` calls for every request
that is not an exec/attach/port-forward upgrade. Discovery paths go to
:mod:`.discovery`; the rest is matched against two path patterns (namespaced
and cluster-scoped), the query parsed the way the apiserver's parameter codec
does (:mod:`.params`), the :class:`~.store.Store` called, and a
:class:`~.httptypes.Response` returned with compact JSON -- or a
:class:`~.httptypes.StreamResponse` for watches (one JSON event per line) and
``logs?follow=true``. Errors are raised as :class:`~.status.ApiStatusError`,
which :mod:`.http` renders.

``kubectl get`` asks for ``as=Table``: lists, single objects and watch events
of pods, events, namespaces and leases are then rendered by :mod:`.tables`. Pod
writes are create, delete (DeleteOptions from the body or the query) and a
merge patch of labels and annotations; ``pods/log`` does the apiserver's
container checks and leaves the rest (waiting, ``previous``) to the kubelet.
``coordination.k8s.io/v1`` Leases (``/apis/coordination.k8s.io/v1/...``) serve
create, get, list, watch, update (PUT) and delete (rules in :mod:`.leases`).
Anything else under ``/api``, ``/apis`` or ``/openapi`` is the generic
NotFound, so clients fall back.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs

from . import status
from .discovery import GIT_VERSION, serve_discovery
from .faults import Faults
from .httptypes import Reply, Request, Response, StreamResponse
from .namevalidation import validate_labels
from .params import body_json, json_response, param_bool, param_int
from .status import encode_json
from .store import Store, Watch
from .tables import TableFormat, human_duration, table, table_format

LogsFn = Callable[..., AsyncIterator[bytes] | Awaitable[AsyncIterator[bytes]]]
"""``logs(ns, pod, container, *, follow, [previous])``: the kubelet's log reader.

Either an async generator or a coroutine returning an async iterator (like
``Kubelet.logs``); errors it raises when awaited become the HTTP answer."""


@attrs.frozen
class ApiContext:
    """What the REST handlers work on."""

    store: Store
    """Objects, resourceVersions and watches."""
    faults: Faults
    """Fault injection (``drop_watches`` ends open watch streams)."""
    logs: LogsFn | None = None
    """The kubelet's log reader; None answers logs requests with an empty body."""
    git_version: str = GIT_VERSION
    """What ``/version`` reports."""


# -- list / watch ---------------------------------------------------------------


class _WatchChunks:
    """The body of a watch response: one JSON event per chunk, newline-terminated.

    A plain async iterator rather than an async generator, so a consumer that
    stops early (client hung up) leaves nothing that needs finalizing; the
    store holds watches weakly, so an abandoned one simply goes away.
    """

    def __init__(self, watch: Watch, fmt: TableFormat | None) -> None:
        self._watch, self._fmt, self._first = watch, fmt, True

    def __aiter__(self) -> _WatchChunks:
        return self

    async def __anext__(self) -> bytes:
        event = await self._watch.__anext__()
        if self._fmt is not None and event["type"] in ("ADDED", "MODIFIED", "DELETED"):
            obj = event["object"]
            rv = obj["metadata"].get("resourceVersion", "")
            table = self._fmt.table(
                self._watch.resource, [obj], {"resourceVersion": rv}, self._first
            )
            event = {"type": event["type"], "object": table}
            self._first = False
        return encode_json(event) + b"\n"

    async def aclose(self) -> None:
        self._watch.close()


def _watch_stream(watch: Watch, fmt: TableFormat | None) -> StreamResponse:
    return StreamResponse(200, lambda: _WatchChunks(watch, fmt))


def _list_or_watch(req: Request, ctx: ApiContext, resource: str, ns: str | None) -> Reply:
    label_selector = req.param("labelSelector") or ""
    field_selector = req.param("fieldSelector") or ""
    if param_bool(req, "watch"):
        timeout = param_int(req, "timeoutSeconds")
        watch = ctx.store.watch(
            resource,
            ns,
            resource_version=req.param("resourceVersion"),
            label_selector=label_selector,
            field_selector=field_selector,
            bookmarks=param_bool(req, "allowWatchBookmarks"),
            timeout_seconds=float(timeout) if timeout else None,
            stop=ctx.faults.watch_dropped(),
            send_initial_events=param_bool(req, "sendInitialEvents"),
        )
        return _watch_stream(watch, table_format(req, resource))
    listing = ctx.store.list(
        resource,
        ns,
        label_selector,
        field_selector,
        limit=param_int(req, "limit"),
        continue_token=req.param("continue") or None,
    )
    return table(req, listing, resource) or json_response(listing)


# -- pods -------------------------------------------------------------------------


def _manager(req: Request) -> str:
    manager = req.param("fieldManager")
    if manager:
        return manager
    agent = req.headers.get("user-agent", "")
    return agent.split("/", 1)[0] or "unknown"


def _create_pod(req: Request, ctx: ApiContext, ns: str) -> Response:
    body = body_json(req, "Pod")
    if isinstance(body, dict):
        kind, version = body.get("kind"), body.get("apiVersion")
        if (kind and kind != "Pod") or (version and version != "v1"):
            raise status.bad_request(
                f"the API version in the data ({version}) does not match the expected API "
                "version (v1)"
                if version != "v1"
                else f"the kind in the data ({kind}) does not match the expected kind (Pod)"
            )
    pod = ctx.store.create_pod(ns, body, manager=_manager(req))
    return json_response(pod, 201)


def _delete_pod(req: Request, ctx: ApiContext, ns: str, name: str) -> Response:
    options: dict[str, Any] = {}
    if req.body.strip():
        body = body_json(req, "DeleteOptions")
        if not isinstance(body, dict):
            raise status.bad_request('DeleteOptions in version "v1" cannot be handled')
        options = body
    else:
        grace = param_int(req, "gracePeriodSeconds")
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        if req.param("propagationPolicy"):
            options["propagationPolicy"] = req.param("propagationPolicy")
    grace_value = options.get("gracePeriodSeconds")
    if grace_value is not None and not isinstance(grace_value, int):
        raise status.bad_request("DeleteOptions: gracePeriodSeconds must be an integer")
    pod = ctx.store.delete_pod(
        ns,
        name,
        grace_period_seconds=grace_value,
        preconditions=options.get("preconditions"),
        propagation_policy=options.get("propagationPolicy"),
    )
    return json_response(pod, 200)


def _patch_pod(req: Request, ctx: ApiContext, ns: str, name: str) -> Response:
    """Merge-patch (and strategic-merge, treated alike) of labels and annotations."""
    ctype = req.headers.get("content-type", "").split(";")[0].strip()
    if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        raise status.error(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"application/json-patch+json, application/merge-patch+json, "
            f'application/apply-patch+yaml (got "{ctype}")',
        )
    patch = body_json(req, "Pod")
    if not isinstance(patch, dict):
        raise status.bad_request("patch body must be a JSON object")
    meta_patch = patch.get("metadata") or {}
    unsupported = set(patch) - {"metadata"} or set(meta_patch) - {"labels", "annotations"}
    if unsupported:
        raise status.error(
            422, "Invalid", f"embedded cluster: patching {sorted(unsupported)} is not supported"
        )

    def apply(pod: dict[str, Any]) -> None:
        for key in ("labels", "annotations"):
            if key not in meta_patch:
                continue
            current = dict(pod["metadata"].get(key) or {})
            for k, v in (meta_patch[key] or {}).items():
                if v is None:
                    current.pop(k, None)
                else:
                    current[k] = v
            pod["metadata"][key] = current

    for key in ("labels", "annotations"):
        values = meta_patch.get(key) or {}
        if not isinstance(values, dict) or not all(
            v is None or isinstance(v, str) for v in values.values()
        ):
            raise status.bad_request(f"metadata.{key} must be a map of strings")
    labels = {k: v for k, v in (meta_patch.get("labels") or {}).items() if v is not None}
    errs = validate_labels(labels, "metadata.labels")
    if errs:
        raise status.invalid("Pod", name, errs)
    pod = ctx.store.update_pod(ns, name, apply, manager=_manager(req), subresource="")
    return json_response(pod)


def _container_for_logs(pod: dict[str, Any], container: str | None) -> str:
    name = pod["metadata"]["name"]
    spec = pod.get("spec") or {}
    names: list[str] = [c["name"] for c in spec.get("containers") or []]
    init = [c["name"] for c in spec.get("initContainers") or []]
    if not container:
        if len(names) == 1:
            return names[0]
        message = (
            f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
        )
        if init:
            message += f" or one of the init containers: [{' '.join(init)}]"
        raise status.bad_request(message)
    if container not in names and container not in init:
        raise status.bad_request(f"container {container} is not valid for pod {name}")
    return container


class _LogChunks:
    """The body of ``logs?follow=true``: the kubelet's chunks, cut at ``limitBytes``."""

    def __init__(self, source: AsyncIterator[bytes], limit: int | None) -> None:
        self._source, self._left = source, limit if limit and limit > 0 else None

    def __aiter__(self) -> _LogChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._left == 0:
            await self.aclose()
            raise StopAsyncIteration
        chunk = await self._source.__anext__()
        if self._left is not None:
            chunk = chunk[: self._left]
            self._left -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        close = getattr(self._source, "aclose", None)
        if close is not None:
            await close()


async def _pod_log(req: Request, ctx: ApiContext, ns: str, name: str) -> Reply:
    """``pods/log``: the apiserver's checks here, the kubelet's (waiting, previous) in ``logs``."""
    pod = ctx.store.get_pod(ns, name)
    container = _container_for_logs(pod, req.param("container"))
    plain = "text/plain"
    follow = param_bool(req, "follow")
    tail = param_int(req, "tailLines")
    limit = param_int(req, "limitBytes")
    if not pod["spec"].get("nodeName") or ctx.logs is None:
        # No node: the apiserver has no kubelet location and answers an empty body.
        return Response(200, b"", content_type=plain)
    options: dict[str, bool] = {"follow": follow}
    if param_bool(req, "previous"):
        options["previous"] = True
    result = ctx.logs(ns, name, container, **options)
    # The kubelet's errors (``is waiting to start``, no previous instance) surface on
    # this await, before any 200 is sent.
    source = await result if inspect.isawaitable(result) else result

    if not follow:
        data = b"".join([chunk async for chunk in source])
        if tail is not None and tail >= 0:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        if limit is not None and limit > 0:
            data = data[:limit]
        return Response(200, data, content_type=plain)

    return StreamResponse(200, lambda: _LogChunks(source, limit), content_type=plain)


# -- leases (coordination.k8s.io/v1) ----------------------------------------------------


def _delete_options(req: Request) -> dict[str, Any]:
    if not req.body.strip():
        return {}
    body = body_json(req, "DeleteOptions")
    if not isinstance(body, dict):
        raise status.bad_request('DeleteOptions in version "v1" cannot be handled')
    return body


async def _leases(req: Request, ctx: ApiContext, m: re.Match[str]) -> Reply:
    ns, name, method = m["ns"], m["name"], req.method
    if ns is None:  # /apis/coordination.k8s.io/v1/leases: every namespace
        if method == "GET":
            return _list_or_watch(req, ctx, "leases", None)
        raise _not_allowed()
    if name is None:
        if method == "GET":
            return _list_or_watch(req, ctx, "leases", ns)
        if method == "POST":
            lease = ctx.store.create_lease(ns, body_json(req, "Lease"), manager=_manager(req))
            return json_response(lease, 201)
        raise _not_allowed()
    if method == "GET":
        lease = ctx.store.get_lease(ns, name)
        return table(req, lease, "leases") or json_response(lease)
    if method == "PUT":
        lease, created = ctx.store.update_lease(ns, name, body_json(req, "Lease"),
                                                manager=_manager(req))
        return json_response(lease, 201 if created else 200)
    if method == "DELETE":
        options = _delete_options(req)
        return json_response(ctx.store.delete_lease(ns, name,
                                                    preconditions=options.get("preconditions")))
    raise _not_allowed()


# -- routing ------------------------------------------------------------------------

_NAMESPACED = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_CLUSTER = re.compile(r"^/api/v1/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?$")
_LEASES = re.compile(
    r"^/apis/coordination\.k8s\.io/v1/(?:namespaces/(?P<ns>[^/]+)/)?leases(?:/(?P<name>[^/]+))?$"
)


def _not_allowed() -> status.ApiStatusError:
    return status.method_not_allowed()


async def _namespaced(req: Request, ctx: ApiContext, m: re.Match[str]) -> Reply:
    ns, res, name, sub = m["ns"], m["res"], m["name"], m["sub"]
    method = req.method
    if res == "pods":
        if name is None:
            if method == "GET":
                return _list_or_watch(req, ctx, "pods", ns)
            if method == "POST":
                return _create_pod(req, ctx, ns)
            raise _not_allowed()
        if sub is None:
            if method == "GET":
                pod = ctx.store.get_pod(ns, name)
                return table(req, pod, "pods") or json_response(pod)
            if method == "DELETE":
                return _delete_pod(req, ctx, ns, name)
            if method == "PATCH":
                return _patch_pod(req, ctx, ns, name)
            raise _not_allowed()
        if sub == "status":
            if method == "GET":
                return json_response(ctx.store.get_pod(ns, name))
            raise _not_allowed()
        if sub == "log":
            if method == "GET":
                return await _pod_log(req, ctx, ns, name)
            raise _not_allowed()
        raise status.path_not_found()
    if res == "events" and sub is None:
        if method != "GET":
            raise _not_allowed()
        if name is None:
            return _list_or_watch(req, ctx, "events", ns)
        listing = ctx.store.list("events", ns, field_selector=f"metadata.name={name}")
        if not listing["items"]:
            raise status.not_found("events", name)
        return json_response({"kind": "Event", "apiVersion": "v1", **listing["items"][0]})
    raise status.path_not_found()


async def _cluster(req: Request, ctx: ApiContext, m: re.Match[str]) -> Reply:
    res, name = m["res"], m["name"]
    if res == "namespaces":
        if name is None:
            if req.method == "GET":
                return _list_or_watch(req, ctx, "namespaces", None)
            if req.method == "POST":
                body = body_json(req, "Namespace")
                return json_response(ctx.store.create_namespace(body), 201)
            raise _not_allowed()
        if req.method == "GET":
            return json_response(ctx.store.get_namespace(name))
        raise _not_allowed()
    if res in ("pods", "events") and name is None:
        if req.method == "GET":
            return _list_or_watch(req, ctx, res, None)
        raise _not_allowed()
    raise status.path_not_found()


async def handle(req: Request, ctx: ApiContext) -> Reply:
    """Serve one REST request (raises :class:`~.status.ApiStatusError` for errors)."""
    if req.method in ("GET", "HEAD"):
        reply = serve_discovery(req, ctx.git_version)
        if reply is not None:
            return reply
    m = _NAMESPACED.match(req.path)
    if m:
        return await _namespaced(req, ctx, m)
    m = _CLUSTER.match(req.path)
    if m:
        return await _cluster(req, ctx, m)
    m = _LEASES.match(req.path)
    if m and not (m["ns"] is None and m["name"] is not None):
        return await _leases(req, ctx, m)
    if req.path.startswith(("/api/", "/apis/", "/openapi/")) or req.path in ("/api", "/apis"):
        raise status.path_not_found()
    return Response(404, b"404 page not found\n", content_type="text/plain; charset=utf-8")


__all__ = [
    "GIT_VERSION",
    "ApiContext",
    "LogsFn",
    "handle",
    "human_duration",
    "json_response",
    "param_bool",
    "param_int",
]
