"""REST handlers of the embedded cluster: discovery, namespaces, pods, logs, events.

Theory of operation
-------------------
:func:`handle` is the one entry point :mod:`.http` calls for every request
that is not an exec/attach/port-forward upgrade. It matches the path against a
small route table, parses the query the way the apiserver's parameter codec
does (booleans: only absent, ``0`` and ``false`` are false), calls the
:class:`~.store.Store`, and returns a :class:`~.httptypes.Response` with
compact JSON, or a :class:`~.httptypes.StreamResponse` for watches (one JSON
event per line) and ``logs?follow=true``. Errors are raised as
:class:`~.status.ApiStatusError`, which :mod:`.http` renders.

Discovery serves what kubectl 1.30+ and kubernetes-asyncio probe: ``/version``,
``/api``, ``/api/v1``, ``/apis`` -- the latter two also as aggregated
discovery (``APIGroupDiscoveryList``) when the ``Accept`` header asks for it --
and answers the generic NotFound for ``/openapi/*`` so clients fall back.
``kubectl get`` asks for ``as=Table``: pods, events and namespaces (lists,
single objects and watch events) are then served as ``meta.k8s.io`` Tables
with the real server's columns; column definitions go only into the first
watch event, as the real server does.
"""

from __future__ import annotations

import datetime
import inspect
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs

from . import status
from .faults import Faults
from .httptypes import Reply, Request, Response, StreamResponse
from .podspec import validate_labels
from .status import encode_json
from .store import Store, Watch

LogsFn = Callable[..., AsyncIterator[bytes] | Awaitable[AsyncIterator[bytes]]]
"""``logs(ns, pod, container, *, follow, [previous])``: the kubelet's log reader.

Either an async generator or a coroutine returning an async iterator (like
``Kubelet.logs``); errors it raises when awaited become the HTTP answer."""

GIT_VERSION = "v1.31.0"
_DISCOVERY_TYPE = "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"


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


# -- small helpers ------------------------------------------------------------


def json_response(
    obj: Any, status_code: int = 200, content_type: str = "application/json"
) -> Response:
    return Response(status_code, encode_json(obj), content_type=content_type)


def param_bool(req: Request, name: str) -> bool:
    """Kubernetes bool parsing: absent, ``0`` and any case of ``false`` are false."""
    value = req.param(name)
    return value is not None and value != "0" and value.lower() != "false"


def param_int(req: Request, name: str) -> int | None:
    value = req.param(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise status.bad_request(f'strconv.ParseInt: parsing "{value}": invalid syntax') from None


def _body_json(req: Request, kind: str) -> Any:
    try:
        return json.loads(req.body or b"null")
    except ValueError as exc:
        raise status.bad_request(
            f'{kind} in version "v1" cannot be handled as a {kind}: {exc}'
        ) from None


def _accepts(req: Request) -> list[dict[str, str]]:
    """The Accept header as a list of ``{"type": ..., param: value}`` in client order."""
    result = []
    for part in req.headers.get("accept", "").split(","):
        pieces = [p.strip() for p in part.split(";") if p.strip()]
        if not pieces:
            continue
        entry = {"type": pieces[0].lower()}
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            entry[key.strip().lower()] = value.strip()
        result.append(entry)
    return result


def _wants(req: Request, as_: str, group: str) -> dict[str, str] | None:
    """The first Accept entry asking for ``as=<as_>;g=<group>``, if one comes first."""
    for entry in _accepts(req):
        if entry.get("as") == as_ and entry.get("g") == group:
            return entry
        if entry["type"] in ("application/json", "*/*", "application/*") and "as" not in entry:
            return None
    return None


# -- discovery ----------------------------------------------------------------

_POD_VERBS = ["create", "delete", "get", "list", "patch", "watch"]
_RESOURCES: list[dict[str, Any]] = [
    {
        "name": "events",
        "singularName": "event",
        "namespaced": True,
        "kind": "Event",
        "verbs": ["get", "list", "watch"],
        "shortNames": ["ev"],
    },
    {
        "name": "namespaces",
        "singularName": "namespace",
        "namespaced": False,
        "kind": "Namespace",
        "verbs": ["create", "get", "list", "watch"],
        "shortNames": ["ns"],
    },
    {
        "name": "pods",
        "singularName": "pod",
        "namespaced": True,
        "kind": "Pod",
        "verbs": _POD_VERBS,
        "shortNames": ["po"],
        "categories": ["all"],
    },
    {
        "name": "pods/attach",
        "singularName": "",
        "namespaced": True,
        "kind": "PodAttachOptions",
        "verbs": ["create", "get"],
    },
    {
        "name": "pods/exec",
        "singularName": "",
        "namespaced": True,
        "kind": "PodExecOptions",
        "verbs": ["create", "get"],
    },
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
    {
        "name": "pods/portforward",
        "singularName": "",
        "namespaced": True,
        "kind": "PodPortForwardOptions",
        "verbs": ["create", "get"],
    },
    {
        "name": "pods/status",
        "singularName": "",
        "namespaced": True,
        "kind": "Pod",
        "verbs": ["get"],
    },
]


def _version(ctx: ApiContext) -> dict[str, Any]:
    major, minor = ctx.git_version.lstrip("v").split(".")[:2]
    return {
        "major": major,
        "minor": minor,
        "gitVersion": ctx.git_version,
        "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T07:28:49Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _api_versions(req: Request) -> dict[str, Any]:
    host = req.headers.get("host") or "127.0.0.1:6443"
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    }


def _resource_list() -> dict[str, Any]:
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _RESOURCES}


