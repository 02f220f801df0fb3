"""Check, before any event loop exists, that the cluster connection can be loaded.

Theory of operation
-------------------
The gateway loads its kubeconfig (or the in-cluster service account) with
kubernetes-asyncio once its loop runs; a missing file then surfaces as that library's
``Invalid kube-config file. Expected key current-context``, which sends a newcomer the
wrong way. :func:`connection_problems` does what that loader will do -- find the file
(``kubernetes.connection.kubeconfig``, else ``$KUBECONFIG``, a list as kubectl allows,
else ``~/.kube/config``), parse it, resolve the context with its cluster and user -- and
says what is wrong in words a user can act on: ``file not found``, with what to pass
instead. ``check-config``, ``gc`` and the server's start all run it, so ``check-config``
accepts nothing the server then refuses. It is synchronous and reads one small file.

The in-cluster source needs ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service
account token; a ``host`` source has nothing to load here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

from ..core.config import ConnectionConfig
from ..errors import ConfigError

KEY = "kubernetes.connection.kubeconfig"
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
HINT = ("pass --kubeconfig FILE (or set $KUBECONFIG, or kubernetes.connection.kubeconfig "
        "in --config FILE)")


def connection_problems(conn: ConnectionConfig,
                        environ: Mapping[str, str] | None = None) -> list[ConfigError]:
    """Problems that would stop the gateway from loading ``conn``; empty if none."""
    env = os.environ if environ is None else environ
    if conn.source == "host":
        return []
    if conn.source == "inCluster":
        return _in_cluster_problems(env)
    return _kubeconfig_problems(conn, env)


def _in_cluster_problems(env: Mapping[str, str]) -> list[ConfigError]:
    key = "kubernetes.connection.inCluster"
    if not (env.get("KUBERNETES_SERVICE_HOST") and env.get("KUBERNETES_SERVICE_PORT")):
        return [ConfigError(key, "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST "
                                 "is not set); outside a cluster, " + HINT)]
    if not os.path.exists(TOKEN_FILE):
        return [ConfigError(key, f"file not found: {TOKEN_FILE} (the pod has no service "
                                 "account token: automountServiceAccountToken?)")]
    return []


def _kubeconfig_problems(conn: ConnectionConfig, env: Mapping[str, str]) -> list[ConfigError]:
    if conn.kubeconfig is not None:
        paths, origin = [os.path.expanduser(conn.kubeconfig)], ""
    elif env.get("KUBECONFIG"):
        paths = [p for p in env["KUBECONFIG"].split(os.pathsep) if p]
        origin = " (from $KUBECONFIG)"
    else:
        paths = [os.path.join(env.get("HOME") or os.path.expanduser("~"), ".kube", "config")]
        origin = " (the default, as kubectl: no --kubeconfig, no $KUBECONFIG)"
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        return [ConfigError(KEY, f"file not found: {os.pathsep.join(paths)}{origin}; {HINT}")]
    path = existing[0]
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        return [ConfigError(KEY, f"cannot read {path}: {exc.strerror or exc}")]
    except yaml.YAMLError as exc:
        return [ConfigError(KEY, f"{path} is not YAML: {exc}")]
    if not isinstance(doc, dict):
        return [ConfigError(KEY, f"{path} is not a kubeconfig (expected a mapping)")]
    return _context_problems(doc, path, conn.context)


def _named(doc: Mapping[str, Any], section: str) -> dict[str, Any]:
    entries = doc.get(section)
    if not isinstance(entries, list):
        return {}
    return {str(e.get("name")): e.get(section[:-1]) or {} for e in entries
            if isinstance(e, dict)}


def _context_problems(doc: Mapping[str, Any], path: str,
                      context: str | None) -> list[ConfigError]:
    contexts = _named(doc, "contexts")
    where = "kubernetes.connection.context" if context else KEY
    name = context or doc.get("current-context")
    if not name:
        return [ConfigError(KEY, f"{path} sets no current-context; pass --context NAME "
                                 f"(contexts: {', '.join(sorted(contexts)) or 'none'})")]
    if name not in contexts:
        return [ConfigError(where, f"{path} has no context {name!r} "
                                   f"(contexts: {', '.join(sorted(contexts)) or 'none'})")]
    entry = contexts[name] if isinstance(contexts[name], dict) else {}
    problems = []
    for kind in ("cluster", "user"):
        ref = entry.get(kind)
        if kind == "cluster" and not ref:
            problems.append(ConfigError(where, f"context {name!r} of {path} names no cluster"))
        elif ref and ref not in _named(doc, kind + "s"):
            problems.append(ConfigError(
                where, f"context {name!r} of {path} names {kind} {ref!r}, which it lacks"))
    return problems
