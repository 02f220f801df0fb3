"""The embedded cluster's object store: namespaces, pods, events and Leases, with watches.

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
  copies. Kind and metadata helpers live in :mod:`.objects`.
* **resourceVersion** is one global counter (like an etcd revision), rendered
  as a string; each write takes the next value.
* **History.** Every write appends a :class:`~.watch.Change` to a bounded
  deque. Dropping the oldest entry raises the *compaction point*: a watch that
  asks to resume from an RV below it gets the 410 ``Expired`` ERROR event
  (``too old resource version: 5 (120)``), as the real watch cache answers,
  and a ``continue`` token from before it is 410 ``Gone`` (:mod:`.paging`).
  :meth:`Store.expire_history` forces that for every RV so far (the
  ``expire_watches`` fault).
* **Watches** (:mod:`.watch`) get synthetic ``ADDED`` events for the current
  matches when started without an RV (or ``"0"``), else the history after the
  RV, then every later write through their filter: :meth:`Store.watch` sets
  them up, :meth:`Store._write` fans each change out to them.
* **Graceful deletion** follows notes §3.3 (rules in :mod:`.deletion`):
  :meth:`Store.delete_pod` computes the grace period, :meth:`Store.mark_deleting`
  records ``deletionTimestamp`` (MODIFIED), and the kubelet calls
  :meth:`Store.remove_pod` once the containers are down (DELETED). Finalizers
  keep an object until removed.
* **Events** (:mod:`.events`): a repeat bumps ``count``; beyond ``max_events``
  the oldest go.
* **Leases** (``coordination.k8s.io/v1``, rules in :mod:`.leases`): create, PUT with
  optimistic concurrency (409 on a stale resourceVersion), delete with preconditions.
* :meth:`Store.subscribe` hands the kubelet every pod change, unfiltered.
"""

from __future__ import annotations

import math
import random
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio

from . import deletion, events, leases, podspec, status
from .objects import (
    KINDS,
    Obj,
    clone,
    fields_v1,
    new_meta,
    rfc3339,
    touch_managed,
    with_kind,
    with_rv,
)
from .paging import decode_continue, encode_continue
from .selectors import parse_field_selector, parse_label_selector
from .watch import Change, Filter, Watch, event_for

