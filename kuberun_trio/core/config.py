"""The gateway's ``kubernetes:`` configuration: frozen values, loaded from YAML, checked hard.

The keys follow ContainerSSH's kubernetes backend (``connection``, ``pod``, ``timeouts``), so
a ContainerSSH ``kubernetes:`` section loads unchanged (modes ``connection``, ``session`` and
``persistent``), except for its agent keys (kuberun_trio needs no agent in the pod).

Loading runs in two passes, and reports *every* problem it finds, each as a
:class:`~kuberun_trio.errors.ConfigError` naming the dotted key path
(``kubernetes.timeouts.podStart: invalid duration "6x"``); several at once come as one
:class:`~kuberun_trio.errors.ConfigErrors`.

1. *Structure*: a strict cattrs converter
   (:func:`~kuberun_trio.configtools.make_converter`) turns each section into its attrs class.
   Keys are the camelCase form of the attribute names; unknown keys are errors (with a
   "did you mean" hint), and nothing is coerced: ``"5"`` is not a number and ``"false"`` is
   not a boolean. Durations accept Go syntax (``"1m30s"``) or a number of
   seconds (:func:`~kuberun_trio.configtools.parse_duration`).
2. *Check*: cross-field rules -- one connection source, credential pairs, the pod spec's
   containers, label and env names -- and defaults that depend on what was given.

The generic machinery (key paths, problem collection, the strict converter, durations, YAML
reading) lives in :mod:`kuberun_trio.configtools`; its public names are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

# The generic names are re-exported (``X as X``) for code that imports them from here.
from ..configtools import ConfigProblems as ConfigProblems
from ..configtools import InvalidValue as InvalidValue
from ..configtools import as_mapping, duration_or_off
from ..configtools import check_keys as check_keys
from ..configtools import config_key as config_key
from ..configtools import duration as duration
from ..configtools import key_path as key_path
from ..configtools import kind_of as kind_of
from ..configtools import make_converter as make_converter
from ..configtools import parse_duration as parse_duration
from ..configtools import read_yaml_mapping as read_yaml_mapping
from ..configtools import structure_section as structure_section
from ..configtools import unknown_key_problem as unknown_key_problem
from ..errors import ConfigError
from .podtemplate import (
    DEFAULT_GENERATE_NAME,
    LABEL_MANAGED_BY,
    LABEL_PREFIX,
    dns1123_label_problem,
    dns1123_subdomain_problem,
    env_name_problem,
    label_value_problem,
    qualified_name_problem,
)

# == the kubernetes section ======================================================================

DEFAULT_IDLE_COMMAND = (
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
)
"""Sleeps until SIGTERM, then exits at once (``sleep`` as PID 1 would ignore SIGTERM)."""
DEFAULT_SHELL_COMMAND = ("/bin/sh",)
DEFAULT_NAMESPACE = "default"


def default_metadata() -> dict[str, Any]:
    """``{"namespace": "default", "generateName": "kuberun-"}``."""
    return {"namespace": DEFAULT_NAMESPACE, "generateName": DEFAULT_GENERATE_NAME}


def default_spec(idle_command: Iterable[str] = DEFAULT_IDLE_COMMAND) -> dict[str, Any]:
    """One container ``shell``, image ``busybox``, running ``idle_command``."""
    return {"containers": [{"name": "shell", "image": "busybox", "command": list(idle_command)}]}


@attrs.frozen
class ConnectionConfig:
    """How to reach the API server (``kubernetes.connection``).

    Exactly one source: ``host`` (with the credentials below), ``kubeconfig`` (+ ``context``),
    or ``inCluster: true`` (the pod's service account). With none of them, the kubeconfig
    named by ``$KUBECONFIG`` or else ``~/.kube/config`` is used, as kubectl does.
    """

    host: str | None = None
    """API server as ``host:port`` or URL (``https://10.0.0.1:6443``); selects the host source."""
    path: str = "/api"
    """API path of the core group (client-go's APIPath); kept for ContainerSSH compatibility."""
    cacert_file: str | None = None
    """File with the PEM CA certificate(s) that sign the API server's certificate."""
    cacert: str | None = None
    """The same CA as PEM text."""
    cert_file: str | None = None
    """File with the PEM client certificate (needs ``keyFile``/``key``)."""
    cert: str | None = None
    """The client certificate as PEM text."""
    key_file: str | None = None
    """File with the PEM private key of the client certificate."""
    key: str | None = None
    """The client key as PEM text."""
    bearer_token: str | None = None
    """Bearer token sent as ``Authorization: Bearer ...``."""
    bearer_token_file: str | None = None
    """File holding the bearer token (re-read when it rotates)."""
    username: str | None = None
    """HTTP basic auth user (needs ``password``)."""
    password: str | None = None
    """HTTP basic auth password."""
    insecure: bool = False
    """Skip verifying the server certificate. For tests only."""
    server_name: str | None = None
    """Name to verify the server certificate against (SNI), if not the host's."""
    qps: float = 50.0
    """Sustained API requests per second the gateway allows itself.

    A connection costs about four requests (create, watch until Ready, watch for
    loss, delete), so client-go's old default of 5 would cap the gateway at about
    one new connection a second; 50 is kubectl's current default."""
    burst: int = 100
    """Requests allowed in a burst above ``qps``."""
    kubeconfig: str | None = None
    """Path of a kubeconfig file; selects the kubeconfig source."""
    context: str | None = None
    """Context of the kubeconfig to use; default: its current-context."""
    in_cluster: bool = False
    """Use the service account of the pod the gateway runs in; selects the in-cluster source."""

    @property
    def source(self) -> Literal["host", "kubeconfig", "inCluster"]:
        """Which way of reaching the API server is configured (default: kubeconfig)."""
        if self.host is not None:
            return "host"
        return "inCluster" if self.in_cluster else "kubeconfig"

    def kubeconfig_path(self, environ: Mapping[str, str] | None = None) -> str:
        """``kubeconfig``, else ``$KUBECONFIG`` (may be a list, as kubectl allows),
        else ``~/.kube/config``."""
        env = os.environ if environ is None else environ
        if self.kubeconfig is not None:
            return os.path.expanduser(self.kubeconfig)
        return env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


@attrs.frozen
class PodConfig:
    """The pod every SSH connection gets (``kubernetes.pod``)."""

    console_container_number: int = 0
    """Index in ``spec.containers`` of the container that sessions exec into."""
    idle_command: tuple[str, ...] = DEFAULT_IDLE_COMMAND
    """What the console container runs while the connection lives; must exit on SIGTERM."""
    shell_command: tuple[str, ...] = DEFAULT_SHELL_COMMAND
    """What a ``shell`` request runs."""
    subsystems: Mapping[str, str] = attrs.Factory(lambda: {"sftp": "/usr/lib/openssh/sftp-server"})
    """SSH subsystem name -> program run for it."""
    expose_auth_metadata_as_env: Mapping[str, str] = attrs.Factory(dict)
    """Auth metadata key -> environment variable of the console container."""
    expose_auth_metadata_as_labels: Mapping[str, str] = attrs.Factory(dict)
    """Auth metadata key -> pod label key (values are sanitised to label values)."""
    expose_auth_metadata_as_annotations: Mapping[str, str] = attrs.Factory(dict)
    """Auth metadata key -> pod annotation key."""
    mode: str = "connection"
    """``connection`` (one pod per SSH connection, sessions are execs), ``session`` (one pod
    per session channel) or ``persistent`` (one pod per user, kept across connections)."""
    create_missing_pods: bool = True
    """Persistent mode: create the user's pod when it does not exist (false: refuse the login)."""
    persistent_idle_timeout: float = duration_or_off(8 * 3600.0)
    """Persistent mode: delete a pod no connection has used for this long (0: never)."""
    metadata: Mapping[str, Any] = attrs.Factory(default_metadata)
    """Pod ObjectMeta; ``namespace`` defaults to ``default``, ``generateName`` to ``kuberun-``."""
    spec: Mapping[str, Any] = attrs.Factory(
        lambda self: default_spec(self.idle_command), takes_self=True
    )
    """A full PodSpec; default: one container ``shell`` from image ``busybox``."""


@attrs.frozen
class TimeoutsConfig:
    """Timeouts in seconds (``kubernetes.timeouts``; YAML takes ``"1m30s"`` or numbers)."""

    pod_start: float = duration(60.0)
    """Creating the pod until it is Running and Ready."""
    pod_stop: float = duration(60.0)
    """Deleting the pod until it is gone."""
    command_start: float = duration(60.0)
    """Opening one pods/exec stream."""
    signal: float = duration(60.0)
    """Delivering a signal to a session's process."""
    window: float = duration(60.0)
    """Delivering a terminal window-size change."""
    http: float = duration(15.0)
    """One plain API request."""


@attrs.frozen
class KubernetesConfig:
    """The whole ``kubernetes:`` section."""

    connection: ConnectionConfig = attrs.Factory(ConnectionConfig)
    """How to reach the API server."""
    pod: PodConfig = attrs.Factory(PodConfig)
    """The per-connection pod."""
    timeouts: TimeoutsConfig = attrs.Factory(TimeoutsConfig)
    """Timeouts."""

    @classmethod
    def default(cls) -> KubernetesConfig:
        """The configuration of an empty ``kubernetes:`` section."""
        return parse_config({})


_CONVERTER = make_converter()
_HINTS = {
    "agentPath": "kuberun_trio needs no agent in the pod; remove it",
    "disableAgent": "kuberun_trio needs no agent in the pod; remove it",
    "namespace": "the namespace is set as pod.metadata.namespace",
}


def parse_config(data: Mapping[str, Any], *, path_prefix: str = "kubernetes") -> KubernetesConfig:
    """Structure and check the contents of a ``kubernetes:`` section (``None`` = defaults).

    Raises :class:`ConfigError` (one problem) or :class:`ConfigErrors` (several).
    """
    problems = ConfigProblems()
    try:
        section = as_mapping(data)
    except InvalidValue as exc:
        raise ConfigError(path_prefix, str(exc)) from None
    check_keys(section, ("connection", "pod", "timeouts"), path_prefix, problems, _HINTS)

    def at(key: str) -> str:
        return key_path(path_prefix, key)

    connection = structure_section(
        _CONVERTER, section.get("connection"), ConnectionConfig, at("connection"), problems, _HINTS
    )
    if connection is not None:
        _check_connection(connection, at("connection"), problems)
    pod = structure_section(_CONVERTER, section.get("pod"), PodConfig, at("pod"), problems, _HINTS)
    if pod is not None:
        pod = _check_pod(pod, at("pod"), problems)
    else:
        _check_raw_pod(section.get("pod"), at("pod"), problems)
    timeouts = structure_section(
        _CONVERTER, section.get("timeouts"), TimeoutsConfig, at("timeouts"), problems, _HINTS
    )
    problems.raise_if_any()
    assert connection is not None and pod is not None and timeouts is not None
    return KubernetesConfig(connection=connection, pod=pod, timeouts=timeouts)


def load_config(path: str | os.PathLike[str]) -> KubernetesConfig:
    """The ``kubernetes:`` section of the YAML file at ``path`` (other top-level keys are left
    to the server configuration). A file without a ``kubernetes:`` key is an error."""
    data = read_yaml_mapping(path)
    if "kubernetes" not in data:
        raise ConfigError("kubernetes", f"required: {os.fspath(path)} has no kubernetes section")
    return parse_config(data["kubernetes"])


# == cross-field checks ==========================================================================

_HOST_ONLY = (
    "cacertFile",
    "cacert",
    "certFile",
    "cert",
    "keyFile",
    "key",
    "bearerToken",
    "bearerTokenFile",
    "username",
    "password",
    "insecure",
    "serverName",
)
_ALTERNATIVES = (
    ("cacert", "cacertFile"),
    ("cert", "certFile"),
    ("key", "keyFile"),
    ("bearerToken", "bearerTokenFile"),
)
_PEM_KEYS = ("cacert", "cert", "key")


def _check_connection(conn: ConnectionConfig, path: str, problems: ConfigProblems) -> None:
    values = {config_key(a): getattr(conn, a.name) for a in attrs.fields(ConnectionConfig)}
    is_set = {key for key, value in values.items() if value not in (None, False)}
    sources = [key for key in ("host", "kubeconfig", "inCluster") if key in is_set]
    if len(sources) > 1:
        problems.add(
            path,
            f"host, kubeconfig and inCluster are alternatives; "
            f"set only one (found {', '.join(sources)})",
        )
        return
    for key in ("host", "kubeconfig"):
        if values[key] == "":
            problems.add(key_path(path, key), "must not be empty")
    if conn.source != "host":
        for key in _HOST_ONLY:
            if key in is_set:
                problems.add(
                    key_path(path, key),
                    f"only valid with host ({conn.source} brings its own credentials)",
                )
    if "context" in is_set and conn.source != "kubeconfig":
        problems.add(key_path(path, "context"), "only valid with kubeconfig")
    for text, file in _ALTERNATIVES:
        if text in is_set and file in is_set:
            problems.add(key_path(path, file), f"{text} and {file} are alternatives; set one")
    for text in _PEM_KEYS:
        if text in is_set and "-----BEGIN " not in values[text]:
            problems.add(key_path(path, text), "expected PEM text (-----BEGIN ...)")
    has_cert, has_key = bool({"cert", "certFile"} & is_set), bool({"key", "keyFile"} & is_set)
    if has_cert != has_key:
        problems.add(
            key_path(path, "certFile" if has_key else "keyFile"),
            "a client certificate needs both cert(File) and key(File)",
        )
    if ("username" in is_set) != ("password" in is_set):
        problems.add(
            key_path(path, "password" if "username" in is_set else "username"),
            "basic auth needs both username and password",
        )
    if conn.insecure and {"cacert", "cacertFile"} & is_set:
        problems.add(key_path(path, "insecure"), "cannot be combined with a CA certificate")
    if not conn.path.startswith("/"):
        problems.add(key_path(path, "path"), "must start with /")
    if conn.qps <= 0:
        problems.add(key_path(path, "qps"), "must be positive")
    if conn.burst < 1:
        problems.add(key_path(path, "burst"), "must be at least 1")


POD_MODES = ("connection", "session", "persistent")
"""The values of ``kubernetes.pod.mode``."""


def _check_pod(pod: PodConfig, path: str, problems: ConfigProblems) -> PodConfig:
    if pod.mode not in POD_MODES:
        problems.add(
            key_path(path, "mode"),
            f"unknown mode {pod.mode!r}; choose one of {', '.join(POD_MODES)}",
        )
    if pod.persistent_idle_timeout < 0:
        problems.add(key_path(path, "persistentIdleTimeout"), "must not be negative")
    for key, command in (("idleCommand", pod.idle_command), ("shellCommand", pod.shell_command)):
        if not command or not command[0]:
            problems.add(key_path(path, key), "must be a non-empty list starting with a program")
    for name, program in pod.subsystems.items():
        if not name or not program:
            problems.add(key_path(key_path(path, "subsystems"), name), "must not be empty")
    _check_exposures(pod, path, problems)
    metadata = _check_metadata(pod.metadata, key_path(path, "metadata"), problems)
    _check_spec(pod.spec, pod.console_container_number, path, problems)
    return attrs.evolve(pod, metadata=metadata)


def _check_raw_pod(raw: object, path: str, problems: ConfigProblems) -> None:
    """When ``pod`` did not structure, still check its metadata and spec, to report all."""
    if not isinstance(raw, Mapping):
        return
    if isinstance(metadata := raw.get("metadata"), Mapping):
        _check_metadata(metadata, key_path(path, "metadata"), problems)
    console = raw.get("consoleContainerNumber", 0)
    if isinstance(spec := raw.get("spec"), Mapping):
        number = console if isinstance(console, int) and not isinstance(console, bool) else 0
        _check_spec(spec, number, path, problems)


def _check_exposures(pod: PodConfig, path: str, problems: ConfigProblems) -> None:
    for key, mapping, check in (
        ("exposeAuthMetadataAsEnv", pod.expose_auth_metadata_as_env, env_name_problem),
        ("exposeAuthMetadataAsLabels", pod.expose_auth_metadata_as_labels, _our_key_problem),
        (
            "exposeAuthMetadataAsAnnotations",
            pod.expose_auth_metadata_as_annotations,
            _our_key_problem,
        ),
    ):
        for source, target in mapping.items():
            where = key_path(key_path(path, key), source)
            if not source:
                problems.add(where, "the metadata key must not be empty")
            elif problem := check(target):
                problems.add(where, f"{target!r}: {problem}")


def _our_key_problem(key: str) -> str | None:
    if key.startswith(LABEL_PREFIX) or key == LABEL_MANAGED_BY:
        return "reserved for kuberun_trio's own labels and annotations"
    return qualified_name_problem(key)


_METADATA_KEYS = (
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
)


def _check_metadata(meta: Mapping[str, Any], path: str, problems: ConfigProblems) -> dict[str, Any]:
    check_keys(meta, _METADATA_KEYS, path, problems)
    for key, check in (
        ("namespace", dns1123_label_problem),
        ("name", dns1123_subdomain_problem),
        ("generateName", None),
    ):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            problems.add(key_path(path, key), _not_text(value))
        elif check and (problem := check(value)):
            problems.add(key_path(path, key), problem)
    for key, check_value in (("labels", label_value_problem), ("annotations", None)):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            problems.add(key_path(path, key), f"expected a mapping, got {kind_of(value)}")
            continue
        for name, text in value.items():
            where = key_path(key_path(path, key), name)
            if not isinstance(name, str) or (problem := qualified_name_problem(name)):
                problems.add(where, f"invalid key: {problem or 'keys must be strings'}")
            elif not isinstance(text, str):
                problems.add(where, f"expected a string, got {kind_of(text)}")
            elif check_value and (problem := check_value(text)):
                problems.add(where, problem)
    result = dict(meta)
    result.setdefault("namespace", DEFAULT_NAMESPACE)
    if "name" not in result:
        result.setdefault("generateName", DEFAULT_GENERATE_NAME)
    return result


def _not_text(value: object) -> str:
    return "must not be empty" if value == "" else f"expected a string, got {kind_of(value)}"


_RESTART_POLICIES = ("Always", "OnFailure", "Never")


def _check_spec(
    spec: Mapping[str, Any], console: int, pod_path: str, problems: ConfigProblems
) -> None:
    path = key_path(pod_path, "spec")
    names: set[str] = set()
    count = 0
    for key in ("containers", "initContainers"):
        where = key_path(path, key)
        containers = spec.get(key)
        if containers is None:
            if key == "containers":
                problems.add(where, "required")
        elif not isinstance(containers, list):
            problems.add(where, f"expected a list of containers, got {kind_of(containers)}")
        elif not containers and key == "containers":
            problems.add(where, "must list at least one container")
        else:
            for i, container in enumerate(containers):
                _check_container(container, key_path(where, i), names, problems)
            if key == "containers":
                count = len(containers)
    policy = spec.get("restartPolicy")
    if policy is not None and policy not in _RESTART_POLICIES:
        choices = ", ".join(_RESTART_POLICIES)
        problems.add(key_path(path, "restartPolicy"), f"must be one of {choices}")
    if console < 0 or (count and console >= count):
        where = key_path(pod_path, "consoleContainerNumber")
        problems.add(where, f"must index a container of spec.containers (0..{max(count - 1, 0)})")


def _check_container(
    container: object, path: str, names: set[str], problems: ConfigProblems
) -> None:
    if not isinstance(container, Mapping):
        problems.add(path, f"expected a mapping (a Container), got {kind_of(container)}")
        return
    name, image = container.get("name"), container.get("image")
    name_path, image_path = key_path(path, "name"), key_path(path, "image")
    if name is None:
        problems.add(name_path, "required")
    elif not isinstance(name, str) or not name:
        problems.add(name_path, _not_text(name))
    elif problem := dns1123_label_problem(name):
        problems.add(name_path, problem)
    elif name in names:
        problems.add(name_path, f"duplicate container name {name!r}")
    else:
        names.add(name)
    if image is None:
        problems.add(image_path, "required")
    elif not isinstance(image, str) or not image:
        problems.add(image_path, _not_text(image))
