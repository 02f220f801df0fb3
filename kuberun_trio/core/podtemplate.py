"""The pod manifest for one SSH connection, and the Kubernetes naming rules it must obey.

Everything here is a pure function: configuration and connection facts in, a JSON-ready
``dict`` out. :func:`build_pod` starts from a deep copy of ``kubernetes.pod.metadata`` and
``kubernetes.pod.spec`` and then

* names the pod: ``metadata.generateName`` (sanitised to a DNS-1123 prefix) -- or, when the
  configuration fixes ``metadata.name``, that name with ``-<connection id>`` appended,
  because one fixed name cannot serve two concurrent connections (``-<session id>`` in
  ``session`` mode). In ``persistent`` mode the pod belongs to the user, not to a
  connection: it is named ``metadata.name`` as given, else :func:`persistent_pod_name` of
  the username, and carries ``kuberun.trio/mode: persistent`` instead of the connection-id
  and instance labels, the holder/Lease annotations and an owner pod (the gateway's own),
  so that no orphan sweep, start-up sweep, ``gc`` run or garbage collector ever takes it
  for a connection's leftover;
* makes the console container (``consoleContainerNumber``) run ``idleCommand`` with no
  args -- sessions are pods/exec calls into it -- and defaults ``restartPolicy`` to
  ``Never`` (a pod whose idle process died is of no use to its connection);
* labels the pod with the connection id, the username and the gateway instance, and
  ``app.kubernetes.io/managed-by: kuberun-trio`` (see :func:`label_selector_for_instance`,
  used to find pods orphaned by a crashed gateway); annotates it with the raw username
  and the client address;
* exposes authentication metadata as environment variables, labels and annotations as
  ``exposeAuthMetadataAs{Env,Labels,Annotations}`` say, and adds ``auth_env``.

Values that come from clients (usernames, metadata) must never make pod creation fail:
label values go through :func:`sanitize_label_value`, annotation values are capped and made
valid UTF-8, and invalid ``auth_env`` names are skipped. Keys and names that come from the
configuration are checked once at load time with the ``*_problem`` validators below (used by
:mod:`kuberun_trio.core.config`), so a bad key is a configuration error, not a pod error.
"""

from __future__ import annotations

import copy
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import KubernetesConfig

LABEL_PREFIX = "kuberun.trio/"
"""Prefix of every label and annotation key the gateway owns."""
LABEL_CONNECTION_ID = "kuberun.trio/connection-id"
LABEL_USERNAME = "kuberun.trio/username"
LABEL_INSTANCE = "kuberun.trio/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kuberun-trio"
ANNOTATION_CLIENT_ADDRESS = "kuberun.trio/client-address"
ANNOTATION_USERNAME = "kuberun.trio/username"
LABEL_MODE = "kuberun.trio/mode"
"""``persistent`` or ``session`` (pods of ``connection`` mode carry no mode label)."""
LABEL_SESSION_ID = "kuberun.trio/session-id"
"""Session mode: the session channel a pod serves."""
_CONNECTION_ANNOTATIONS = ("kuberun.trio/holder", "kuberun.trio/lease")
"""Per-process annotations (lease.py) a persistent pod must not carry: it outlives them."""

MAX_LABEL_VALUE = 63
MAX_ANNOTATION_VALUE = 4096
"""Characters kept of one annotation value we write (the API caps all annotations at 256 KiB)."""
MAX_GENERATE_NAME = 58
"""The API server keeps at most 63 - 5 characters of ``generateName``."""
MAX_POD_NAME = 63
"""Pod names could be 253 long, but the pod hostname is the name cut at 63: stay within it."""
DEFAULT_GENERATE_NAME = "kuberun-"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = _QUALIFIED_NAME
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_LABEL_VALUE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_NOT_DNS_LABEL_CHAR = re.compile(r"[^a-z0-9-]")
_DIGEST_CHARS = 10


# -- validators: None when fine, else the problem in words ---------------------------------


