"""The server's YAML configuration: ``ssh``, ``auth``, ``kubernetes``, ``log`` (and ``instance``).

Theory of operation
-------------------
One file, four sections plus a top-level ``instance`` name. Each section is a frozen attrs
class structured by the strict converter of :mod:`kuberun_trio.configtools` (camelCase
keys, unknown keys refused, no coercion); the ``kubernetes`` section *is*
:func:`kuberun_trio.gateway.config.parse_config`. :func:`parse_server_config` collects the
problems of all sections before raising, so one run of ``check-config`` lists every error,
each with its dotted key path (``ssh.listen: expected HOST:PORT, got "2222x"``).

Paths (host keys, authorized keys, the password file) are taken as written: relative
paths are relative to the gateway's working directory, as in ContainerSSH.
:func:`check_files` is the optional third pass that opens them (``check-config`` and the
server's start both run it) so a missing file is reported with the key that named it.

Command-line flags override the file; that merge lives in :mod:`kuberun_trio.server.main`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ..configtools import (
    ConfigProblems,
    InvalidValue,
    check_keys,
    duration,
    key_path,
    make_converter,
    read_yaml_mapping,
    structure_section,
)
from ..errors import ConfigError, ConfigErrors
from ..gateway.config import ConnectionConfig, KubernetesConfig, parse_config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2222
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@attrs.frozen
class WebhookConfig:
    """A ContainerSSH-compatible authentication webhook (``auth.webhook``)."""

    url: str
    """Base URL; the gateway POSTs to ``{url}/password`` and ``{url}/pubkey``."""
    timeout: float = duration(2.0)
    """Time allowed for one webhook request (YAML: ``"2s"`` or a number of seconds)."""
    cacert: str | None = None
    """PEM file with the CA certificate(s) of an ``https`` webhook; default: system CAs."""


@attrs.frozen
class AuthConfig:
    """Who may connect (``auth``). Deny by default: with nothing configured, nobody can."""

    authorized_keys: tuple[str, ...] = ()
    """OpenSSH ``authorized_keys`` files; a key in any of them lets any username in. A
    path with ``%u`` (username), ``%h`` (``homeDirectory``) or ``%%`` is a per-user file
    (OpenSSH ``AuthorizedKeysFile`` tokens): its keys let only that username in."""
    password_file: str | None = None
    """File of ``user:hash`` lines (argon2 or bcrypt hashes)."""
    webhook: WebhookConfig | None = None
    """Ask a webhook about passwords and public keys (after the local files said no)."""
    home_directory: str = "/home/%u"
    """What ``%h`` stands for: gateway users are not host users, so not the passwd entry."""


@attrs.frozen
class SSHConfig:
    """The SSH listener (``ssh``)."""

    listen: str = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    """``HOST:PORT`` (``[::1]:2222`` for IPv6; port 0 picks a free one)."""
    host_keys: tuple[str, ...] = ()
    """Host private key files (OpenSSH or PEM). None: an ed25519 key in the state dir."""

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as (host, port); the value was checked when it was loaded."""
        return parse_listen(self.listen)


@attrs.frozen
class LogConfig:
    """Logging (``log``)."""

    format: str = "text"
    """``text`` (one readable line per event) or ``json`` (one JSON object per line)."""
    level: str = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``."""


@attrs.frozen
class ServerConfig:
    """The whole file."""

    ssh: SSHConfig = attrs.Factory(SSHConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    kubernetes: KubernetesConfig = attrs.Factory(KubernetesConfig.default)
    log: LogConfig = attrs.Factory(LogConfig)
    instance: str = attrs.Factory(socket.gethostname)
    """This gateway's name, written into every pod's labels (orphan clean-up, ``gc``)."""


_LISTEN = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]+)")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); an empty host means every interface (``0.0.0.0``).

    Raises :class:`~kuberun_trio.configtools.InvalidValue` (a ``ValueError``).
    """
    match = _LISTEN.fullmatch(text)
    if match is None:
        raise InvalidValue(f'expected HOST:PORT (e.g. "0.0.0.0:2222"), got {text!r}')
    port = int(match["port"])
    if port > 65535:
        raise InvalidValue(f"port must be 0..65535, got {port}")
    host = match["v6"] if match["v6"] is not None else match["host"]
    return host or "0.0.0.0", port


_CONVERTER = make_converter()
_SECTIONS = ("ssh", "auth", "kubernetes", "log", "instance")
_HINTS = {
    "authorized_keys": "the key is authorizedKeys",
    "hostKey": "the key is hostKeys (a list)",
    "authorizedKey": "the key is authorizedKeys (a list)",
}


