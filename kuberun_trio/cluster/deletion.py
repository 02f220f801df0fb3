"""Graceful pod deletion rules (notes §3.3), as pure functions over stored pods.

Theory of operation
-------------------
``DELETE`` on a pod does not remove it at once. :func:`check_options`
validates the DeleteOptions (preconditions are a 409 Conflict, an unknown
``propagationPolicy`` a 422). :func:`grace_for` picks the grace period the
registry would: the request's, else ``terminationGracePeriodSeconds``; 0 for
an unscheduled or finished pod; a negative request means 1. A pod already
being deleted only accepts a *shorter* grace period. :func:`marked` returns
the copy with ``deletionTimestamp`` (start of the deletion + grace) and
``deletionGracePeriodSeconds``; the store writes it (MODIFIED), or removes the
pod right away when the grace is 0 and no finalizers hold it (DELETED). The
kubelet removes it for good once its containers are down.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from . import podspec, status
from .objects import Obj, clone, parse_time, rfc3339

_TERMINAL_PHASES = ("Succeeded", "Failed")
_POLICIES = (None, "", "Orphan", "Background", "Foreground")


def check_options(
    pod: Obj, preconditions: Mapping[str, Any], propagation_policy: str | None
) -> None:
    """Raise the apiserver's error for unmet preconditions or an unknown policy."""
    meta = pod["metadata"]
    for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        want = preconditions.get(key)
        if want and want != meta.get(key):
            raise status.conflict(
                "Pod",
                meta["name"],
                f"Precondition failed: {label} in precondition: {want}, "
                f"{label} in object meta: {meta.get(key)}",
            )
    if propagation_policy not in _POLICIES:
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


def grace_for(pod: Obj, requested: int | None) -> int | None:
    """The grace period a DELETE starts (or shortens to); None: leave the pod as it is."""
    meta, spec = pod["metadata"], pod["spec"]
    if meta.get("deletionTimestamp") is not None:
        current = meta.get("deletionGracePeriodSeconds")
        if current and requested is not None and requested < current:
            return max(requested, 0)
        return None
    grace = requested
    if grace is None:
        grace = int(spec.get("terminationGracePeriodSeconds") or 0)
    if not spec.get("nodeName") or pod.get("status", {}).get("phase") in _TERMINAL_PHASES:
        grace = 0
    if grace < 0:
        grace = 1
    return grace


def shortens(pod: Obj, grace: int) -> bool:
    """Whether ``grace`` starts a deletion of ``pod`` or shortens the one under way."""
    meta = pod["metadata"]
    current = meta.get("deletionGracePeriodSeconds")
    return not (meta.get("deletionTimestamp") and current is not None and grace >= current)


def marked(pod: Obj, grace: int) -> Obj:
    """A copy of ``pod`` with ``deletionTimestamp``/``deletionGracePeriodSeconds`` set.

    A shortened deletion keeps its start: the new timestamp is start + ``grace``.
    """
    new = clone(pod)
    meta = new["metadata"]
    current = meta.get("deletionGracePeriodSeconds")
    if meta.get("deletionTimestamp") and current is not None:
        start = parse_time(meta["deletionTimestamp"]) - datetime.timedelta(seconds=current)
    else:
        start = datetime.datetime.now(datetime.UTC)
        meta["generation"] = int(meta.get("generation", 1)) + 1
    meta["deletionTimestamp"] = rfc3339(start + datetime.timedelta(seconds=grace))
    meta["deletionGracePeriodSeconds"] = grace
    new["metadata"] = podspec.ordered(meta, podspec.META_ORDER)
    return new
