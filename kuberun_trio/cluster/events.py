"""core/v1 Events about pods: building new ones and recognising repeats.

Theory of operation
-------------------
The kubelet and the scheduler report what happens to a pod as Events
(``Scheduled``, ``Pulling``, ``Started``, ``BackOff``, ...). An Event names the
pod (``involvedObject``, with ``fieldPath`` for a container), its source
(component and host) and a type/reason/message. As client-go's event
correlator does, an Event identical to an existing one (same object, field
path, source, type, reason and message) is not stored again: the existing
one's ``count`` goes up and ``lastTimestamp`` moves (:func:`repeated`). The
store does the writes and caps how many Events it keeps.
"""

from __future__ import annotations

import time
from typing import Any

from .objects import Obj, clone, new_meta


def involved_object(ns: str, pod: Obj, field_path: str | None) -> Obj:
    """The ``involvedObject`` reference to ``pod`` (and a container, by ``field_path``)."""
    meta = pod.get("metadata") or {}
    involved: Obj = {
        "kind": "Pod",
        "namespace": ns,
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "apiVersion": "v1",
        "resourceVersion": meta.get("resourceVersion", ""),
    }
    if field_path:
        involved["fieldPath"] = field_path
    return involved


def source(component: str, host: str | None) -> Obj:
    """The Event ``source``."""
    out: Obj = {"component": component}
    if host:
        out["host"] = host
    return out


def repeat_key(
    ns: str, involved: Obj, src: Obj, type_: str, reason: str, message: str
) -> tuple[Any, ...]:
    """What makes two Events "the same one happening again" (the store indexes by it)."""
    return (ns, involved.get("uid"), involved.get("fieldPath"), reason, message, type_,
            tuple(sorted(src.items())))


def repeat_key_of(event: Obj) -> tuple[Any, ...]:
    """:func:`repeat_key` of a stored Event."""
    return repeat_key(event["metadata"].get("namespace", ""), event.get("involvedObject") or {},
                      event.get("source") or {}, event.get("type", ""), event.get("reason", ""),
                      event.get("message", ""))


def repeated(existing: Obj, now: str) -> Obj:
    """A copy of ``existing`` counted once more, last seen ``now``."""
    new = clone(existing)
    new["count"] = int(new.get("count", 1)) + 1
    new["lastTimestamp"] = now
    return new


def new_event(
    ns: str,
    involved: Obj,
    src: Obj,
    type_: str,
    reason: str,
    message: str,
    *,
    component: str,
    host: str | None,
    now: str,
) -> Obj:
    """A fresh Event (count 1), without resourceVersion; the store writes it."""
    event_meta = new_meta(
        {"name": f"{involved['name']}.{time.time_ns():x}", "namespace": ns},
        component,
        {"count": 1, "firstTimestamp": 1, "involvedObject": involved, "lastTimestamp": 1},
    )
    event_meta.pop("generation")
    return {
        "metadata": event_meta,
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "source": src,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "type": type_,
        "eventTime": None,
        "reportingComponent": component,
        "reportingInstance": host or "",
    }
