"""Stored-object helpers: resource kinds, timestamps, managedFields, resourceVersions.

Theory of operation
-------------------
The store keeps objects without ``kind``/``apiVersion`` and stamps them on the
way out (:func:`with_kind`); :data:`KINDS` says, per resource, what kind it is,
whether it is namespaced and which fields its field selectors may use. A
write gives an object a fresh ``metadata`` with the new resourceVersion
(:func:`with_rv`) in the apiserver's key order. :func:`new_meta` fills in what
the registry sets on create (uid, generation, creationTimestamp, one
``managedFields`` entry) and :func:`touch_managed` updates a subresource's
``managedFields`` entry. Timestamps are ``metav1.Time`` (seconds, UTC).
All are pure functions returning new dicts, except :func:`touch_managed`,
which edits the (already copied) object it is given. :func:`clone` is the deep
copy every read and write makes (pickle round trip: about 5x faster than
``copy.deepcopy`` on a pod, which matters with a thousand pods).
"""

from __future__ import annotations

import datetime
import json
import pickle
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from . import podspec
from .selectors import (
    EVENT_FIELDS,
    META_FIELDS,
    NAMESPACE_FIELDS,
    POD_FIELDS,
    event_fields,
    meta_fields,
    namespace_fields,
    pod_fields,
)

Obj = dict[str, Any]


def rfc3339(at: datetime.datetime | None = None) -> str:
    """``2024-05-01T12:00:00Z`` (seconds precision, UTC), like ``metav1.Time``."""
    at = at or datetime.datetime.now(datetime.UTC)
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    """The inverse of :func:`rfc3339`."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def fields_v1(obj: Mapping[str, Any]) -> Obj:
    """A plausible ``FieldsV1`` set for ``obj`` (named list items keyed by name)."""
    out: Obj = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out[f"f:{key}"] = fields_v1(value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(i, dict) and "name" in i for i in value)
        ):
            out[f"f:{key}"] = {
                'k:{"name":' + json.dumps(i["name"]) + "}": {".": {}, **fields_v1(i)} for i in value
            }
        else:
            out[f"f:{key}"] = {}
    return out


@attrs.frozen
class Kind:
    """What the store knows about one resource."""

    resource: str
    """The plural resource name (``pods``)."""
    kind: str
    """The object kind (``Pod``)."""
    namespaced: bool
    """Whether objects live in a namespace."""
    fields: Callable[[Mapping[str, Any]], dict[str, str]]
    """The object's selectable fields (for field selectors)."""
    allowed_fields: frozenset[str]
    """The field names a field selector may use."""
    group: str = ""
    """The API group (``""``: the core group)."""

    @property
    def api_version(self) -> str:
        """``v1`` or ``<group>/v1``."""
        return f"{self.group}/v1" if self.group else "v1"


COORDINATION = "coordination.k8s.io"

KINDS = {
    "pods": Kind("pods", "Pod", True, pod_fields, POD_FIELDS),
    "events": Kind("events", "Event", True, event_fields, EVENT_FIELDS),
    "namespaces": Kind("namespaces", "Namespace", False, namespace_fields, NAMESPACE_FIELDS),
    "leases": Kind("leases", "Lease", True, meta_fields, META_FIELDS, COORDINATION),
}


def clone(obj: Obj) -> Obj:
    """A deep copy of a stored object (JSON-like data: dicts, lists, scalars)."""
    copied: Obj = pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
    return copied


def with_kind(resource: str, obj: Obj) -> Obj:
    """``obj`` (shallow) with ``kind``/``apiVersion`` first."""
    kind = KINDS[resource]
    return {"kind": kind.kind, "apiVersion": kind.api_version, **obj}


def with_rv(obj: Obj, rv: int) -> Obj:
    """``obj`` (shallow) with a new ``metadata`` carrying resourceVersion ``rv``."""
    meta = {**obj["metadata"], "resourceVersion": str(rv)}
    return {**obj, "metadata": podspec.ordered(meta, podspec.META_ORDER)}


def new_meta(meta: Obj, manager: str, managed: Obj, api_version: str = "v1") -> Obj:
    """Metadata of a new object: server-set fields fresh, one managedFields entry."""
    meta = dict(meta)
    for key in ("uid", "resourceVersion", "creationTimestamp", "selfLink"):
        meta.pop(key, None)
    for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
        meta.pop(key, None)
    now = rfc3339()
    meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now)
    meta["managedFields"] = [
        {
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(managed),
        }
    ]
    return podspec.ordered(meta, podspec.META_ORDER)


def touch_managed(obj: Obj, manager: str, subresource: str, managed: Obj) -> None:
    """Replace (or add) ``manager``'s managedFields entry for ``subresource`` in ``obj``."""
    entries = obj["metadata"].setdefault("managedFields", [])
    entry = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": "v1",
        "time": rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1(managed),
        "subresource": subresource,
    }
    for i, old in enumerate(entries):
        if old.get("manager") == manager and old.get("subresource") == subresource:
            entries[i] = entry
            return
    entries.append(entry)