def _aggregated(core: bool, version: str) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    if core:
        resources = []
        for res in _RESOURCES:
            if "/" in res["name"]:
                continue
            entry: dict[str, Any] = {
                "resource": res["name"],
                "responseKind": {"group": "", "version": "", "kind": res["kind"]},
                "scope": "Namespaced" if res["namespaced"] else "Cluster",
                "singularResource": res["singularName"],
                "verbs": res["verbs"],
            }
            for key in ("shortNames", "categories"):
                if key in res:
                    entry[key] = res[key]
            subs = [
                {
                    "subresource": sub["name"].split("/", 1)[1],
                    "responseKind": {"group": "", "version": "", "kind": sub["kind"]},
                    "verbs": sub["verbs"],
                }
                for sub in _RESOURCES
                if sub["name"].startswith(res["name"] + "/")
            ]
            if subs:
                entry["subresources"] = subs
            resources.append(entry)
        items.append(
            {
                "metadata": {"creationTimestamp": None},
                "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
            }
        )
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": items,
    }


def _discovery(req: Request, ctx: ApiContext) -> Response | None:
    path = req.path.rstrip("/") or "/"
    if path == "/version":
        return json_response(_version(ctx))
    if path in ("/healthz", "/livez", "/readyz"):
        return Response(200, b"ok", content_type="text/plain; charset=utf-8")
    if path in ("/api", "/apis"):
        wanted = _wants(req, "APIGroupDiscoveryList", "apidiscovery.k8s.io")
        if wanted is not None and wanted.get("v") in ("v2", "v2beta1"):
            version = wanted["v"]
            return json_response(
                _aggregated(path == "/api", version), content_type=_DISCOVERY_TYPE.format(v=version)
            )
        if path == "/api":
            return json_response(_api_versions(req))
        return json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
    if path == "/api/v1":
        return json_response(_resource_list())
    return None


# -- tables (kubectl get) -----------------------------------------------------