def parse_server_config(data: Mapping[str, Any], *, instance: str | None = None,
                        files: bool = False, cluster: bool = False) -> ServerConfig:
    """Structure and check a whole configuration mapping; raise every problem at once.

    ``instance`` is the default for a file without ``instance`` (the host name if None).
    ``files`` also opens the files it names (:func:`check_files`) and ``cluster`` loads the
    cluster connection (:mod:`.kubecheck`), for every section that structured -- so one
    ``check-config`` lists a bad ``ssh.listen`` together with a missing kubeconfig.
    Raises :class:`ConfigError` (one problem) or :class:`ConfigErrors` (several).
    """
    problems = ConfigProblems()
    check_keys(data, _SECTIONS, "", problems, _HINTS)
    ssh = structure_section(_CONVERTER, data.get("ssh"), SSHConfig, "ssh", problems, _HINTS)
    if ssh is not None:
        try:
            parse_listen(ssh.listen)
        except InvalidValue as exc:
            problems.add("ssh.listen", str(exc))
    auth = structure_section(_CONVERTER, data.get("auth"), AuthConfig, "auth", problems, _HINTS)
    if auth is not None and auth.webhook is not None:
        _check_webhook(auth.webhook, problems)
    if auth is not None:
        _check_templates(auth, problems)
    log = structure_section(_CONVERTER, data.get("log"), LogConfig, "log", problems, _HINTS)
    if log is not None:
        if log.format not in LOG_FORMATS:
            problems.add("log.format", f"must be text or json, got {log.format!r}")
        if log.level.upper() not in LOG_LEVELS:
            problems.add("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {log.level!r}")
        else:
            log = attrs.evolve(log, level=log.level.upper())
    kubernetes = None
    try:
        kubernetes = parse_config(data.get("kubernetes") or {})
    except ConfigErrors as exc:
        problems.errors.extend(exc.errors)
    except ConfigError as exc:
        problems.errors.append(exc)
    name = data.get("instance", instance if instance is not None else socket.gethostname())
    if not isinstance(name, str) or not name.strip():
        problems.add("instance", "must be a non-empty string")
    if files:  # a section that did not structure still has its file names checked
        _file_problems(ssh or _lenient(SSHConfig, data.get("ssh"), ("host_keys",)),
                       auth or _lenient(AuthConfig, data.get("auth"),
                                        ("authorized_keys", "password_file")), problems)
    if cluster:
        from .kubecheck import connection_problems

        connection = kubernetes.connection if kubernetes is not None else _connection_only(data)
        if connection is not None:
            problems.errors.extend(connection_problems(connection))
    problems.raise_if_any()
    assert ssh is not None and auth is not None and log is not None and kubernetes is not None
    return ServerConfig(ssh=ssh, auth=auth, kubernetes=kubernetes, log=log, instance=str(name))


_T = TypeVar("_T")


def _lenient(cls: type[_T], raw: Any, fields: tuple[str, ...]) -> _T | None:
    """``cls`` with only the well-formed path ``fields`` of the raw section (or None)."""
    if not isinstance(raw, Mapping):
        return None
    kwargs: dict[str, Any] = {}
    for name in fields:
        head, *rest = name.split("_")
        value = raw.get(head + "".join(w.title() for w in rest))
        if isinstance(value, str):
            kwargs[name] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            kwargs[name] = tuple(value)
    return cls(**kwargs)


def _connection_only(data: Mapping[str, Any]) -> ConnectionConfig | None:
    """``kubernetes.connection`` on its own, when another part of ``kubernetes`` is bad."""
    section = data.get("kubernetes")
    raw = section.get("connection") if isinstance(section, Mapping) else None
    try:
        return parse_config({"connection": raw} if raw is not None else {}).connection
    except ConfigError:
        return None


def load_server_config(path: str | os.PathLike[str], *,
                       instance: str | None = None) -> ServerConfig:
    """The configuration in the YAML file at ``path`` (see :func:`parse_server_config`)."""
    return parse_server_config(read_yaml_mapping(path), instance=instance)


def _check_templates(auth: AuthConfig, problems: ConfigProblems) -> None:
    from .authkeys import template_problem

    for i, path in enumerate(auth.authorized_keys):
        if (problem := template_problem(path)) is not None:
            problems.add(key_path("auth.authorizedKeys", i), problem)
    problem = template_problem(auth.home_directory)
    if problem is None and "%h" in auth.home_directory:
        problem = "%h cannot be used in its own definition"
    if problem is not None:
        problems.add("auth.homeDirectory", problem)


def _check_webhook(webhook: WebhookConfig, problems: ConfigProblems) -> None:
    if not re.match(r"https?://[^/]", webhook.url):
        problems.add("auth.webhook.url",
                     f"expected an http:// or https:// URL, got {webhook.url!r}")
    if webhook.cacert is not None and not webhook.url.startswith("https://"):
        problems.add("auth.webhook.cacert", "only valid with an https:// url")


def check_files(config: ServerConfig, *, cluster: bool = False) -> None:
    """Open every file the configuration names; raise a ConfigError per unusable one.

    Host keys must parse as private keys; the other files must be readable. ``cluster``
    also checks that the cluster connection loads (:mod:`.kubecheck`).
    """
    problems = ConfigProblems()
    _file_problems(config.ssh, config.auth, problems)
    if cluster:
        from .kubecheck import connection_problems

        problems.errors.extend(connection_problems(config.kubernetes.connection))
    problems.raise_if_any()


def _file_problems(ssh: SSHConfig | None, auth: AuthConfig | None,
                   problems: ConfigProblems) -> None:
    from .keys import load_private_key  # cryptography only; kept out of plain parsing

    for i, path in enumerate(ssh.host_keys if ssh is not None else ()):
        where = key_path("ssh.hostKeys", i)
        try:
            load_private_key(_read(path))
        except OSError as exc:
            problems.add(where, f"cannot read {path}: {exc.strerror or exc}")
        except ValueError as exc:
            problems.add(where, f"{path} is not an OpenSSH or PEM private key: {exc}")
    if auth is None:
        return
    named = [(key_path("auth.authorizedKeys", i), p)
             for i, p in enumerate(auth.authorized_keys) if "%" not in p]  # per-user: later
    if auth.password_file is not None:
        named.append(("auth.passwordFile", auth.password_file))
    if auth.webhook is not None and auth.webhook.cacert is not None:
        named.append(("auth.webhook.cacert", auth.webhook.cacert))
    for where, path in named:
        try:
            _read(path)
        except OSError as exc:
            problems.add(where, f"cannot read {path}: {exc.strerror or exc}")


def _read(path: str) -> bytes:
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()
