"""Create-time pod preparation: shape check, defaulting, validation and QoS class.

Theory of operation
-------------------
A real API server turns a submitted pod into the stored pod in three steps,
and :func:`prepare_pod` does the same, in the same order:

1. *Defaulting* during decoding (``pkg/apis/core/v1/defaults.go``):
   ``restartPolicy``, ``terminationGracePeriodSeconds``, ``dnsPolicy``,
   ``schedulerName``, ``securityContext``, ``enableServiceLinks``, and per
   container ``imagePullPolicy`` (``Always`` for ``:latest`` or no tag),
   ``terminationMessagePath/Policy``, ``resources``, port protocols, probe
   timings; requests default to limits.
2. *Admission*: the ServiceAccount plugin sets ``serviceAccountName: default``
   and adds the ``kube-api-access-xxxxx`` projected volume and its read-only
   mount; DefaultTolerationSeconds adds the two 300 s ``not-ready`` /
   ``unreachable`` tolerations; Priority sets ``priority: 0`` and
   ``preemptionPolicy``.
3. *Validation* (``pkg/apis/core/validation``): a 422 ``Invalid`` Status whose
   causes carry the real field paths and messages (RFC 1123 names, qualified
   label keys, label values, required fields, supported values).

Steps 1 and 2 live in :mod:`.poddefaults`, the name checks (:func:`is_dns1123_label`,
:func:`is_qualified_name`, ...) in :mod:`.namevalidation`; this module holds the decode
shape check (400s), the pod validation (422s), the QoS class and :func:`prepare_pod`,
and re-exports the public names of the other two.
"""


from __future__ import annotations

import copy
import re
from fractions import Fraction
from typing import Any

from . import status
from .namevalidation import is_dns1123_label as is_dns1123_label
from .namevalidation import is_dns1123_subdomain as is_dns1123_subdomain
from .namevalidation import is_qualified_name as is_qualified_name
from .namevalidation import is_valid_label_value as is_valid_label_value
from .namevalidation import mask_trailing_dash as mask_trailing_dash
from .namevalidation import validate_labels as validate_labels
from .namevalidation import validate_object_meta as validate_object_meta
from .poddefaults import META_ORDER as META_ORDER
from .poddefaults import NAME_ALPHABET as NAME_ALPHABET
from .poddefaults import SERVICE_ACCOUNT_MOUNT as SERVICE_ACCOUNT_MOUNT
from .poddefaults import default_pod as default_pod
from .poddefaults import ordered as ordered
from .poddefaults import pull_policy as pull_policy
from .poddefaults import random_suffix as random_suffix
from .status import FieldError

# -- shape checks (decode errors are 400s) ---------------------------------


def _decode_error(message: str) -> status.ApiStatusError:
    return status.bad_request(f'Pod in version "v1" cannot be handled as a Pod: {message}')


def _check_type(value: Any, want: type | tuple[type, ...], go_field: str, go_type: str) -> None:
    if value is None or (isinstance(value, want) and not (want is int and isinstance(value, bool))):
        return
    kind = {str: "string", bool: "bool", list: "array", dict: "object"}.get(type(value), "number")
    raise _decode_error(
        f"json: cannot unmarshal {kind} into Go struct field {go_field} of type {go_type}"
    )


def check_pod_shape(body: Any) -> None:
    """Reject bodies a Go decoder could not unmarshal into a Pod (400)."""
    if not isinstance(body, dict):
        raise _decode_error("json: cannot unmarshal non-object into Go value of type v1.Pod")
    _check_type(body.get("metadata"), dict, "Pod.metadata", "v1.ObjectMeta")
    _check_type(body.get("spec"), dict, "Pod.spec", "v1.PodSpec")
    meta = body.get("metadata") or {}
    for key in ("name", "generateName", "namespace"):
        _check_type(meta.get(key), str, f"ObjectMeta.metadata.{key}", "string")
    for key in ("labels", "annotations"):
        _check_type(meta.get(key), dict, f"ObjectMeta.metadata.{key}", "map[string]string")
        for value in (meta.get(key) or {}).values():
            _check_type(value, str, f"ObjectMeta.metadata.{key}", "map[string]string")
    spec = body.get("spec") or {}
    for key in ("containers", "initContainers", "volumes", "tolerations"):
        _check_type(spec.get(key), list, f"PodSpec.spec.{key}", "[]v1.Container")
        for item in spec.get(key) or []:
            _check_type(item, dict, f"PodSpec.spec.{key}", "v1.Container")
    for ctr in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for key in ("name", "image", "workingDir", "imagePullPolicy"):
            _check_type(ctr.get(key), str, f"Container.spec.containers.{key}", "string")
        for key in ("command", "args"):
            _check_type(ctr.get(key), list, f"Container.spec.containers.{key}", "[]string")
            for arg in ctr.get(key) or []:
                _check_type(arg, str, f"Container.spec.containers.{key}", "[]string")
    _check_type(
        spec.get("terminationGracePeriodSeconds"),
        int,
        "PodSpec.spec.terminationGracePeriodSeconds",
        "int64",
    )


# -- validation -------------------------------------------------------------

_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_DNS_POLICIES = ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None")