def dns1123_label_problem(name: str) -> str | None:
    """Problem with ``name`` as a DNS-1123 label (namespace, container name), or None."""
    if len(name) > 63:
        return f"must be no more than 63 characters (got {len(name)})"
    if not _DNS_LABEL.fullmatch(name):
        return (
            "must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return None


def dns1123_subdomain_problem(name: str) -> str | None:
    """Problem with ``name`` as a DNS-1123 subdomain (pod name, key prefix), or None."""
    if len(name) > 253:
        return f"must be no more than 253 characters (got {len(name)})"
    if not _DNS_SUBDOMAIN.fullmatch(name):
        return (
            "must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', "
            "each part starting and ending with a letter or digit"
        )
    return None


def qualified_name_problem(key: str) -> str | None:
    """Problem with ``key`` as a label or annotation key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "prefix before '/' must not be empty"
    if prefix and (problem := dns1123_subdomain_problem(prefix)):
        return f"prefix {prefix!r} {problem}"
    if not name:
        return "name part must not be empty"
    if len(name) > 63:
        return f"name part must be no more than 63 characters (got {len(name)})"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Problem with ``value`` as a label value (may be empty), or None."""
    if len(value) > MAX_LABEL_VALUE:
        return f"must be no more than 63 characters (got {len(value)})"
    if value and not _LABEL_VALUE.fullmatch(value):
        return (
            "must consist of letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def env_name_problem(name: str) -> str | None:
    """Problem with ``name`` as an environment variable name, or None."""
    if not _ENV_NAME.fullmatch(name):
        return "must be a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
    return None


# -- sanitisers: any string in, a valid value out --------------------------------------------


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]


def _ascii_fold(raw: str) -> str:
    """``"Jürgen"`` -> ``"Jurgen"``: decompose and drop combining marks; other chars stay."""
    return "".join(c for c in unicodedata.normalize("NFKD", raw) if not unicodedata.combining(c))


def sanitize_label_value(raw: str) -> str:
    """A valid label value for any string.

    A valid value (at most 63 characters of ``[A-Za-z0-9_.-]``, alphanumeric at both ends,
    or empty) is returned unchanged. Anything else is folded to ASCII, invalid characters
    become ``-``, it is cut to fit, and a hash of the *original* is appended, so that two
    different inputs stay different (up to a 40-bit hash collision; labels are for
    selecting, the raw username is kept in an annotation).
    """
    if label_value_problem(raw) is None:
        return raw
    digest = _digest(raw)
    body = _NOT_LABEL_VALUE_CHAR.sub("-", _ascii_fold(raw))
    body = body[: MAX_LABEL_VALUE - 1 - len(digest)].strip("-_.")
    return f"{body}-{digest}" if body else digest


def _fit_dns_label(raw: str) -> str:
    """A valid DNS-1123 label (<= 63) for any string; changed ones carry a hash of ``raw``."""
    if dns1123_label_problem(raw) is None:
        return raw
    digest = _digest(raw)
    body = _NOT_DNS_LABEL_CHAR.sub("-", _ascii_fold(raw).lower())
    body = body[: MAX_POD_NAME - 1 - len(digest)].strip("-")
    return f"{body}-{digest}" if body else digest


def sanitize_generate_name(raw: str) -> str:
    """A valid ``generateName`` prefix (the server appends 5 random characters)."""
    if raw and len(raw) <= MAX_GENERATE_NAME and dns1123_subdomain_problem(raw + "x") is None:
        return raw
    body = _NOT_DNS_LABEL_CHAR.sub("-", _ascii_fold(raw).lower()).lstrip("-")
    return body[:MAX_GENERATE_NAME] or DEFAULT_GENERATE_NAME


def pod_name_for_connection(name: str, connection_id: str) -> str:
    """The pod name when the configuration fixes ``metadata.name``: ``<name>-<connection id>``."""
    candidate = f"{name}-{connection_id}"
    if len(candidate) <= MAX_POD_NAME and dns1123_subdomain_problem(candidate) is None:
        return candidate
    return _fit_dns_label(candidate)


def persistent_pod_name(username: str, prefix: str = DEFAULT_GENERATE_NAME) -> str:
    """The stable pod name of ``username``'s persistent pod: ``<prefix><readable>-<hash>``.

    A valid DNS-1123 label (the pod's hostname) for any username: the readable part is the
    username folded to lower-case ASCII, other characters ``-``, cut to fit; the hash (of
    the raw username) keeps ``Alice`` and ``alice`` -- and long names with one prefix --
    apart. ``prefix`` is the configured ``generateName``.
    """
    head = _NOT_DNS_LABEL_CHAR.sub("-", sanitize_generate_name(prefix).lower()).lstrip("-")
    head = head[:24].rstrip("-") + "-" if head.strip("-") else ""
    digest = _digest(username)
    body = re.sub("-+", "-", _NOT_DNS_LABEL_CHAR.sub("-", _ascii_fold(username).lower()))
    body = body[: MAX_POD_NAME - len(head) - 1 - len(digest)].strip("-")
    name = f"{head}{body}-{digest}" if body else f"{head}{digest}"
    name = name.strip("-")
    return name if dns1123_label_problem(name) is None else digest


def valid_utf8(raw: str) -> str:
    """``raw`` with lone surrogates (which cannot be encoded) replaced by ``?``."""
    return raw.encode("utf-8", "replace").decode("utf-8")


def annotation_value(raw: str, limit: int = MAX_ANNOTATION_VALUE) -> str:
    """``raw`` as valid UTF-8 text of at most ``limit`` characters (cut ones end in ``…``)."""
    text = valid_utf8(raw)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the manifest ------------------------------------------------------------------------------


def label_selector_for_instance(instance: str) -> str:
    """Label selector matching every pod this gateway ``instance`` created (orphan cleanup)."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_INSTANCE}={sanitize_label_value(instance)}"


def build_pod(
    config: KubernetesConfig,
    *,
    connection_id: str,
    username: str,
    client_address: str,
    instance: str,
    auth_metadata: Mapping[str, str],
    auth_env: Mapping[str, str],
    session_id: str | None = None,
) -> dict[str, Any]:
    """The pod manifest (JSON-ready) for one SSH connection (``session`` mode: for the
    session channel ``session_id``; ``persistent`` mode: for the user).

    Precedence, lowest first -- labels and annotations: the configured metadata, exposed
    auth metadata, the gateway's own (``kuberun.trio/*``, managed-by); environment of the
    console container: the configured container env, exposed auth metadata, ``auth_env``.
    """
    pod = config.pod
    metadata: dict[str, Any] = copy.deepcopy(dict(pod.metadata))
    spec: dict[str, Any] = copy.deepcopy(dict(pod.spec))
    containers = spec.get("containers")
    if not isinstance(containers, list) or not 0 <= pod.console_container_number < len(containers):
        raise ConfigError(
            "kubernetes.pod.consoleContainerNumber",
            "does not index a container of kubernetes.pod.spec.containers",
        )

    persistent = pod.mode == "persistent"
    if persistent:
        metadata["name"] = str(metadata.get("name") or persistent_pod_name(
            username, str(metadata.get("generateName", DEFAULT_GENERATE_NAME))))
        metadata.pop("generateName", None)
    elif "name" in metadata:
        metadata["name"] = pod_name_for_connection(str(metadata["name"]),
                                                   session_id or connection_id)
        metadata.pop("generateName", None)
    else:
        metadata["generateName"] = sanitize_generate_name(
            str(metadata.get("generateName", DEFAULT_GENERATE_NAME))
        )

    labels: dict[str, str] = dict(metadata.get("labels") or {})
    annotations: dict[str, str] = dict(metadata.get("annotations") or {})
    env: dict[str, str] = {}
    for key, label in pod.expose_auth_metadata_as_labels.items():
        if key in auth_metadata:
            labels[label] = sanitize_label_value(auth_metadata[key])
    for key, annotation in pod.expose_auth_metadata_as_annotations.items():
        if key in auth_metadata:
            annotations[annotation] = annotation_value(auth_metadata[key])
    for key, name in pod.expose_auth_metadata_as_env.items():
        if key in auth_metadata:
            env[name] = auth_metadata[key]
    env.update((k, v) for k, v in auth_env.items() if env_name_problem(k) is None)

    labels[LABEL_MANAGED_BY] = MANAGED_BY
    labels[LABEL_USERNAME] = sanitize_label_value(username)
    if persistent:
        labels[LABEL_MODE] = "persistent"
        for key in (LABEL_CONNECTION_ID, LABEL_INSTANCE, LABEL_SESSION_ID):
            labels.pop(key, None)
        for key in _CONNECTION_ANNOTATIONS:
            annotations.pop(key, None)
        # An owner pod (the gateway's own, added in a cluster) would take the user's pod
        # with it when the gateway pod goes (a rolling update): a persistent pod has none.
        owners = [ref for ref in metadata.get("ownerReferences") or []
                  if not (isinstance(ref, dict) and ref.get("kind") == "Pod"
                          and ref.get("apiVersion") == "v1")]
        if owners:
            metadata["ownerReferences"] = owners
        else:
            metadata.pop("ownerReferences", None)
    else:
        labels[LABEL_CONNECTION_ID] = sanitize_label_value(connection_id)
        labels[LABEL_INSTANCE] = sanitize_label_value(instance)
    if session_id is not None and pod.mode == "session":
        labels[LABEL_MODE] = "session"
        labels[LABEL_SESSION_ID] = sanitize_label_value(session_id)
    annotations[ANNOTATION_USERNAME] = annotation_value(username, 1024)
    annotations[ANNOTATION_CLIENT_ADDRESS] = annotation_value(client_address, 1024)
    metadata["labels"] = labels
    metadata["annotations"] = annotations

    console: dict[str, Any] = containers[pod.console_container_number]
    console["command"] = list(pod.idle_command)
    console["args"] = []
    if env:
        old = console.get("env") or []
        kept = [e for e in old if not (isinstance(e, dict) and e.get("name") in env)]
        console["env"] = kept + [
            {"name": name, "value": valid_utf8(value)} for name, value in env.items()
        ]
    spec.setdefault("restartPolicy", "Never")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