def human_duration(seconds: float) -> str:
    """apimachinery ``duration.HumanDuration`` (``45s``, ``5m20s``, ``3h``, ``2d5h``)."""
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d{h % 24}h" if h % 24 else f"{h // 24}d"
    if h < 24 * 365 * 2:
        return f"{h // 24}d"
    if h < 24 * 365 * 8:
        return f"{h // (24 * 365)}y{(h // 24) % 365}d"
    return f"{h // (24 * 365)}y"


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return human_duration((now - created).total_seconds())


def _pod_row(pod: dict[str, Any]) -> list[Any]:
    spec, st = pod.get("spec") or {}, pod.get("status") or {}
    statuses = st.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    reason = st.get("reason") or st.get("phase") or "Pending"
    for c in statuses:
        state = c.get("state") or {}
        if state.get("waiting", {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated", {}).get("reason"):
            reason = state["terminated"]["reason"]
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        reason,
        str(restarts),
        _age(pod["metadata"].get("creationTimestamp")),
        st.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        st.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


def _event_row(event: dict[str, Any]) -> list[Any]:
    involved = event.get("involvedObject") or {}
    source = event.get("source") or {}
    origin = ", ".join(v for v in (source.get("component"), source.get("host")) if v)
    return [
        _age(event.get("lastTimestamp") or event["metadata"].get("creationTimestamp")),
        event.get("type", ""),
        event.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        involved.get("fieldPath", ""),
        origin,
        event.get("message", ""),
        _age(event.get("firstTimestamp")),
        int(event.get("count", 1)),
        event["metadata"]["name"],
    ]


def _namespace_row(ns: dict[str, Any]) -> list[Any]:
    return [
        ns["metadata"]["name"],
        (ns.get("status") or {}).get("phase", ""),
        _age(ns["metadata"].get("creationTimestamp")),
    ]


# resource -> (columns as (name, type, format, priority), row function)
_TABLES: dict[
    str, tuple[list[tuple[str, str, str, int]], Callable[[dict[str, Any]], list[Any]]]
] = {
    "pods": (
        [
            ("Name", "string", "name", 0),
            ("Ready", "string", "", 0),
            ("Status", "string", "", 0),
            ("Restarts", "string", "", 0),
            ("Age", "string", "", 0),
            ("IP", "string", "", 1),
            ("Node", "string", "", 1),
            ("Nominated Node", "string", "", 1),
            ("Readiness Gates", "string", "", 1),
        ],
        _pod_row,
    ),
    "events": (
        [
            ("Last Seen", "string", "", 0),
            ("Type", "string", "", 0),
            ("Reason", "string", "", 0),
            ("Object", "string", "", 0),
            ("Subobject", "string", "", 1),
            ("Source", "string", "", 1),
            ("Message", "string", "", 0),
            ("First Seen", "string", "", 1),
            ("Count", "integer", "", 1),
            ("Name", "string", "name", 1),
        ],
        _event_row,
    ),
    "namespaces": (
        [("Name", "string", "name", 0), ("Status", "string", "", 0), ("Age", "string", "", 0)],
        _namespace_row,
    ),
}
_KIND = {"pods": "Pod", "events": "Event", "namespaces": "Namespace"}


@attrs.frozen
class _TableFormat:
    """A negotiated ``as=Table`` response format."""

    version: str
    include: str
    """``includeObject``: ``None``, ``Object`` or ``PartialObjectMetadata`` (the default)."""

    @property
    def content_type(self) -> str:
        return f"application/json;as=Table;v={self.version};g=meta.k8s.io"

    def table(
        self, resource: str, items: list[dict[str, Any]], meta: dict[str, Any], columns: bool
    ) -> dict[str, Any]:
        specs, row_fn = _TABLES[resource]
        rows = []
        for item in items:
            row: dict[str, Any] = {"cells": row_fn(item)}
            if self.include == "Object":
                row["object"] = {"kind": _KIND[resource], "apiVersion": "v1", **item}
            elif self.include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": f"meta.k8s.io/{self.version}",
                    "metadata": item["metadata"],
                }
            rows.append(row)
        definitions = [
            {"name": n, "type": t, "format": f, "description": "", "priority": p}
            for n, t, f, p in specs
        ]
        return {
            "kind": "Table",
            "apiVersion": f"meta.k8s.io/{self.version}",
            "metadata": meta,
            "columnDefinitions": definitions if columns else None,
            "rows": rows,
        }


def _table_format(req: Request, resource: str) -> _TableFormat | None:
    wanted = _wants(req, "Table", "meta.k8s.io")
    if wanted is None or resource not in _TABLES:
        return None
    include = req.param("includeObject") or "PartialObjectMetadata"
    return _TableFormat(wanted.get("v") or "v1", include)


def _table(req: Request, obj: dict[str, Any], resource: str) -> Response | None:
    """``obj`` (a list or a single object) as a Table, if the client asked for one."""
    fmt = _table_format(req, resource)
    if fmt is None:
        return None
    if obj.get("kind", "").endswith("List"):
        table = fmt.table(resource, obj["items"], dict(obj["metadata"]), True)
    else:
        rv = obj["metadata"].get("resourceVersion", "")
        table = fmt.table(resource, [obj], {"resourceVersion": rv}, True)
    return json_response(table, content_type=fmt.content_type)


# -- list / watch ---------------------------------------------------------------


class _WatchChunks:
    """The body of a watch response: one JSON event per chunk, newline-terminated.

    A plain async iterator rather than an async generator, so a consumer that
    stops early (client hung up) leaves nothing that needs finalizing; the
    store holds watches weakly, so an abandoned one simply goes away.
    """

    def __init__(self, watch: Watch, fmt: _TableFormat | None) -> None:
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


def _watch_stream(watch: Watch, fmt: _TableFormat | None) -> StreamResponse:
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
        return _watch_stream(watch, _table_format(req, resource))
    listing = ctx.store.list(
        resource,
        ns,
        label_selector,
        field_selector,
        limit=param_int(req, "limit"),
        continue_token=req.param("continue") or None,
    )
    return _table(req, listing, resource) or json_response(listing)


# -- pods -------------------------------------------------------------------------


def _manager(req: Request) -> str:
    manager = req.param("fieldManager")
    if manager:
        return manager
    agent = req.headers.get("user-agent", "")
    return agent.split("/", 1)[0] or "unknown"


def _create_pod(req: Request, ctx: ApiContext, ns: str) -> Response:
    body = _body_json(req, "Pod")
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
        body = _body_json(req, "DeleteOptions")
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
    patch = _body_json(req, "Pod")
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


# -- routing ------------------------------------------------------------------------

_NAMESPACED = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_CLUSTER = re.compile(r"^/api/v1/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?$")


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
                return _table(req, pod, "pods") or json_response(pod)
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
                body = _body_json(req, "Namespace")
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
        reply = _discovery(req, ctx)
        if reply is not None:
            return reply
    m = _NAMESPACED.match(req.path)
    if m:
        return await _namespaced(req, ctx, m)
    m = _CLUSTER.match(req.path)
    if m:
        return await _cluster(req, ctx, m)
    if req.path.startswith(("/api/", "/apis/", "/openapi/")) or req.path in ("/api", "/apis"):
        raise status.path_not_found()
    return Response(404, b"404 page not found\n", content_type="text/plain; charset=utf-8")


__all__ = ["ApiContext", "LogsFn", "handle"]