__all__ = ["SYSTEM_NAMESPACES", "Obj", "Store", "Watch", "fields_v1", "rfc3339", "with_kind"]

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


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
        self._history: deque[Change] = deque()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in KINDS}
        """Per resource, the objects in the order of their last write (= by resourceVersion)."""
        self._event_keys: dict[tuple[Any, ...], tuple[str, str]] = {}
        """Repeat key (:func:`events.repeat_key`) -> the Event that has it."""
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
        obj = with_rv(obj, self._rv)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self._objects[resource].pop(key, None)  # a write moves the object to the end
        if type_ != "DELETED":
            self._objects[resource][key] = obj
        if resource == "events":
            self._index_event(type_, key, obj, prev)
        change = Change(self._rv, resource, type_, obj, prev)
        self._history.append(change)
        while len(self._history) > self.history_size:
            self._compacted = self._history.popleft().rv
        for watch in list(self._watchers):
            if watch.resource == resource:
                watch.offer(change)
        if resource == "pods":
            for sub in list(self._subscribers):
                try:
                    sub.send_nowait((type_, with_kind("pods", clone(obj))))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(sub)
        return obj

    def _index_event(self, type_: str, key: tuple[str, str], obj: Obj, prev: Obj | None) -> None:
        if prev is not None:
            self._event_keys.pop(events.repeat_key_of(prev), None)
        if type_ != "DELETED":
            self._event_keys[events.repeat_key_of(obj)] = key

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
        meta = new_meta({**meta, "labels": labels}, "kube-apiserver", managed)
        obj = {
            "metadata": meta,
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        return with_kind("namespaces", clone(self._write("namespaces", "ADDED", obj, None)))

    def get_namespace(self, name: str) -> Obj:
        return with_kind("namespaces", clone(self._get("namespaces", "", name)))

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
        pod_meta = new_meta(pod["metadata"], manager, managed)
        obj = {
            "metadata": pod_meta,
            "spec": pod["spec"],
            "status": {"phase": "Pending", "qosClass": podspec.qos_class(pod)},
        }
        return with_kind("pods", clone(self._write("pods", "ADDED", obj, None)))

    def get_pod(self, ns: str, name: str) -> Obj:
        """The pod (404 if absent)."""
        return with_kind("pods", clone(self._get("pods", ns, name)))

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
        new = clone(old)
        mutate(new)
        for key in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            new["metadata"][key] = old["metadata"][key]
        if new == old:
            return with_kind("pods", clone(old))
        if subresource == "status" and new.get("status") != old.get("status"):
            touch_managed(new, manager, subresource, {"status": new.get("status") or {}})
        meta = new["metadata"]
        finished = meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") == 0
        if finished and not meta.get("finalizers"):
            return with_kind("pods", clone(self._write("pods", "DELETED", new, old)))
        return with_kind("pods", clone(self._write("pods", "MODIFIED", new, old)))

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
        deletion.check_options(pod, preconditions or {}, propagation_policy)
        grace = deletion.grace_for(pod, grace_period_seconds)
        if grace is None:
            return with_kind("pods", clone(pod))
        return self.mark_deleting(ns, name, grace)

    def mark_deleting(self, ns: str, name: str, grace: int) -> Obj:
        """Start (or shorten) a graceful deletion; grace 0 removes at once (DELETED).

        Returns the pod as the DELETE response shows it.
        """
        old = self._get("pods", ns, name)
        if not deletion.shortens(old, grace):
            return with_kind("pods", clone(old))
        if grace == 0 and not old["metadata"].get("finalizers"):
            self._write("pods", "DELETED", old, old)
            return with_kind("pods", clone(old))
        new = deletion.marked(old, grace)
        return with_kind("pods", clone(self._write("pods", "MODIFIED", new, old)))

    def remove_pod(self, ns: str, name: str) -> Obj:
        """Final removal once the containers are down (DELETED); finalizers keep the pod."""
        old = self._get("pods", ns, name)
        if old["metadata"].get("finalizers"):
            return self.mark_deleting(ns, name, 0)
        self._write("pods", "DELETED", old, old)
        return with_kind("pods", clone(old))

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
        involved = events.involved_object(ns, pod, field_path)
        src = events.source(component, host)
        now = rfc3339()
        kept = self._objects["events"]
        same = self._event_keys.get(events.repeat_key(ns, involved, src, type_, reason, message))
        if same is not None:
            existing = kept[same]
            new = events.repeated(existing, now)
            return with_kind(
                "events", clone(self._write("events", "MODIFIED", new, existing))
            )
        event = events.new_event(
            ns, involved, src, type_, reason, message, component=component, host=host, now=now
        )
        stored = self._write("events", "ADDED", event, None)
        while len(kept) > self.max_events:
            oldest = next(iter(kept.values()))  # the least recently written
            self._write("events", "DELETED", oldest, oldest)
        return with_kind("events", clone(stored))

    def list_events(
        self, ns: str | None, label_selector: str = "", field_selector: str = "", **kw: Any
    ) -> Obj:
        """An EventList."""
        return self.list("events", ns, label_selector, field_selector, **kw)

    # -- leases (coordination.k8s.io/v1) -------------------------------------
    def create_lease(self, ns: str, body: Any, *, manager: str = "unknown") -> Obj:
        """Decode, validate and store a Lease (the body of the 201); see :mod:`.leases`."""
        self._require_namespace(ns)
        lease = leases.decode(body)
        leases.check_target(lease, ns, None)
        obj = leases.new_lease(lease, ns, manager, podspec.random_suffix())
        name = obj["metadata"]["name"]
        if (ns, name) in self._objects["leases"]:
            raise status.already_exists("leases", name, group=leases.GROUP)
        return with_kind("leases", clone(self._write("leases", "ADDED", obj, None)))

    def get_lease(self, ns: str, name: str) -> Obj:
        """The Lease (404 if absent)."""
        obj = self._objects["leases"].get((ns, name))
        if obj is None:
            raise status.not_found("leases", name, group=leases.GROUP)
        return with_kind("leases", clone(obj))

    def update_lease(self, ns: str, name: str, body: Any, *,
                     manager: str = "unknown") -> tuple[Obj, bool]:
        """PUT: ``(lease, created)``; 409 on a stale resourceVersion (see :mod:`.leases`)."""
        self._require_namespace(ns)
        lease = leases.decode(body)
        leases.check_target(lease, ns, name)
        old = self._objects["leases"].get((ns, name))
        leases.check_update(old, lease, name)
        if old is None:
            lease["metadata"]["name"] = name
            obj = leases.new_lease(lease, ns, manager, "")
            return with_kind("leases", clone(self._write("leases", "ADDED", obj, None))), True
        new = leases.updated_lease(old, lease, manager)
        if new == old:
            return with_kind("leases", clone(old)), False
        return with_kind("leases", clone(self._write("leases", "MODIFIED", new, old))), False

    def delete_lease(self, ns: str, name: str, *,
                     preconditions: Mapping[str, Any] | None = None) -> Obj:
        """Remove a Lease at once; the ``Success`` Status of the 200."""
        self._require_namespace(ns)
        old = self._objects["leases"].get((ns, name))
        if old is None:
            raise status.not_found("leases", name, group=leases.GROUP)
        leases.check_preconditions(old, preconditions or {})
        self._write("leases", "DELETED", old, old)
        return leases.deleted_status(old)

    # -- generic list and watch ---------------------------------------------
    def _filter(
        self, resource: str, ns: str | None, label_selector: str, field_selector: str
    ) -> Filter:
        if ns is not None and KINDS[resource].namespaced:
            self._require_namespace(ns)
        return Filter(
            resource,
            ns if KINDS[resource].namespaced else None,
            parse_label_selector(label_selector or ""),
            parse_field_selector(field_selector or "", KINDS[resource].allowed_fields),
        )

    def _matching(self, flt: Filter) -> Iterator[tuple[tuple[str, str], Obj]]:
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
            list_rv, start = decode_continue(continue_token, self._compacted)
        items = [(k, o) for k, o in self._matching(flt) if not continue_token or k > start]
        meta: Obj = {"resourceVersion": str(list_rv)}
        if limit and limit > 0 and len(items) > limit:
            last = items[limit - 1][0]
            meta["continue"] = encode_continue(list_rv, last)
            if flt.labels.empty and flt.fields.empty:
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{KINDS[resource].kind}List",
            "apiVersion": KINDS[resource].api_version,
            "metadata": meta,
            "items": [clone(o) for _, o in items],
        }

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
                watch.end()
                return watch
            for change in self._history:
                if change.rv > rv and change.resource == resource:
                    event = event_for(flt, change)
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
            watch.end()
        self._watchers.clear()

    def count(self, resource: str, ns: str | None = None) -> int:
        """How many objects of ``resource`` (in ``ns``; None: all) are stored -- no copies."""
        return sum(1 for key in self._objects[resource] if ns is None or key[0] == ns)

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
