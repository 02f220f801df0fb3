"""The gateway's ``kubernetes:`` configuration: frozen values, loaded from YAML, checked hard.

The keys follow ContainerSSH's kubernetes backend (``connection``, ``pod``, ``timeouts``), so
a ContainerSSH ``kubernetes:`` section in connection mode loads unchanged, except for its
agent keys (kuberun_trio needs no agent in the pod) and ``mode: session``.

Loading runs in two passes, and reports *every* problem it finds, each as a
:class:`~kuberun_trio.errors.ConfigError` naming the dotted key path
(``kubernetes.timeouts.podStart: invalid duration "6x"``); several at once come as one
:class:`~kuberun_trio.errors.ConfigErrors`.

1. *Structure*: a strict cattrs converter (:func:`make_converter`) turns each section into
   its attrs class. Keys are the camelCase form of the attribute names; unknown keys are
   errors (with a "did you mean" hint), and nothing is coerced: ``"5"`` is not a number and
   ``"false"`` is not a boolean. Durations accept Go syntax (``"1m30s"``) or a number of
   seconds (:func:`parse_duration`).
2. *Check*: cross-field rules -- one connection source, credential pairs, the pod spec's
   containers, label and env names -- and defaults that depend on what was given.

The generic half (:func:`key_path`, :class:`ConfigProblems`, :class:`InvalidValue`,
:func:`make_converter`, :func:`structure_section`, :func:`check_keys`,
:func:`read_yaml_mapping`) is meant for the other sections of the server configuration too.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import attrs
import cattrs
import yaml
from cattrs.gen import make_dict_structure_fn, override

from ..errors import ConfigError, ConfigErrors
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

T = TypeVar("T")

# == generic machinery ===========================================================================

_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def key_path(parent: str, key: object) -> str:
    """``parent`` extended by ``key``: ``a.b``, ``a[0]``, ``a["app.kubernetes.io/x"]``."""
    if not isinstance(key, str):
        return f"{parent}[{key!r}]"
    if _SIMPLE_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def kind_of(value: object) -> str:
    """The YAML name of ``value``'s type, for messages."""
    for types, name in (
        (type(None), "null"),
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (Mapping, "mapping"),
        (list, "list"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


class ConfigProblems:
    """Collects configuration errors so that one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        """The problems found so far, in discovery order."""

    def add(self, path: str, problem: str) -> None:
        self.errors.append(ConfigError(path, problem))

    def __len__(self) -> int:
        return len(self.errors)

    def raise_if_any(self) -> None:
        """Raise the one error, or :class:`ConfigErrors` for several; return if none."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


SubProblem = tuple[tuple[object, ...], str]
"""A problem below some value: (keys leading to it, problem)."""


class InvalidValue(ValueError):
    """Raised by structure hooks; ``problems`` are (keys below the value, problem) pairs."""

    def __init__(self, problem: str) -> None:
        self.problems: Sequence[SubProblem] = [((), problem)]
        super().__init__(problem)

    @classmethod
    def at(cls, problems: Sequence[SubProblem]) -> InvalidValue:
        """Several problems at sub-keys (``problems`` must not be empty)."""
        error = cls(problems[0][1])
        error.problems = problems
        return error


def config_key(attribute: attrs.Attribute[Any]) -> str:
    """The YAML key of an attrs attribute: ``metadata={"key": ...}`` or its camelCase name."""
    key = attribute.metadata.get("key")
    if isinstance(key, str):
        return key
    head, *rest = attribute.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def duration(default: float, key: str | None = None) -> Any:
    """An attrs field holding float seconds, read with :func:`parse_duration`."""
    metadata: dict[str, object] = {"duration": True}
    if key is not None:
        metadata["key"] = key
    return attrs.field(default=default, metadata=metadata)


def unknown_key_problem(key: object, known: Iterable[str], hints: Mapping[str, str]) -> str:
    """``unknown key``, plus a hint for known foreign keys or a close known key."""
    if isinstance(key, str) and key in hints:
        return f"unknown key: {hints[key]}"
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def check_keys(
    data: Mapping[Any, Any],
    known: Iterable[str],
    path: str,
    problems: ConfigProblems,
    hints: Mapping[str, str] | None = None,
) -> None:
    """Report every key of ``data`` not in ``known``."""
    known = list(known)
    for key in data:
        if key not in known:
            problems.add(key_path(path, key), unknown_key_problem(key, known, hints or {}))


_Hook = Callable[[Any, Any], Any]


def _strict(kind: type[Any] | tuple[type[Any], ...], name: str, convert: _Hook | None) -> _Hook:
    def hook(value: Any, _type: Any) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise InvalidValue(f"expected {name}, got {kind_of(value)}")
        return convert(value, _type) if convert else value

    return hook


def _structure_strings(value: Any, _type: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidValue(f"expected a list of strings, got {kind_of(value)}")
    bad: list[SubProblem] = [
        ((i,), f"expected a string, got {kind_of(v)}")
        for i, v in enumerate(value)
        if not isinstance(v, str)
    ]
    if bad:
        raise InvalidValue.at(bad)
    return tuple(value)


def _mapping(value: Any) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidValue(f"expected a mapping, got {kind_of(value)}")
    return value


def _non_string_keys(value: Mapping[Any, Any]) -> list[SubProblem]:
    return [((k,), "keys must be strings") for k in value if not isinstance(k, str)]


def _structure_str_map(value: Any, _type: Any) -> dict[str, str]:
    value = _mapping(value)
    bad = _non_string_keys(value)
    bad += [
        ((k,), f"expected a string, got {kind_of(v)}")
        for k, v in value.items()
        if not isinstance(v, str)
    ]
    if bad:
        raise InvalidValue.at(bad)
    return dict(value)


def _structure_object(value: Any, _type: Any) -> dict[str, Any]:
    value = _mapping(value)
    bad = _non_string_keys(value)
    if bad:
        raise InvalidValue.at(bad)
    return copy.deepcopy(dict(value))


def parse_duration(value: object) -> float:
    """Seconds from a Go duration (``"1m30s"``, ``"500ms"``) or a number; must be > 0.

    Raises :class:`InvalidValue` (a ``ValueError``) with a one-line problem.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidValue(
            f'expected a duration like "60s" or a number of seconds, got {kind_of(value)}'
        )
    seconds = _parse_go_duration(value) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidValue(f"must be a positive duration, got {value!r}")
    return seconds


_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _parse_go_duration(text: str) -> float:
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    while body and pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if not match:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if not body or pos < len(body):
        hint = ' (missing unit, e.g. "60s")' if re.fullmatch(r"[0-9.]+", body) else ""
        raise InvalidValue(f"invalid duration {json.dumps(text, ensure_ascii=False)}{hint}")
    return sign * total


def _structure_duration(value: Any, _type: Any) -> float:
    return parse_duration(value)


def make_converter() -> cattrs.Converter:
    """A strict cattrs converter for attrs config classes.

    camelCase keys (override with field ``metadata={"key": ...}``), unknown keys forbidden,
    no coercion between str/int/float/bool, ``None`` for a section means "all defaults",
    ``duration(...)`` fields parsed by :func:`parse_duration`, and typed hooks for
    ``tuple[str, ...]``, ``Mapping[str, str]`` and ``Mapping[str, Any]`` (deep-copied).
    """
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string", None))
    conv.register_structure_hook(bool, _strict(bool, "a boolean", None))
    conv.register_structure_hook(int, _strict(int, "an integer", None))
    conv.register_structure_hook(float, _strict((int, float), "a number", lambda v, _: float(v)))
    for hook_type, hook in (
        (tuple[str, ...], _structure_strings),
        (Mapping[str, str], _structure_str_map),
        (Mapping[str, Any], _structure_object),
    ):
        conv.register_structure_hook_func(_is_type(hook_type), hook)

    def section_hook(cls: type[Any]) -> _Hook:
        overrides = {
            a.name: override(
                rename=config_key(a),
                struct_hook=_structure_duration if a.metadata.get("duration") else None,
            )
            for a in attrs.fields(cls)
        }
        inner = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, **cast(dict[str, Any], overrides)
        )

        def hook(value: Any, _type: Any) -> Any:
            return inner(_mapping(value), _type)

        return hook

    conv.register_structure_hook_factory(attrs.has, section_hook)
    return conv


def _is_type(expected: object) -> Callable[[Any], bool]:
    return lambda t: bool(t == expected)


def structure_section(
    converter: cattrs.Converter,
    data: object,
    cls: type[T],
    path: str,
    problems: ConfigProblems,
    hints: Mapping[str, str] | None = None,
) -> T | None:
    """``data`` structured as ``cls``, or None with every problem added under ``path``."""
    try:
        return converter.structure(data, cls)
    except (InvalidValue, cattrs.BaseValidationError) as exc:
        _report(exc, path, problems, hints or {})
        return None


def _report(
    exc: BaseException, path: str, problems: ConfigProblems, hints: Mapping[str, str]
) -> None:
    """Add the problems of a cattrs error tree, each under its key path."""
    if isinstance(exc, InvalidValue):
        for keys_below, problem in exc.problems:
            where = path
            for key in keys_below:
                where = key_path(where, key)
            problems.add(where, problem)
    elif isinstance(exc, cattrs.ClassValidationError):
        keys = {a.name: config_key(a) for a in attrs.fields(exc.cl)}
        with_notes, without_notes = exc.group_exceptions()
        for inner, note in with_notes:
            _report(inner, key_path(path, keys.get(note.name, note.name)), problems, hints)
        for inner in without_notes:
            _report(inner, path, problems, hints)
    elif isinstance(exc, cattrs.ForbiddenExtraKeysError):
        known = [config_key(a) for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields, key=str):
            problems.add(key_path(path, key), unknown_key_problem(key, known, hints))
    elif isinstance(exc, KeyError):
        problems.add(path, "required")
    elif isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            _report(member, path, problems, hints)
    else:
        problems.add(path, f"invalid value: {exc}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key is an error, not "last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The top-level mapping of a YAML file; unreadable, invalid or non-mapping is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read configuration file {os.fspath(path)}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{os.fspath(path)}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problem = f"{os.fspath(path)}: expected a mapping at the top level, got {kind_of(data)}"
        raise ConfigError("", problem)
    return data


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
    """Only ``connection`` (one pod per SSH connection, sessions are execs)."""
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
        section = _mapping(data)
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


def _check_pod(pod: PodConfig, path: str, problems: ConfigProblems) -> PodConfig:
    if pod.mode == "session":
        problems.add(
            key_path(path, "mode"),
            "session mode is not supported: kuberun_trio runs "
            "one pod per SSH connection; set mode: connection or remove it",
        )
    elif pod.mode != "connection":
        problems.add(
            key_path(path, "mode"), f"unknown mode {pod.mode!r}; only connection is supported"
        )
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
