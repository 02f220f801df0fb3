"""A container's environment: ``env``, ``envFrom``, ``$(VAR)`` expansion, the downward API.

Theory of operation
-------------------
:func:`container_env` builds the variables of one container the way the
kubelet's ``makeEnvironmentVariables`` does, in spec order: a ``value`` is
expanded against the variables defined before it (:func:`expand`: defined
``$(NAME)`` replaced, undefined left as written, ``$$`` is ``$``); a
``valueFrom.fieldRef`` reads the downward API (:func:`downward_fields`, plus
``metadata.labels['k']`` and ``metadata.annotations['k']``). Secrets and
config maps do not exist in the embedded cluster: a reference to one is
:class:`EnvError` -- the container waits in ``CreateContainerConfigError`` --
unless marked optional. The sandbox then adds HOSTNAME and PATH.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Obj = dict[str, Any]


class EnvError(Exception):
    """The environment cannot be built (``CreateContainerConfigError``)."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = text.find(")", i + 2) if text[i + 1] == "(" else -1
            if end != -1:
                name = text[i + 2 : end]
                out.append(env[name] if name in env else text[i : end + 1])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def downward_fields(
    pod: Obj, *, ns: str, name: str, uid: str, node_name: str, host_ip: str
) -> dict[str, str]:
    """The simple ``fieldRef.fieldPath`` values of a pod on this node."""
    return {
        "metadata.name": name,
        "metadata.namespace": ns,
        "metadata.uid": uid,
        "spec.nodeName": node_name,
        "spec.serviceAccountName": str(pod["spec"].get("serviceAccountName", "")),
        "status.podIP": host_ip,
        "status.podIPs": host_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }


def value_from(source: Obj, pod: Obj, fields: Mapping[str, str]) -> str:
    """``env[].valueFrom``: the downward API; secrets and config maps do not exist here."""
    if "fieldRef" in source:
        path = source["fieldRef"].get("fieldPath", "")
        meta = pod["metadata"]
        if path in fields:
            return fields[path]
        for prefix, key in (
            ("metadata.labels['", "labels"),
            ("metadata.annotations['", "annotations"),
        ):
            if path.startswith(prefix) and path.endswith("']"):
                return str((meta.get(key) or {}).get(path[len(prefix) : -2], ""))
        raise EnvError(f"unsupported fieldPath: {path}")
    for ref, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
        if ref in source:
            if source[ref].get("optional"):
                return ""
            raise EnvError(f'{kind} "{source[ref].get("name", "")}" not found')
    return ""


def container_env(spec: Obj, pod: Obj, fields: Mapping[str, str]) -> dict[str, str]:
    """The variables of container ``spec`` of ``pod`` (before the sandbox adds its own)."""
    env: dict[str, str] = {}
    for item in spec.get("env") or ():
        if "valueFrom" in item:
            env[item["name"]] = value_from(item["valueFrom"], pod, fields)
        else:
            env[item["name"]] = expand(str(item.get("value", "")), env)
    for source in spec.get("envFrom") or ():
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        if not ref.get("optional"):
            kind = "configmap" if "configMapRef" in source else "secret"
            raise EnvError(f'{kind} "{ref.get("name", "")}" not found')
    return env
