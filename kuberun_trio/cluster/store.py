"""The embedded cluster's object store: namespaces, pods and events, with watches.

Theory of operation
-------------------
The store plays etcd plus the apiserver's registry and watch cache. All
methods except watching are synchronous and run inside the trio thread, so
every write is atomic with respect to every read and watch registration.

* **Objects** are kept per resource (``pods``, ``events``, ``namespaces``)
  keyed by ``(namespace, name)``, without ``kind``/``apiVersion`` (added on the
  way out: single objects and watch objects carry them, list items do not).
  A stored dict is never mutated: each write stores a fresh copy, so watch
  events and initial snapshots can share them safely. Callers always get deep
  copies.
* **resourceVersion** is one global counter (like an etcd revision), rendered
  as a string; each write takes the next value.
* **History.** Every write appends a ``_Change`` (rv, resource, type, object,
  previous object) to a bounded deque. Dropping the oldest entry raises the
  *compaction point*: a watch that asks to resume from an RV below it gets the
  410 ``Expired`` ERROR event (``too old resource version: 5 (120)``), as the
  real watch cache answers. :meth:`Store.expire_history` forces that for every
  RV so far (the ``expire_watches`` fault).
* **Watches** (:class:`Watch`) get synthetic ``ADDED`` events for the current
  matches when started without an RV (or ``"0"``), else the history after the
  RV, then live events through a bounded memory channel. Writers never block:
  a watcher whose buffer is full is ended (after draining what it has), like
  the real cacher ends slow watchers; the client resumes from its last RV.
  Selector transitions turn into ``ADDED``/``DELETED`` exactly as in
  ``cache_watcher.go``. ``BOOKMARK`` events carry the current RV when enabled;
  ``timeoutSeconds`` and the stop event (fault ``drop_watches``) end a watch.
  The store holds watches weakly: one its consumer abandoned just goes away.
* **Graceful deletion** follows notes §3.3: :meth:`Store.delete_pod` computes
  the grace period, :meth:`Store.mark_deleting` records ``deletionTimestamp``
  (MODIFIED), and the kubelet calls :meth:`Store.remove_pod` once the
  containers are down (DELETED). Finalizers keep an object until removed.
* :meth:`Store.subscribe` hands the kubelet every pod change, unfiltered.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import json
import math
import random
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import trio

from . import podspec, status
from .selectors import (
    EVENT_FIELDS,
    NAMESPACE_FIELDS,
    POD_FIELDS,
    FieldSelector,
    LabelSelector,
    event_fields,
    namespace_fields,
    parse_field_selector,
    parse_label_selector,
    pod_fields,
)

Obj = dict[str, Any]
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_TERMINAL_PHASES = ("Succeeded", "Failed")


def rfc3339(at: datetime.datetime | None = None) -> str:
    """``2024-05-01T12:00:00Z`` (seconds precision, UTC), like ``metav1.Time``."""
    at = at or datetime.datetime.now(datetime.UTC)
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime.datetime:
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
class _Kind:
    resource: str
    kind: str
    namespaced: bool
    fields: Callable[[Mapping[str, Any]], dict[str, str]]
    allowed_fields: frozenset[str]


_KINDS = {
    "pods": _Kind("pods", "Pod", True, pod_fields, POD_FIELDS),
    "events": _Kind("events", "Event", True, event_fields, EVENT_FIELDS),
    "namespaces": _Kind("namespaces", "Namespace", False, namespace_fields, NAMESPACE_FIELDS),
}


@attrs.frozen
class _Change:
    rv: int
    resource: str
    type: str
    obj: Obj
    prev: Obj | None


@attrs.frozen
class _Filter:
    resource: str
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if not self.labels.matches(meta.get("labels")):
            return False
        return self.fields.empty or self.fields.matches(_KINDS[self.resource].fields(obj))


def with_kind(resource: str, obj: Obj) -> Obj:
    """``obj`` (shallow) with ``kind``/``apiVersion`` first."""
    return {"kind": _KINDS[resource].kind, "apiVersion": "v1", **obj}


def _with_rv(obj: Obj, rv: int) -> Obj:
    meta = {**obj["metadata"], "resourceVersion": str(rv)}
    return {**obj, "metadata": podspec.ordered(meta, podspec.META_ORDER)}


def _event_for(flt: _Filter, change: _Change) -> tuple[str, Obj] | None:
    """The watch event ``change`` means to a filtered watcher (``convertToWatchEvent``)."""
    new_ok = flt.matches(change.obj)
    if change.type == "DELETED":
        return ("DELETED", change.obj) if new_ok else None
    old_ok = change.prev is not None and flt.matches(change.prev)
    if new_ok and old_ok:
        return "MODIFIED", change.obj
    if new_ok:
        return "ADDED", change.obj
    if old_ok and change.prev is not None:
        return "DELETED", _with_rv(change.prev, change.rv)
    return None


class Watch:
    """One watch stream: ``async for event in watch`` yields ``{"type", "object"}`` dicts."""

    def __init__(
        self,
        store: Store,
        flt: _Filter,
        *,
        initial: list[Obj],
        bookmarks: bool,
        deadline: float,
        stop: trio.Event | None,
        buffer: int,
    ) -> None:
        self._store, self._filter = store, flt
        self._pending: deque[Obj] = deque(initial)
        self._bookmarks, self._deadline, self._stop = bookmarks, deadline, stop
        self._send, self._receive = trio.open_memory_channel[tuple[str, Obj]](buffer)
        self._done = False

    # -- fed by the store (synchronous) --
    def _offer(self, change: _Change) -> None:
        event = _event_for(self._filter, change)
        if event is None:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            # Too far behind: end it, like the cacher does; the client resumes.
            self._send.close()
            self._store._watchers.discard(self)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._store._watchers.discard(self)

    @property
    def resource(self) -> str:
        return self._filter.resource

    def close(self) -> None:
        """Stop the watch; the iterator ends (idempotent, synchronous)."""
        self._done = True
        self._send.close()
        self._receive.close()
        self._store._watchers.discard(self)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Obj:
        if self._done:
            raise StopAsyncIteration
        if self._pending:
            return self._pending.popleft()
        while True:
            if self._stop is not None and self._stop.is_set():
                break
            now = trio.current_time()
            if now >= self._deadline:
                break
            wake = self._deadline
            if self._bookmarks:
                wake = min(wake, now + self._store.bookmark_interval)
            outcome = await self._next_event(wake)
            if outcome == "end":
                break
            if isinstance(outcome, tuple):
                type_, obj = outcome
                return {"type": type_, "object": with_kind(self.resource, obj)}
            if self._bookmarks and trio.current_time() < self._deadline:
                return self._store.bookmark(self.resource)
        self.close()
        raise StopAsyncIteration

    async def _next_event(self, wake: float) -> tuple[str, Obj] | str | None:
        """An event, ``"end"`` (channel closed or stopped), or None at ``wake``."""
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            pass
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return "end"
        result: tuple[str, Obj] | str | None = None
        with trio.move_on_at(wake):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    nonlocal result
                    try:
                        result = await self._receive.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        result = "end"
                    nursery.cancel_scope.cancel()

                async def stopped(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(receive)
                if self._stop is not None:
                    nursery.start_soon(stopped, self._stop)
        if result is None and self._stop is not None and self._stop.is_set():
            return "end"
        return result

    def __repr__(self) -> str:
        return f"<Watch {self.resource} ns={self._filter.namespace} done={self._done}>"


class Store:
    """Namespaces, pods and events with resourceVersions, history and watches."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        watch_buffer: int = 1000,
        bookmark_interval: float = 5.0,
        min_request_timeout: float = 1800.0,
        max_events: int = 2000,
    ) -> None:
        self.history_size, self.watch_buffer = history_size, watch_buffer
        self.bookmark_interval, self.min_request_timeout = bookmark_interval, min_request_timeout
        self.max_events = max_events
        self._rv = 0
        self._compacted = 0
        self._history: deque[_Change] = deque()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in _KINDS}
        self._watchers: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._subscribers: list[trio.MemorySendChannel[tuple[str, Obj]]] = []
        for name in SYSTEM_NAMESPACES:
            self.create_namespace({"metadata": {"name": name}})

    # -- bookkeeping ------------------------------------------------------
    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion."""
        return self._rv

    def _write(self, resource: str, type_: str, obj: Obj, prev: Obj | None) -> Obj:
        """Assign the next RV to ``obj`` (a fresh dict), store or drop it, notify."""
        self._rv += 1
        obj = _with_rv(obj, self._rv)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if type_ == "DELETED":
            self._objects[resource].pop(key, None)
        else:
            self._objects[resource][key] = obj
        change = _Change(self._rv, resource, type_, obj, prev)
        self._history.append(change)
        while len(self._history) > self.history_size:
            self._compacted = self._history.popleft().rv
        for watch in list(self._watchers):
            if watch.resource == resource:
                watch._offer(change)
        if resource == "pods":
            for sub in list(self._subscribers):
                try:
                    sub.send_nowait((type_, with_kind("pods", copy.deepcopy(obj))))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(sub)
        return obj

    def expire_history(self) -> None:
        """Make every resourceVersion so far too old to resume a watch from (fault)."""
        self._rv += 1
        self._compacted = self._rv
        self._history.clear()

    def subscribe(self) -> trio.MemoryReceiveChannel[tuple[str, Obj]]:
        """Every pod change from now on, as ``(type, pod)`` (for the kubelet)."""
        send, receive = trio.open_memory_channel[tuple[str, Obj]](math.inf)
        self._subscribers.append(send)
        return receive

    def _get(self, resource: str, ns: str, name: str) -> Obj:
        obj = self._objects[resource].get((ns, name))
        if obj is None:
            raise status.not_found(resource, name)
        return obj

    def _require_namespace(self, ns: str) -> None:
        if ("", ns) not in self._objects["namespaces"]:
            raise status.namespace_not_found(ns)

    def _new_meta(self, meta: Obj, manager: str, managed: Obj) -> Obj:
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
                "apiVersion": "v1",
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(managed),
            }
        ]
        return podspec.ordered(meta, podspec.META_ORDER)

    # -- namespaces -----------------------------------------------------------
    def create_namespace(self, body: Obj) -> Obj:
        """Create a namespace (the response body of a 201)."""
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise status.bad_request('Namespace in version "v1" cannot be handled as a Namespace')
        meta = dict(body.get("metadata") or {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + podspec.random_suffix()
        name = str(meta.get("name") or "")
        meta.pop("namespace", None)
        errs = podspec.validate_object_meta(
            meta, namespaced=False, name_check=podspec.is_dns1123_label
        )
        if errs:
            raise status.invalid("Namespace", name, errs)
        if ("", name) in self._objects["namespaces"]:
            raise status.already_exists("namespaces", name)
        labels = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": name}
        managed = {"metadata": {"labels": {k: "" for k in labels}}}
        meta = self._new_meta({**meta, "labels": labels}, "kube-apiserver", managed)
        obj = {
            "metadata": meta,
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        return with_kind("namespaces", copy.deepcopy(self._write("namespaces", "ADDED", obj, None)))

    def get_namespace(self, name: str) -> Obj:
        return with_kind("namespaces", copy.deepcopy(self._get("namespaces", "", name)))

    def list_namespaces(self, label_selector: str = "", field_selector: str = "", **kw: Any) -> Obj:
        return self.list("namespaces", None, label_selector, field_selector, **kw)

    # -- pods -----------------------------------------------------------------
    def create_pod(self, ns: str, body: Obj, *, manager: str = "unknown") -> Obj:
        """Validate, default and store a pod; returns it (the body of the 201)."""
        self._require_namespace(ns)
        podspec.check_pod_shape(body)
        meta = dict(body.get("metadata") or {})
        if meta.get("namespace") and meta["namespace"] != ns:
            raise status.bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        meta["namespace"] = ns
        generated = not meta.get("name") and bool(meta.get("generateName"))
        if generated:
            meta["name"] = meta["generateName"] + podspec.random_suffix()
            while (ns, meta["name"]) in self._objects["pods"]:
                meta["name"] = meta["generateName"] + podspec.random_suffix()
        pod = podspec.prepare_pod({**body, "metadata": meta})
        name = pod["metadata"]["name"]
        if (ns, name) in self._objects["pods"]:
            raise status.already_exists("pods", name)
        managed = {
            "metadata": {
                k: v for k, v in body.get("metadata", {}).items() if k in ("labels", "annotations")
            },
            "spec": body.get("spec") or {},
        }
        pod_meta = self._new_meta(pod["metadata"], manager, managed)
        obj = {
            "metadata": pod_meta,
            "spec": pod["spec"],
            "status": {"phase": "Pending", "qosClass": podspec.qos_class(pod)},
        }
        return with_kind("pods", copy.deepcopy(self._write("pods", "ADDED", obj, None)))

    def get_pod(self, ns: str, name: str) -> Obj:
        """The pod (404 if absent)."""
        return with_kind("pods", copy.deepcopy(self._get("pods", ns, name)))

    def list_pods(
        self, ns: str | None, label_selector: str = "", field_selector: str = "", **kw: Any
    ) -> Obj:
        """A PodList (``limit``/``continue_token`` keywords page it)."""
        return self.list("pods", ns, label_selector, field_selector, **kw)

    def update_pod(
        self,
        ns: str,
        name: str,
        mutate: Callable[[Obj], None],
        *,
        manager: str = "kubelet",
        subresource: str = "status",
    ) -> Obj:
        """Apply ``mutate`` to a copy of the pod and store it (MODIFIED); no-ops don't write.

        ``mutate`` must not change identity (name, namespace, uid, creationTimestamp).
        A deleting pod whose grace period reached 0 and whose finalizers are gone is
        removed (DELETED), as the real registry does.
        """
        old = self._get("pods", ns, name)
        new = copy.deepcopy(old)
        mutate(new)
        for key in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            new["metadata"][key] = old["metadata"][key]
        if new == old:
            return with_kind("pods", copy.deepcopy(old))
        if subresource == "status" and new.get("status") != old.get("status"):
            self._touch_managed(new, manager, subresource, {"status": new.get("status") or {}})
        meta = new["metadata"]
        finished = meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") == 0
        if finished and not meta.get("finalizers"):
            return with_kind("pods", copy.deepcopy(self._write("pods", "DELETED", new, old)))
        return with_kind("pods", copy.deepcopy(self._write("pods", "MODIFIED", new, old)))

    @staticmethod
    def _touch_managed(obj: Obj, manager: str, subresource: str, managed: Obj) -> None:
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

    def delete_pod(
        self,
        ns: str,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        preconditions: Mapping[str, Any] | None = None,
        propagation_policy: str | None = None,
    ) -> Obj:
        """The DELETE verb (notes §3.3); returns the pod for the 200 response."""
        pod = self._get("pods", ns, name)
        self._check_preconditions(pod, preconditions or {})
        if propagation_policy not in (None, "", "Orphan", "Background", "Foreground"):
            raise status.invalid(
                "DeleteOptions",
                "",
                [
                    status.not_supported(
                        "propagationPolicy",
                        propagation_policy,
                        ["Foreground", "Background", "Orphan", "nil"],
                    )
                ],
            )
        meta, spec = pod["metadata"], pod["spec"]
        pending = meta.get("deletionTimestamp") is not None
        if pending:
            current = meta.get("deletionGracePeriodSeconds")
            if current and grace_period_seconds is not None and grace_period_seconds < current:
                return self.mark_deleting(ns, name, max(grace_period_seconds, 0))
            return with_kind("pods", copy.deepcopy(pod))
        grace = grace_period_seconds
        if grace is None:
            grace = int(spec.get("terminationGracePeriodSeconds") or 0)
        if not spec.get("nodeName") or pod.get("status", {}).get("phase") in _TERMINAL_PHASES:
            grace = 0
        if grace < 0:
            grace = 1
        return self.mark_deleting(ns, name, grace)

    @staticmethod
    def _check_preconditions(pod: Obj, pre: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            want = pre.get(key)
            if want and want != meta.get(key):
                raise status.conflict(
                    "Pod",
                    meta["name"],
                    f"Precondition failed: {label} in precondition: {want}, "
                    f"{label} in object meta: {meta.get(key)}",
                )

    def mark_deleting(self, ns: str, name: str, grace: int) -> Obj:
        """Start (or shorten) a graceful deletion; grace 0 removes at once (DELETED).

        Returns the pod as the DELETE response shows it.
        """
        old = self._get("pods", ns, name)
        meta = old["metadata"]
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and grace >= current:
            return with_kind("pods", copy.deepcopy(old))
        if grace == 0 and not meta.get("finalizers"):
            self._write("pods", "DELETED", old, old)
            return with_kind("pods", copy.deepcopy(old))
        new = copy.deepcopy(old)
        new_meta = new["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        if new_meta.get("deletionTimestamp") and current is not None:
            start = _parse_time(new_meta["deletionTimestamp"]) - datetime.timedelta(seconds=current)
        else:
            start = now
            new_meta["generation"] = int(new_meta.get("generation", 1)) + 1
        new_meta["deletionTimestamp"] = rfc3339(start + datetime.timedelta(seconds=grace))
        new_meta["deletionGracePeriodSeconds"] = grace
        new["metadata"] = podspec.ordered(new_meta, podspec.META_ORDER)
        return with_kind("pods", copy.deepcopy(self._write("pods", "MODIFIED", new, old)))

    def remove_pod(self, ns: str, name: str) -> Obj:
        """Final removal once the containers are down (DELETED); finalizers keep the pod."""
        old = self._get("pods", ns, name)
        if old["metadata"].get("finalizers"):
            return self.mark_deleting(ns, name, 0)
        self._write("pods", "DELETED", old, old)
        return with_kind("pods", copy.deepcopy(old))

    # -- events ---------------------------------------------------------------
    def record_event(
        self,
        ns: str,
        pod: Obj,
        type_: str,
        reason: str,
        message: str,
        *,
        component: str = "kubelet",
        host: str | None = None,
        field_path: str | None = None,
    ) -> Obj:
        """Record a core/v1 Event about ``pod``; repeats bump ``count`` (MODIFIED)."""
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
        source: Obj = {"component": component}
        if host:
            source["host"] = host
        now = rfc3339()
        for existing in self._objects["events"].values():
            same = existing["involvedObject"]
            if (
                existing["metadata"]["namespace"] == ns
                and same.get("uid") == involved["uid"]
                and same.get("fieldPath") == involved.get("fieldPath")
                and (existing["reason"], existing["message"], existing["type"])
                == (reason, message, type_)
                and existing["source"] == source
            ):
                new = copy.deepcopy(existing)
                new["count"] = int(new.get("count", 1)) + 1
                new["lastTimestamp"] = now
                return with_kind(
                    "events", copy.deepcopy(self._write("events", "MODIFIED", new, existing))
                )
        event_meta = self._new_meta(
            {"name": f"{involved['name']}.{time.time_ns():x}", "namespace": ns},
            component,
            {"count": 1, "firstTimestamp": 1, "involvedObject": involved, "lastTimestamp": 1},
        )
        event_meta.pop("generation")
        event: Obj = {
            "metadata": event_meta,
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": source,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": host or "",
        }
        stored = self._write("events", "ADDED", event, None)
        events = self._objects["events"]
        while len(events) > self.max_events:
            oldest = min(events.values(), key=lambda e: int(e["metadata"]["resourceVersion"]))
            self._write("events", "DELETED", oldest, oldest)
        return with_kind("events", copy.deepcopy(stored))

    def list_events(
        self, ns: str | None, label_selector: str = "", field_selector: str = "", **kw: Any
    ) -> Obj:
        """An EventList."""
        return self.list("events", ns, label_selector, field_selector, **kw)

    # -- generic list and watch ---------------------------------------------
    def _filter(
        self, resource: str, ns: str | None, label_selector: str, field_selector: str
    ) -> _Filter:
        if ns is not None and _KINDS[resource].namespaced:
            self._require_namespace(ns)
        return _Filter(
            resource,
            ns if _KINDS[resource].namespaced else None,
            parse_label_selector(label_selector or ""),
            parse_field_selector(field_selector or "", _KINDS[resource].allowed_fields),
        )

    def _matching(self, flt: _Filter) -> Iterator[tuple[tuple[str, str], Obj]]:
        for key in sorted(self._objects[flt.resource]):
            obj = self._objects[flt.resource][key]
            if flt.matches(obj):
                yield key, obj

    def list(
        self,
        resource: str,
        ns: str | None,
        label_selector: str = "",
        field_selector: str = "",
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Obj:
        """A ``<Kind>List`` with ``metadata.resourceVersion``; items lack kind/apiVersion."""
        flt = self._filter(resource, ns, label_selector, field_selector)
        list_rv, start = self._rv, ("", "")
        if continue_token:
            list_rv, start = self._decode_continue(continue_token)
        items = [(k, o) for k, o in self._matching(flt) if not continue_token or k > start]
        meta: Obj = {"resourceVersion": str(list_rv)}
        if limit and limit > 0 and len(items) > limit:
            last = items[limit - 1][0]
            meta["continue"] = _encode_continue(list_rv, last)
            if flt.labels.empty and flt.fields.empty:
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{_KINDS[resource].kind}List",
            "apiVersion": "v1",
            "metadata": meta,
            "items": [copy.deepcopy(o) for _, o in items],
        }

    def _decode_continue(self, token: str) -> tuple[int, tuple[str, str]]:
        try:
            data = json.loads(base64.b64decode(token, validate=False))
            rv, start = int(data["rv"]), str(data["start"])
            ns, _, name = start.rstrip("\x00").partition("/")
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise status.bad_request(
                "continue key is not valid: incorrect encoded start resourceVersion "
                "(version meta.k8s.io/v1)"
            ) from None
        if rv < self._compacted:
            raise status.gone(
                "The provided continue parameter is too old to display a consistent list "
                "result. You can start a new list without the continue parameter, or use the "
                "continue token in this response to retrieve the remainder of the results. "
                "Continuing with the provided token results in an inconsistent list - objects "
                "that were created, modified, or deleted between the time the first chunk was "
                "returned and now may show up in the list."
            )
        return rv, (ns, name)

    def watch(
        self,
        resource: str,
        ns: str | None,
        *,
        resource_version: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        bookmarks: bool = False,
        timeout_seconds: float | None = None,
        stop: trio.Event | None = None,
        send_initial_events: bool = False,
    ) -> Watch:
        """Start a watch (must be called in trio); raises 400 for bad selectors / RVs."""
        flt = self._filter(resource, ns, label_selector, field_selector)
        if timeout_seconds is None or timeout_seconds <= 0:
            timeout_seconds = self.min_request_timeout * (1 + random.random())
        deadline = trio.current_time() + timeout_seconds
        initial: list[Obj] = []
        rv_text = resource_version or ""
        if rv_text in ("", "0") or send_initial_events:
            initial = [
                {"type": "ADDED", "object": with_kind(resource, o)} for _, o in self._matching(flt)
            ]
            if send_initial_events and bookmarks:
                mark = self.bookmark(resource)
                mark["object"]["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
                initial.append(mark)
        else:
            try:
                rv = int(rv_text)
                if rv < 0:
                    raise ValueError(rv_text)
            except ValueError:
                raise status.bad_request(f'invalid resource version "{rv_text}"') from None
            if rv < self._compacted:
                error = status.expired_status(f"too old resource version: {rv} ({self._compacted})")
                watch = Watch(
                    self,
                    flt,
                    initial=[{"type": "ERROR", "object": error}],
                    bookmarks=False,
                    deadline=deadline,
                    stop=None,
                    buffer=1,
                )
                watch._send.close()
                return watch
            for change in self._history:
                if change.rv > rv and change.resource == resource:
                    event = _event_for(flt, change)
                    if event is not None:
                        initial.append({"type": event[0], "object": with_kind(resource, event[1])})
        watch = Watch(
            self,
            flt,
            initial=initial,
            bookmarks=bookmarks,
            deadline=deadline,
            stop=stop,
            buffer=self.watch_buffer,
        )
        self._watchers.add(watch)
        return watch

    def watch_pods(self, ns: str | None, **kw: Any) -> Watch:
        """:meth:`watch` on pods."""
        return self.watch("pods", ns, **kw)

    def bookmark(self, resource: str) -> Obj:
        """A BOOKMARK event at the current RV."""
        meta = {"resourceVersion": str(self._rv), "creationTimestamp": None}
        obj: Obj = {"metadata": meta}
        if resource == "pods":
            obj.update(spec={"containers": None}, status={})
        return {"type": "BOOKMARK", "object": with_kind(resource, obj)}

    def drop_watches(self) -> None:
        """End every open watch (they drain what they already have)."""
        for watch in list(self._watchers):
            watch._send.close()
        self._watchers.clear()

    def statistics(self) -> Obj:
        return {
            "resourceVersion": self._rv,
            "compacted": self._compacted,
            "history": len(self._history),
            "watchers": len(self._watchers),
            "objects": {k: len(v) for k, v in self._objects.items()},
        }

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={len(v)}" for k, v in self._objects.items())
        return f"<Store rv={self._rv} {counts} watchers={len(self._watchers)}>"


def _encode_continue(rv: int, key: tuple[str, str]) -> str:
    start = f"{key[0]}/{key[1]}\x00"
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode()
