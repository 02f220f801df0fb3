"""Writing the kubeconfig that points clients at the embedded cluster.

The file has one cluster (server URL, and for HTTPS the CA as
``certificate-authority-data``), one user with the bearer token, and one
context, made current, whose namespace is ``default`` -- what
``kubectl config view`` shows for a real cluster set up with a token.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

CLUSTER_NAME = "kuberun-embedded"


def kubeconfig_dict(server: str, token: str | None, ca_pem: bytes | None) -> dict[str, object]:
    cluster: dict[str, object] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    user: dict[str, object] = {"token": token} if token else {}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": cluster}],
        "users": [{"name": CLUSTER_NAME, "user": user}],
        "contexts": [{"name": CLUSTER_NAME, "context": {
            "cluster": CLUSTER_NAME, "user": CLUSTER_NAME, "namespace": "default"}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }


def write_kubeconfig(path: Path, server: str, token: str | None, ca_pem: bytes | None) -> Path:
    """Write the kubeconfig (mode 0600: it holds a credential) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(kubeconfig_dict(server, token, ca_pem), f, sort_keys=False)
    tmp.replace(path)
    return path
