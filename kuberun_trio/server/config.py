"""The server's YAML configuration: ``ssh``, ``auth``, ``kubernetes``, ``log``, ``metrics``,
``health`` (and ``instance``).

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

import contextlib
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

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
from ..gateway.config import KubernetesConfig, parse_config

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
    """OpenSSH ``authorized_keys`` files; a key in any of them lets any username in."""
    password_file: str | None = None
    """File of ``user:hash`` lines (argon2 or bcrypt hashes)."""
    webhook: WebhookConfig | None = None
    """Ask a webhook about passwords and public keys (after the local files said no)."""


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


DEFAULT_METRICS_LISTEN = "0.0.0.0:9100"
DEFAULT_HEALTH_LISTEN = "0.0.0.0:7000"


@attrs.frozen
class MetricsConfig:
    """The Prometheus endpoint (``metrics``, ContainerSSH's keys)."""

    enable: bool = False
    """Serve the metrics (the demo turns this on)."""
    listen: str = DEFAULT_METRICS_LISTEN
    """``HOST:PORT`` of the metrics HTTP server."""
    path: str = "/metrics"
    """The URL path of the metrics."""

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


@attrs.frozen
class HealthConfig:
    """The health endpoint (``health``): ``/healthz``, ``/readyz``, any path = readiness."""

    enable: bool = False
    listen: str = DEFAULT_HEALTH_LISTEN
    """``HOST:PORT`` of the health HTTP server."""

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


@attrs.frozen
class ServerConfig:
    """The whole file."""

    ssh: SSHConfig = attrs.Factory(SSHConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    kubernetes: KubernetesConfig = attrs.Factory(KubernetesConfig.default)
    log: LogConfig = attrs.Factory(LogConfig)
    metrics: MetricsConfig = attrs.Factory(MetricsConfig)
    health: HealthConfig = attrs.Factory(HealthConfig)
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
_SECTIONS = ("ssh", "auth", "kubernetes", "log", "instance", "metrics", "health")
_HINTS = {
    "authorized_keys": "the key is authorizedKeys",
    "hostKey": "the key is hostKeys (a list)",
    "authorizedKey": "the key is authorizedKeys (a list)",
}


def parse_server_config(data: Mapping[str, Any], *, instance: str | None = None) -> ServerConfig:
    """Structure and check a whole configuration mapping; raise every problem at once.

    ``instance`` is the default for a file without ``instance`` (the host name if None).
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
    log = structure_section(_CONVERTER, data.get("log"), LogConfig, "log", problems, _HINTS)
    if log is not None:
        if log.format not in LOG_FORMATS:
            problems.add("log.format", f"must be text or json, got {log.format!r}")
        if log.level.upper() not in LOG_LEVELS:
            problems.add("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {log.level!r}")
        else:
            log = attrs.evolve(log, level=log.level.upper())
    metrics, health = _observe_sections(data, problems)
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
    problems.raise_if_any()
    assert ssh is not None and auth is not None and log is not None and kubernetes is not None
    assert metrics is not None and health is not None
    return ServerConfig(ssh=ssh, auth=auth, kubernetes=kubernetes, log=log, instance=str(name),
                        metrics=metrics, health=health)


def _observe_sections(data: Mapping[str, Any], problems: ConfigProblems
                      ) -> tuple[MetricsConfig | None, HealthConfig | None]:
    """The ``metrics`` and ``health`` sections, checked."""
    metrics = structure_section(_CONVERTER, data.get("metrics"), MetricsConfig, "metrics",
                                problems, _HINTS)
    health = structure_section(_CONVERTER, data.get("health"), HealthConfig, "health",
                               problems, _HINTS)
    addresses: dict[str, tuple[str, int]] = {}
    for name, section in (("metrics", metrics), ("health", health)):
        if section is None:
            continue
        try:
            addresses[name] = parse_listen(section.listen)
        except InvalidValue as exc:
            problems.add(f"{name}.listen", str(exc))
    if metrics is not None and not re.fullmatch(r"/[!-~]*", metrics.path):
        problems.add("metrics.path", f'must start with "/" and hold no spaces, got '
                                     f"{metrics.path!r}")
    elif metrics is not None and metrics.path in ("/healthz", "/readyz"):
        problems.add("metrics.path", f"{metrics.path} is the health endpoint's")
    ssh_address = None
    with contextlib.suppress(InvalidValue):
        ssh_address = parse_listen(str((data.get("ssh") or {}).get("listen", "")
                                       if isinstance(data.get("ssh"), Mapping) else ""))
    for name, address in addresses.items():
        if ssh_address is not None and _clash(address, ssh_address):
            problems.add(f"{name}.listen", f"port {address[1]} is the SSH listener's")
    if len(addresses) == 2 and addresses["metrics"] != addresses["health"] and _clash(
            addresses["metrics"], addresses["health"]):
        problems.add("health.listen", "clashes with metrics.listen (use the same address "
                                      "to serve both from one server, or another port)")
    return metrics, health


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Would binding both fail (same port; same host, or one binds every interface)?"""
    wildcard = ("0.0.0.0", "::")
    return a[1] != 0 and a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard
                                           or b[0] in wildcard)


def load_server_config(path: str | os.PathLike[str], *,
                       instance: str | None = None) -> ServerConfig:
    """The configuration in the YAML file at ``path`` (see :func:`parse_server_config`)."""
    return parse_server_config(read_yaml_mapping(path), instance=instance)


def _check_webhook(webhook: WebhookConfig, problems: ConfigProblems) -> None:
    if not re.match(r"https?://[^/]", webhook.url):
        problems.add("auth.webhook.url",
                     f"expected an http:// or https:// URL, got {webhook.url!r}")
    if webhook.cacert is not None and not webhook.url.startswith("https://"):
        problems.add("auth.webhook.cacert", "only valid with an https:// url")


def check_files(config: ServerConfig) -> None:
    """Open every file the configuration names; raise a ConfigError per unusable one.

    Host keys must parse as private keys; the other files must be readable.
    """
    from .keys import load_private_key  # cryptography only; kept out of plain parsing

    problems = ConfigProblems()
    for i, path in enumerate(config.ssh.host_keys):
        where = key_path("ssh.hostKeys", i)
        try:
            load_private_key(_read(path))
        except OSError as exc:
            problems.add(where, f"cannot read {path}: {exc.strerror or exc}")
        except ValueError as exc:
            problems.add(where, f"{path} is not an OpenSSH or PEM private key: {exc}")
    named = [(key_path("auth.authorizedKeys", i), p)
             for i, p in enumerate(config.auth.authorized_keys)]
    if config.auth.password_file is not None:
        named.append(("auth.passwordFile", config.auth.password_file))
    if config.auth.webhook is not None and config.auth.webhook.cacert is not None:
        named.append(("auth.webhook.cacert", config.auth.webhook.cacert))
    for where, path in named:
        try:
            _read(path)
        except OSError as exc:
            problems.add(where, f"cannot read {path}: {exc.strerror or exc}")
    problems.raise_if_any()


def _read(path: str) -> bytes:
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()
