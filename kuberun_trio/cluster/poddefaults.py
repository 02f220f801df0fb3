"""Create-time pod defaulting and admission, as the API server does them before validation.

Theory of operation
-------------------
:func:`default_pod` changes a decoded pod in place, in the API server's order:

1. *Defaulting* during decoding (``pkg/apis/core/v1/defaults.go``):
   ``restartPolicy``, ``terminationGracePeriodSeconds``, ``dnsPolicy``,
   ``schedulerName``, ``securityContext``, ``enableServiceLinks``, and per
   container ``imagePullPolicy`` (:func:`pull_policy`: ``Always`` for ``:latest`` or no
   tag), ``terminationMessagePath/Policy``, ``resources``, port protocols, probe
   timings; requests default to limits.
2. *Admission*: the ServiceAccount plugin sets ``serviceAccountName: default``
   and adds the ``kube-api-access-xxxxx`` projected volume and its read-only
   mount; DefaultTolerationSeconds adds the two 300 s ``not-ready`` /
   ``unreachable`` tolerations; Priority sets ``priority: 0`` and
   ``preemptionPolicy``.

JSON key order follows the Go structs (:func:`ordered` with the ``*_ORDER`` lists) so
responses read like the real ones. :func:`random_suffix` is ``utilrand.String``, also
used for ``generateName``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

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
