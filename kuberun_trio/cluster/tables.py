"""``as=Table`` responses: what ``kubectl get`` prints, computed by the server.

Theory of operation
-------------------
kubectl asks for ``application/json;as=Table;v=v1;g=meta.k8s.io``.
:func:`table_format` negotiates that (and ``includeObject``) into a
:class:`TableFormat`, or None when plain JSON was asked for. Pods, events and
namespaces and leases -- lists, single objects and watch events -- are then served as
``meta.k8s.io`` Tables with the real server's columns and cells (pod status
reasons, ``READY 1/1``, a Lease's ``HOLDER``, ages in apimachinery's ``HumanDuration``). Column
definitions go only into the first watch event, as the real server does
(``columns=False`` for the rest).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import attrs

from .httptypes import Request, Response
from .params import json_response, wants


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


def _lease_row(lease: dict[str, Any]) -> list[Any]:
    return [
        lease["metadata"]["name"],
        (lease.get("spec") or {}).get("holderIdentity") or "",
        _age(lease["metadata"].get("creationTimestamp")),
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
    "leases": (
        [("Name", "string", "name", 0), ("Holder", "string", "", 0), ("Age", "string", "", 0)],
        _lease_row,
    ),
}
_KIND = {"pods": "Pod", "events": "Event", "namespaces": "Namespace", "leases": "Lease"}
_API_VERSION = {"leases": "coordination.k8s.io/v1"}


@attrs.frozen
class TableFormat:
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
                row["object"] = {"kind": _KIND[resource],
                                 "apiVersion": _API_VERSION.get(resource, "v1"), **item}
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


def table_format(req: Request, resource: str) -> TableFormat | None:
    wanted = wants(req, "Table", "meta.k8s.io")
    if wanted is None or resource not in _TABLES:
        return None
    include = req.param("includeObject") or "PartialObjectMetadata"
    return TableFormat(wanted.get("v") or "v1", include)


def table(req: Request, obj: dict[str, Any], resource: str) -> Response | None:
    """``obj`` (a list or a single object) as a Table, if the client asked for one."""
    fmt = table_format(req, resource)
    if fmt is None:
        return None
    if obj.get("kind", "").endswith("List"):
        table = fmt.table(resource, obj["items"], dict(obj["metadata"]), True)
    else:
        rv = obj["metadata"].get("resourceVersion", "")
        table = fmt.table(resource, [obj], {"resourceVersion": rv}, True)
    return json_response(table, content_type=fmt.content_type)
