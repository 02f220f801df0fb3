"""Create-time pod defaulting, validation and QoS class.

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

JSON key order follows the Go structs so responses read like the real ones.
The name checks (:func:`is_dns1123_label`, :func:`is_qualified_name`, ...) are
shared with :mod:`.selectors`.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from . import status
from .status import FieldError

# -- name validation (apimachinery pkg/util/validation) --------------------

_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + ")*"
_QNAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = "(" + _QNAME + ")?"


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    text = msg + " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            text += " or "
        text += f"'{example}', "
    return text + f"regex used for validation is '{fmt}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)
_QNAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character"
)


def is_dns1123_label(value: str) -> list[str]:
    """``IsDNS1123Label``: error messages, empty if valid."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not re.fullmatch(_DNS1123_LABEL, value):
        if re.fullmatch(_DNS1123_SUBDOMAIN, value):
            errs.append("must not contain dots")
        else:
            errs.append(_regex_error(_LABEL_MSG, _DNS1123_LABEL, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    """``IsDNS1123Subdomain``."""
    errs = []
    if len(value) > 253:
        errs.append(_max_len(253))
    if not re.fullmatch(_DNS1123_SUBDOMAIN, value):
        errs.append(_regex_error(_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN, "example.com"))
    return errs


def is_qualified_name(value: str) -> list[str]:
    """``IsQualifiedName`` (label and annotation keys)."""
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            "a qualified name "
            + _regex_error(_QNAME_MSG, _QNAME, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part " + _max_len(63))
    if not re.fullmatch(_QNAME, name):
        errs.append("name part " + _regex_error(_QNAME_MSG, _QNAME, "MyName", "my.name", "123-abc"))
    return errs


def is_valid_label_value(value: str) -> list[str]:
    """``IsValidLabelValue``."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not re.fullmatch(_LABEL_VALUE, value):
        errs.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE, "MyValue", "my_value", "12345"))
    return errs


def mask_trailing_dash(name: str) -> str:
    """generateName prefixes may end in '-': validate them as if it were a letter."""
    return name[:-1] + "a" if len(name) > 1 and name.endswith("-") else name


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    """``ValidateLabels``: keys as qualified names, values as label values."""
    errs: list[FieldError] = []
    for key in sorted(labels or {}):
        errs.extend(status.invalid_value(path, key, m) for m in is_qualified_name(key))
        value = labels[key]
        errs.extend(status.invalid_value(path, value, m) for m in is_valid_label_value(value))
    return errs


def validate_object_meta(
    meta: dict[str, Any], *, namespaced: bool, name_check: Any = is_dns1123_subdomain
) -> list[FieldError]:
    """``ValidateObjectMeta``: name/generateName, labels, annotation keys."""
    errs: list[FieldError] = []
    generate = meta.get("generateName") or ""
    if generate:
        errs.extend(
            status.invalid_value("metadata.generateName", generate, m)
            for m in name_check(mask_trailing_dash(generate))
        )
    name = meta.get("name") or ""
    if not name:
        errs.append(status.required("metadata.name", "name or generateName is required"))
    else:
        errs.extend(status.invalid_value("metadata.name", name, m) for m in name_check(name))
    if namespaced and not meta.get("namespace"):
        errs.append(status.required("metadata.namespace"))
    errs.extend(validate_labels(meta.get("labels"), "metadata.labels"))
    for key in sorted(meta.get("annotations") or {}):
        errs.extend(
            status.invalid_value("metadata.annotations", key, m)
            for m in is_qualified_name(key.lower())
        )
    return errs


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


# -- defaulting -------------------------------------------------------------

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
"""``utilrand.String`` alphabet (no vowels, no confusable digits)."""


def random_suffix(n: int = 5) -> str:
    """``utilrand.String(n)``: the generateName / kube-api-access suffix."""
    return "".join(random.choice(NAME_ALPHABET) for _ in range(n))


_SPEC_ORDER = [
    "volumes",
    "initContainers",
    "containers",
    "ephemeralContainers",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "dnsPolicy",
    "nodeSelector",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "nodeName",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "shareProcessNamespace",
    "securityContext",
    "imagePullSecrets",
    "hostname",
    "subdomain",
    "affinity",
    "schedulerName",
    "tolerations",
    "hostAliases",
    "priorityClassName",
    "priority",
    "dnsConfig",
    "readinessGates",
    "runtimeClassName",
    "enableServiceLinks",
    "preemptionPolicy",
    "overhead",
    "topologySpreadConstraints",
    "setHostnameAsFQDN",
    "os",
    "hostUsers",
    "schedulingGates",
    "resourceClaims",
]
_CONTAINER_ORDER = [
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "ports",
    "envFrom",
    "env",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "volumeMounts",
    "volumeDevices",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
]
META_ORDER = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
]


def ordered(obj: dict[str, Any], order: Iterable[str]) -> dict[str, Any]:
    """``obj`` with the keys in ``order`` first (Go struct order), the rest after."""
    result = {k: obj[k] for k in order if k in obj}
    result.update((k, v) for k, v in obj.items() if k not in result)
    return result


def pull_policy(image: str) -> str:
    """``Always`` for ``:latest`` or untagged images, else ``IfNotPresent``."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _default_probe(probe: dict[str, Any]) -> None:
    for key, value in (
        ("timeoutSeconds", 1),
        ("periodSeconds", 10),
        ("successThreshold", 1),
        ("failureThreshold", 3),
    ):
        probe.setdefault(key, value)
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"].setdefault("path", "/")
        probe["httpGet"].setdefault("scheme", "HTTP")


def _default_container(ctr: dict[str, Any]) -> dict[str, Any]:
    ctr.setdefault("resources", {})
    resources = ctr["resources"]
    if isinstance(resources, dict) and resources.get("limits") and not resources.get("requests"):
        resources["requests"] = dict(resources["limits"])
    elif isinstance(resources, dict) and resources.get("limits"):
        for key, value in resources["limits"].items():
            resources["requests"].setdefault(key, value)
    for port in ctr.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    for env in ctr.get("env") or []:
        field_ref = isinstance(env, dict) and (env.get("valueFrom") or {}).get("fieldRef")
        if isinstance(field_ref, dict):
            field_ref.setdefault("apiVersion", "v1")
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(ctr.get(key), dict):
            _default_probe(ctr[key])
    ctr.setdefault("terminationMessagePath", "/dev/termination-log")
    ctr.setdefault("terminationMessagePolicy", "File")
    ctr.setdefault("imagePullPolicy", pull_policy(str(ctr.get("image") or "")))
    return ordered(ctr, _CONTAINER_ORDER)


def _admit_service_account(spec: dict[str, Any]) -> None:
    spec["serviceAccountName"] = spec.get("serviceAccountName") or "default"
    spec["serviceAccount"] = spec["serviceAccountName"]
    if spec.get("automountServiceAccountToken") is False:
        return
    containers = (spec.get("initContainers") or []) + spec.get("containers", [])
    if any(
        m.get("mountPath") == SERVICE_ACCOUNT_MOUNT
        for c in containers
        for m in c.get("volumeMounts") or []
    ):
        return
    volume_name = f"kube-api-access-{random_suffix()}"
    spec.setdefault("volumes", []).append(
        {
            "name": volume_name,
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {
                                        "apiVersion": "v1",
                                        "fieldPath": "metadata.namespace",
                                    },
                                }
                            ]
                        }
                    },
                ],
                "defaultMode": 420,
            },
        }
    )
    for ctr in containers:
        ctr.setdefault("volumeMounts", []).append(
            {"name": volume_name, "readOnly": True, "mountPath": SERVICE_ACCOUNT_MOUNT}
        )


def _admit_tolerations(spec: dict[str, Any]) -> None:
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if any(
            isinstance(t, dict)
            and t.get("key") == key
            and t.get("effect") in (None, "", "NoExecute")
            for t in tolerations
        ):
            continue
        tolerations.append(
            {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        )


def default_pod(pod: dict[str, Any]) -> None:
    """Apply API defaults and admission (in place) to a pod whose shape was checked."""
    spec = pod.setdefault("spec", {})
    for volume in spec.get("volumes") or []:
        for kind in ("configMap", "secret", "projected", "downwardAPI"):
            if isinstance(volume.get(kind), dict):
                volume[kind].setdefault("defaultMode", 420)
    for key in ("containers", "initContainers"):
        if isinstance(spec.get(key), list):
            spec[key] = [_default_container(c) for c in spec[key]]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    if spec.get("containers"):
        _admit_service_account(spec)
    _admit_tolerations(spec)
    if not spec.get("priorityClassName"):
        spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    pod["spec"] = ordered(spec, _SPEC_ORDER)


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
