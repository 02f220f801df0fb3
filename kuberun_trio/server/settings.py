"""From command line and config file to one checked :class:`Settings` value.

Theory of operation
-------------------
The file is read as raw YAML, the command-line flags are written *into* that mapping at
the keys they stand for (``--listen`` → ``ssh.listen``, ``--namespace`` →
``kubernetes.pod.metadata.namespace``, ...), and only then is the whole mapping checked by
:func:`~kuberun_trio.server.config.parse_server_config`. So flags override the file, and a
bad value -- from either -- is reported with the key path it lands on.

Where the pods go (``--cluster``):

* ``embedded`` -- an embedded cluster runs inside the server process (demo mode; the default
  when neither ``--config`` nor ``--kubeconfig``/``--context`` is given). The demo serves its
  metrics and enables port and agent forwarding (``security.forwarding``) unless the file
  says otherwise);
* ``kubeconfig`` -- ``--kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``;
* ``in-cluster`` -- the service account of the pod the gateway runs in;
* otherwise ``kubernetes.connection`` of the config file decides.

In a cluster, pods get an ownerReference to the gateway's own pod when the downward API
provides ``POD_NAME``, ``POD_NAMESPACE`` and ``POD_UID`` (see :func:`owner_reference`) --
in the gateway's Deployment::

    env:
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}

The reference is appended to ``kubernetes.pod.metadata.ownerReferences`` of the
configuration, so the pod template needs no hook for it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ..configtools import read_yaml_mapping
from ..core.config import DEFAULT_IDLE_COMMAND, default_spec
from ..gateway.lease import default_instance
from .config import ServerConfig, parse_server_config
from .demo import StateDir, default_state_dir

log = logging.getLogger(__name__)

ClusterMode = Literal["embedded", "kubeconfig", "in-cluster", "config"]
DEMO_METRICS_LISTEN = "127.0.0.1:9100"
"""The demo's metrics address (the next free port if taken)."""
CLUSTER_CHOICES = ("embedded", "kubeconfig", "in-cluster")


@attrs.frozen
class Settings:
    """Everything the server command needs, checked."""

    config: ServerConfig
    """The merged configuration (file + flags)."""
    cluster: ClusterMode
    """Where pods go; ``config`` means ``kubernetes.connection`` decides."""
    state: StateDir
    """Generated keys and the demo files."""
    data: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    """The mapping ``config`` was checked from (file + flags): what the configuration
    webhook's answer is merged over (:mod:`.configwebhook`)."""

    @property
    def demo(self) -> bool:
        """Demo mode: embedded cluster, generated client key, printed ssh command."""
        return self.cluster == "embedded"


def cluster_mode(args: argparse.Namespace) -> ClusterMode:
    """``--cluster``, else ``config`` if a config or kubeconfig was named, else ``embedded``."""
    chosen: str | None = getattr(args, "cluster", None)
    if chosen is not None:
        return chosen  # type: ignore[return-value]  # argparse choices
    if any(getattr(args, name, None) for name in ("config", "kubeconfig", "context")):
        return "config"
    return "embedded"


