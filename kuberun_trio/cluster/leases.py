"""``coordination.k8s.io/v1`` Leases: decoding, validation and the update rules.

Theory of operation
-------------------
A Lease is metadata plus a ``spec`` (``holderIdentity``, ``leaseDurationSeconds``,
``acquireTime``, ``renewTime``, ``leaseTransitions``); it has no status. The functions
here are pure and the :class:`~.store.Store` applies them, so the rules read like the
registry's (``pkg/registry/coordination/lease`` and ``pkg/apis/coordination/validation``):

* **Decoding** (:func:`decode`) is what the JSON decoder refuses with a 400
  ``BadRequest``: a body that is not an object, wrong ``kind``/``apiVersion``, a field of
  the wrong type, and a time that is not a ``MicroTime``
  (``2006-01-02T15:04:05.000000Z07:00`` -- exactly six fraction digits). Times are stored
  as the server writes them: UTC with ``Z``.
* **Validation** (:func:`validate`) is the 422 ``Invalid``: ObjectMeta (a DNS-1123
  subdomain name), ``leaseDurationSeconds`` > 0, ``leaseTransitions`` >= 0.
* **Update** (PUT) needs ``metadata.resourceVersion`` (leases do not allow unconditional
  updates: 422), and a stale one is the 409 ``Conflict``; a PUT to a Lease that does not
  exist creates it (``AllowCreateOnUpdate``). Identity fields (uid, creationTimestamp)
  are kept from the stored object.
* **Delete** removes at once (no graceful deletion) and answers a ``Success`` Status;
  ``preconditions`` (uid, resourceVersion) that do not hold are a 409 ``Conflict``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from . import podspec, status
from .namevalidation import validate_object_meta
from .objects import COORDINATION, Obj, clone, fields_v1, new_meta

GROUP = COORDINATION
API_VERSION = f"{GROUP}/v1"
MICRO_TIME_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"
_MICRO_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})(Z|[+-]\d\d:\d\d)")
_INT_FIELDS = ("leaseDurationSeconds", "leaseTransitions")
_STR_FIELDS = ("holderIdentity", "preferredHolder", "strategy")
_TIME_FIELDS = ("acquireTime", "renewTime")
_SPEC_ORDER = ["holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime",
               "leaseTransitions", "strategy", "preferredHolder"]


def format_micro_time(at: datetime.datetime) -> str:
    """``metav1.MicroTime`` as JSON has it: ``2024-05-01T12:00:00.123456Z``."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(text: str) -> datetime.datetime:
    """The inverse of :func:`format_micro_time` (any offset); ``ValueError`` if malformed."""
    m = _MICRO_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f'parsing time "{text}" as "{MICRO_TIME_LAYOUT}": cannot parse')
    zone = m[8]
    iso = text if zone != "Z" else text[:-1] + "+00:00"
    return datetime.datetime.fromisoformat(iso)


def _cannot_handle(detail: str) -> status.ApiStatusError:
    return status.bad_request(f'Lease in version "v1" cannot be handled as a Lease: {detail}')


def decode(body: Any) -> Obj:
    """The Lease in a request body, with times normalised to UTC; raises 400."""
    if not isinstance(body, dict):
        raise _cannot_handle("json: cannot unmarshal into Go value of type coordination.Lease")
    kind, version = body.get("kind"), body.get("apiVersion")
    if version and version != API_VERSION:
        raise status.bad_request(
            f"the API version in the data ({version}) does not match the expected API "
            f"version ({API_VERSION})")
    if kind and kind != "Lease":
        raise status.bad_request(
            f"the kind in the data ({kind}) does not match the expected kind (Lease)")
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise _cannot_handle("json: cannot unmarshal into Go struct field Lease.metadata")
    out: Obj = {}
    for key, value in spec.items():
        if value is None:
            continue
        where = f"Go struct field LeaseSpec.spec.{key}"
        if key in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _cannot_handle(f"json: cannot unmarshal {_json_type(value)} into {where} "
                                     "of type int32")
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                raise _cannot_handle(f"json: cannot unmarshal {_json_type(value)} into {where} "
                                     "of type string")
        elif key in _TIME_FIELDS:
            if not isinstance(value, str):
                raise _cannot_handle(f"json: cannot unmarshal {_json_type(value)} into {where} "
                                     "of type string")
            try:
                value = format_micro_time(parse_micro_time(value))
            except ValueError as exc:
                raise _cannot_handle(str(exc)) from None
        else:
            continue  # unknown fields are dropped, as the decoder does
        out[key] = value
    return {"metadata": dict(meta), "spec": podspec.ordered(out, _SPEC_ORDER)}