def _validate_container(
    ctr: dict[str, Any], path: str, names: set[str], volumes: set[str]
) -> list[FieldError]:
    errs: list[FieldError] = []
    name = ctr.get("name") or ""
    if not name:
        errs.append(status.required(f"{path}.name"))
    else:
        errs.extend(status.invalid_value(f"{path}.name", name, m) for m in is_dns1123_label(name))
        if name in names:
            errs.append(status.duplicate(f"{path}.name", name))
        names.add(name)
    if not ctr.get("image"):
        errs.append(status.required(f"{path}.image"))
    policy = ctr.get("imagePullPolicy")
    if policy not in _PULL_POLICIES:
        errs.append(status.not_supported(f"{path}.imagePullPolicy", policy, _PULL_POLICIES))
    for i, port in enumerate(ctr.get("ports") or []):
        number = port.get("containerPort")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            errs.append(
                status.invalid_value(
                    f"{path}.ports[{i}].containerPort",
                    number or 0,
                    "must be between 1 and 65535, inclusive",
                )
            )
    for i, env in enumerate(ctr.get("env") or []):
        if not env.get("name"):
            errs.append(status.required(f"{path}.env[{i}].name"))
    for i, mount in enumerate(ctr.get("volumeMounts") or []):
        mount_name = mount.get("name") or ""
        if not mount_name:
            errs.append(status.required(f"{path}.volumeMounts[{i}].name"))
        elif mount_name not in volumes:
            errs.append(
                FieldError(
                    f"{path}.volumeMounts[{i}].name",
                    "FieldValueNotFound",
                    f'Not found: "{mount_name}"',
                )
            )
        if not mount.get("mountPath"):
            errs.append(status.required(f"{path}.volumeMounts[{i}].mountPath"))
    return errs


def validate_pod(pod: dict[str, Any]) -> list[FieldError]:
    """All validation errors of a defaulted pod (empty list = valid)."""
    meta = pod.get("metadata") or {}
    errs = validate_object_meta(meta, namespaced=True)
    spec = pod.get("spec") or {}
    volumes: set[str] = set()
    for i, volume in enumerate(spec.get("volumes") or []):
        vname = volume.get("name") or ""
        if not vname:
            errs.append(status.required(f"spec.volumes[{i}].name"))
            continue
        errs.extend(
            status.invalid_value(f"spec.volumes[{i}].name", vname, m)
            for m in is_dns1123_label(vname)
        )
        if vname in volumes:
            errs.append(status.duplicate(f"spec.volumes[{i}].name", vname))
        volumes.add(vname)
    names: set[str] = set()
    for i, ctr in enumerate(spec.get("initContainers") or []):
        errs.extend(_validate_container(ctr, f"spec.initContainers[{i}]", names, volumes))
    containers = spec.get("containers") or []
    if not containers:
        errs.append(status.required("spec.containers"))
    for i, ctr in enumerate(containers):
        errs.extend(_validate_container(ctr, f"spec.containers[{i}]", names, volumes))
    if spec.get("restartPolicy") not in _RESTART_POLICIES:
        errs.append(
            status.not_supported("spec.restartPolicy", spec.get("restartPolicy"), _RESTART_POLICIES)
        )
    if spec.get("dnsPolicy") not in _DNS_POLICIES:
        errs.append(status.not_supported("spec.dnsPolicy", spec.get("dnsPolicy"), _DNS_POLICIES))
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        errs.append(
            status.invalid_value(
                "spec.activeDeadlineSeconds",
                deadline,
                "must be between 1 and 2147483647, inclusive",
            )
        )
    errs.extend(validate_labels(spec.get("nodeSelector"), "spec.nodeSelector"))
    return errs


# -- QoS --------------------------------------------------------------------

_SUFFIXES = {
    "": Fraction(1),
    "m": Fraction(1, 1000),
    "u": Fraction(1, 10**6),
    "n": Fraction(1, 10**9),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
_QUANTITY = re.compile(
    r"([+-]?(?:\d+\.?\d*|\.\d+))((?:[eE][+-]?\d+)|Ki|Mi|Gi|Ti|Pi|Ei|[munkMGTPE])?"
)


def parse_quantity(value: Any) -> Fraction:
    """A ``resource.Quantity`` string (``100m``, ``1Gi``, ``1e3``) as an exact number."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Fraction(value)
    match = _QUANTITY.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"quantities must match the regular expression: {value!r}")
    number, suffix = Fraction(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _SUFFIXES[suffix]


def qos_class(pod: dict[str, Any]) -> str:
    """``GetPodQOS``: ``Guaranteed``, ``Burstable`` or ``BestEffort`` (cpu/memory only)."""
    spec = pod.get("spec") or {}
    requests: dict[str, Fraction] = {}
    limits: dict[str, Fraction] = {}
    guaranteed = True
    for ctr in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        resources = ctr.get("resources") or {}
        ctr_limits: set[str] = set()
        for kind, into in (("requests", requests), ("limits", limits)):
            for name, raw in (resources.get(kind) or {}).items():
                if name not in ("cpu", "memory"):
                    continue
                try:
                    quantity = parse_quantity(raw)
                except ValueError:
                    continue
                if quantity > 0:
                    into[name] = into.get(name, Fraction(0)) + quantity
                    if kind == "limits":
                        ctr_limits.add(name)
        if ctr_limits != {"cpu", "memory"}:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if (
        guaranteed
        and set(requests) == set(limits)
        and all(requests[k] == limits[k] for k in requests)
    ):
        return "Guaranteed"
    return "Burstable"


# -- the whole step -----------------------------------------------------------


def prepare_pod(body: dict[str, Any]) -> dict[str, Any]:
    """Check, default, admit and validate a submitted pod; returns a new dict.

    Raises 400 for undecodable bodies and 422 ``Invalid`` for validation
    errors. ``metadata.name`` (after generateName) and ``metadata.namespace``
    must already be filled in by the caller.
    """
    check_pod_shape(body)
    pod = copy.deepcopy(body)
    pod.setdefault("metadata", {})
    default_pod(pod)
    errs = validate_pod(pod)
    if errs:
        raise status.invalid("Pod", str(pod["metadata"].get("name") or ""), errs)
    return pod