def _section(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The mapping at ``data[k1][k2]...``, created (or replaced, if not a mapping) as needed."""
    for key in keys:
        value = data.get(key)
        if not isinstance(value, dict):
            value = {}
            data[key] = value
        data = value
    return data


def apply_flags(raw: Mapping[str, Any], args: argparse.Namespace,
                mode: ClusterMode) -> dict[str, Any]:
    """A copy of the raw config mapping with the command-line flags written in."""
    data: dict[str, Any] = copy.deepcopy(dict(raw))

    def flag(name: str) -> Any:
        return getattr(args, name, None)

    if flag("listen"):
        _section(data, "ssh")["listen"] = flag("listen")
    if flag("host_key"):
        _section(data, "ssh")["hostKeys"] = list(flag("host_key"))
    if flag("authorized_keys"):
        _section(data, "auth")["authorizedKeys"] = list(flag("authorized_keys"))
    if flag("instance"):
        data["instance"] = flag("instance")
    if flag("log_format"):
        _section(data, "log")["format"] = flag("log_format")
    if flag("log_level"):
        _section(data, "log")["level"] = flag("log_level")
    _apply_connection(data, args, mode)
    if mode == "embedded" and isinstance(data.get("metrics", {}), dict):
        metrics = _section(data, "metrics")  # the demo shows its metrics
        metrics.setdefault("enable", True)
        metrics.setdefault("listen", DEMO_METRICS_LISTEN)
    if mode == "embedded" and isinstance(data.get("security", {}), dict) and \
            isinstance(data.get("security", {}).get("forwarding", {}), dict):
        # the demo forwards: ssh -L / -D / -A to the pod (the pods are sandboxes on this host)
        forwarding = _section(data, "security", "forwarding")
        forwarding.setdefault("forwardingMode", "enable")
        forwarding.setdefault("agentForwardingMode", "enable")
    pod = _section(data, "kubernetes", "pod")
    if flag("namespace"):
        _section(pod, "metadata")["namespace"] = flag("namespace")
    if flag("image"):
        if not isinstance(pod.get("spec"), dict):
            pod["spec"] = default_spec(pod.get("idleCommand") or DEFAULT_IDLE_COMMAND)
        containers = pod["spec"].get("containers")
        index = pod.get("consoleContainerNumber", 0)
        if isinstance(containers, list) and isinstance(index, int) and \
                0 <= index < len(containers) and isinstance(containers[index], dict):
            containers[index]["image"] = flag("image")
    return data


_SOURCE_KEYS = ("host", "kubeconfig", "context", "inCluster", "cacertFile", "cacert",
                "certFile", "cert", "keyFile", "key", "bearerToken", "bearerTokenFile",
                "username", "password", "insecure", "serverName")


def _apply_connection(data: dict[str, Any], args: argparse.Namespace, mode: ClusterMode) -> None:
    kubeconfig, context = getattr(args, "kubeconfig", None), getattr(args, "context", None)
    if mode in ("config",) and not (kubeconfig or context):
        return
    conn = _section(data, "kubernetes", "connection")
    if mode == "embedded":
        return  # replaced by the embedded cluster's kubeconfig at start
    for key in _SOURCE_KEYS:  # the flags choose the source: drop the file's
        conn.pop(key, None)
    if mode == "in-cluster":
        conn["inCluster"] = True
        return
    if kubeconfig:
        conn["kubeconfig"] = kubeconfig
    if context:
        conn["context"] = context


def owner_reference(environ: Mapping[str, str], pod_namespace: str) -> dict[str, Any] | None:
    """An ownerReference to the gateway's own pod, from the downward API env, or None.

    Needs ``KUBERNETES_SERVICE_HOST`` (we run in a cluster), ``POD_NAME``, ``POD_UID`` and
    ``POD_NAMESPACE``; the latter must equal ``pod_namespace``, because Kubernetes' garbage
    collector treats a cross-namespace owner as missing and would delete the pod at once.
    """
    if not environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    name, uid = environ.get("POD_NAME"), environ.get("POD_UID")
    namespace = environ.get("POD_NAMESPACE")
    if not (name and uid and namespace):
        log.warning("in a cluster, but POD_NAME/POD_UID/POD_NAMESPACE are not all set: pods "
                    "get no ownerReference", extra={"event": "owner-reference-missing"})
        return None
    if namespace != pod_namespace:
        log.warning("the gateway runs in namespace %s, its pods go to %s: no ownerReference "
                    "(cross-namespace owners are invalid)", namespace, pod_namespace,
                    extra={"event": "owner-reference-skipped"})
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid,
            "controller": False, "blockOwnerDeletion": False}


def add_owner_reference(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Append :func:`owner_reference` to ``kubernetes.pod.metadata.ownerReferences``."""
    meta = _section(data, "kubernetes", "pod", "metadata")
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else "default"
    ref = owner_reference(environ, str(namespace))
    if ref is not None:
        refs = meta.get("ownerReferences")
        meta["ownerReferences"] = [*(refs if isinstance(refs, list) else []), ref]


def load_settings(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed arguments; raises ConfigError/ConfigErrors with key paths."""
    env = os.environ if environ is None else environ
    mode = cluster_mode(args)
    config_path: str | None = getattr(args, "config", None)
    raw = read_yaml_mapping(config_path) if config_path else {}
    data = apply_flags(raw, args, mode)
    uses_in_cluster = mode == "in-cluster" or (
        mode == "config" and _section(data, "kubernetes", "connection").get("inCluster") is True)
    if uses_in_cluster:
        add_owner_reference(data, env)
    config = parse_server_config(data, instance=default_instance(env))
    state_dir = getattr(args, "state_dir", None)
    state = StateDir(Path(state_dir) if state_dir else default_state_dir(env))
    return Settings(config=config, cluster=mode, state=state, data=data)