def _json_type(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def validate(lease: Obj) -> None:
    """``ValidateLease``: raise the 422 Invalid for a decoded lease that breaks a rule."""
    meta, spec = lease["metadata"], lease["spec"]
    errs = validate_object_meta(meta, namespaced=True)
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        errs.append(status.invalid_value("spec.leaseDurationSeconds", duration,
                                         "must be greater than 0"))
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        errs.append(status.invalid_value("spec.leaseTransitions", transitions,
                                         "must be greater than or equal to 0"))
    if spec.get("preferredHolder") and not spec.get("strategy"):
        errs.append(status.forbidden_field("spec.preferredHolder",
                                           "preferredHolder is only allowed if strategy is set"))
    if errs:
        raise status.invalid("Lease", str(meta.get("name") or ""), errs, group=GROUP)


def check_target(lease: Obj, ns: str, name: str | None) -> None:
    """The body's namespace and name must agree with the URL's (400 otherwise)."""
    meta = lease["metadata"]
    if meta.get("namespace") and meta["namespace"] != ns:
        raise status.bad_request(
            "the namespace of the provided object does not match the namespace sent on the "
            "request")
    if name is not None and meta.get("name") != name:
        raise status.bad_request(
            f"the name of the object ({meta.get('name') or ''}) does not match the name on "
            f"the URL ({name})")


def new_lease(lease: Obj, ns: str, manager: str, suffix: str) -> Obj:
    """The stored form of a Lease being created (``generateName`` gets ``suffix``)."""
    meta = dict(lease["metadata"])
    meta["namespace"] = ns
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = str(meta["generateName"]) + suffix
    managed = {"metadata": {k: v for k, v in meta.items() if k in ("labels", "annotations")},
               "spec": lease["spec"]}
    obj = {"metadata": meta, "spec": lease["spec"]}
    validate(obj)
    obj["metadata"] = new_meta(meta, manager, managed, API_VERSION)
    return obj


def check_update(old: Obj | None, lease: Obj, name: str) -> None:
    """The optimistic-concurrency rules of a PUT (see the module docstring)."""
    rv = str(lease["metadata"].get("resourceVersion") or "")
    if old is None:
        if rv:
            raise status.not_found("leases", name, group=GROUP)
        return
    if not rv:
        raise status.invalid("Lease", name, [status.invalid_value(
            "metadata.resourceVersion", 0, "must be specified for an update")], group=GROUP)
    if rv != old["metadata"]["resourceVersion"]:
        raise status.conflict("leases", name, group=GROUP)


def updated_lease(old: Obj, lease: Obj, manager: str) -> Obj:
    """The stored form after a PUT: the body's labels, annotations and spec; identity kept."""
    meta = clone(old["metadata"])
    body_meta = lease["metadata"]
    for key in ("labels", "annotations", "ownerReferences", "finalizers"):
        if body_meta.get(key) is not None:
            meta[key] = body_meta[key]
        else:
            meta.pop(key, None)
    new = {"metadata": meta, "spec": lease["spec"]}
    validate(new)
    if new["spec"] != old["spec"] or meta != old["metadata"]:
        _touch(meta, manager, {"spec": lease["spec"]})
    return new


def _touch(meta: Obj, manager: str, managed: Mapping[str, Any]) -> None:
    entry = {"manager": manager, "operation": "Update", "apiVersion": API_VERSION,
             "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "fieldsType": "FieldsV1", "fieldsV1": fields_v1(managed)}
    entries = [e for e in meta.get("managedFields") or []
               if not (e.get("manager") == manager and not e.get("subresource"))]
    meta["managedFields"] = [*entries, entry]


def check_preconditions(lease: Obj, preconditions: Mapping[str, Any]) -> None:
    """DeleteOptions ``preconditions`` (uid, resourceVersion): 409 Conflict if unmet."""
    meta = lease["metadata"]
    for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        want = preconditions.get(key)
        if want and want != meta.get(key):
            raise status.conflict(
                "leases", meta["name"],
                f"Precondition failed: {label} in precondition: {want}, "
                f"{label} in object meta: {meta.get(key)}", group=GROUP)


def deleted_status(lease: Obj) -> Obj:
    """The ``Success`` Status a Lease DELETE answers."""
    meta = lease["metadata"]
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": meta["name"], "group": GROUP, "kind": "leases",
                        "uid": meta.get("uid", "")}}
