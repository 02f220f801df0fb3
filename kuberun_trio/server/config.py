"""The server's YAML configuration: ``ssh``, ``auth``, ``security``, ``kubernetes``, ``log``,
``lease``, ``gc``, ``metrics``, ``health``, ``audit``, ``configserver`` (and ``instance``).

Theory of operation
-------------------
One file, eleven sections plus a top-level ``instance`` name. Each section is a frozen attrs
class structured by the strict converter of :mod:`kuberun_trio.configtools` (camelCase
keys, unknown keys refused, no coercion); the ``kubernetes`` section *is*
:func:`kuberun_trio.core.config.parse_config`. :func:`parse_server_config` collects the
problems of all sections before raising, so one run of ``check-config`` lists every error,
each with its dotted key path (``ssh.listen: expected HOST:PORT, got "2222x"``).

This module is the entry point: :class:`ServerConfig`, loading and parsing, the
``configserver`` section and the file checks. The other sections live with their
cross-field checks by concern: ``ssh`` and ``security`` in :mod:`.sshconfig`, ``auth`` in
:mod:`.authconfig`, and ``log``, ``lease``, ``gc``, ``metrics``, ``health``, ``audit`` in
:mod:`.opsconfig`.

Paths (host keys, authorized keys, the password file) are taken as written: relative
paths are relative to the gateway's working directory, as in ContainerSSH.
:func:`check_files` is the optional third pass that opens them (``check-config`` and the
server's start both run it) so a missing file is reported with the key that named it.

Command-line flags override the file; that merge lives in :mod:`kuberun_trio.server.main`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ..configtools import (
    ConfigProblems,
    check_keys,
    duration,
    key_path,
    make_converter,
    read_yaml_mapping,
    structure_section,
)
from ..core.config import ConnectionConfig, KubernetesConfig, parse_config
from ..core.limits import Limits, MaxStartups
from ..errors import ConfigError, ConfigErrors
from ..gateway.lease import default_instance
from .authconfig import AuthConfig, check_auth
from .opsconfig import (
    AuditConfig,
    GcConfig,
    HealthConfig,
    LeaseConfig,
    LogConfig,
    MetricsConfig,
    check_audit,
    check_endpoints,
    check_lease,
    check_log,
)
from .sshconfig import SecurityConfig, SSHConfig, check_security, check_ssh


@attrs.frozen
class ConfigServerConfig:
    """ContainerSSH's configuration webhook (``configserver``; see :mod:`.configwebhook`)."""

    url: str | None = None
    """Where each connection's configuration is asked for (POST); None/empty: off."""
    timeout: float = duration(2.0)
    """Time allowed to get an answer, retries (every second) included."""
    cacert: str | None = None
    """PEM file with the CA certificate(s) of an ``https`` URL; default: system CAs."""
    cert: str | None = None
    """PEM file with a client certificate (mutual TLS); needs ``key``."""
    key: str | None = None
    """PEM file with the client certificate's private key."""
    allow_redirects: bool = False
    """Follow HTTP redirects (at most 3)."""
    transmit_sensitive_metadata: bool = False
    """Send the login's metadata and environment entries marked sensitive, too."""


@attrs.frozen
class ServerConfig:
    """The whole file."""

    ssh: SSHConfig = attrs.Factory(SSHConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    kubernetes: KubernetesConfig = attrs.Factory(KubernetesConfig.default)
    log: LogConfig = attrs.Factory(LogConfig)
    lease: LeaseConfig = attrs.Factory(LeaseConfig)
    gc: GcConfig = attrs.Factory(GcConfig)
    instance: str = attrs.Factory(default_instance)
    """This gateway's name, written into every pod's labels (orphan clean-up, ``gc``);
    default ``POD_NAME`` in a cluster, else the host name."""
    security: SecurityConfig = attrs.Factory(SecurityConfig)
    metrics: MetricsConfig = attrs.Factory(MetricsConfig)
    health: HealthConfig = attrs.Factory(HealthConfig)
    audit: AuditConfig = attrs.Factory(AuditConfig)
    configserver: ConfigServerConfig = attrs.Factory(ConfigServerConfig)

    @property
    def limits(self) -> Limits:
        """The gateway's :class:`~kuberun_trio.core.limits.Limits` (``ssh`` + ``security``)."""
        ssh, sec = self.ssh, self.security
        return Limits(
            login_grace_time=ssh.login_grace_time,
            max_startups=MaxStartups.parse(ssh.max_startups),
            max_startups_per_address=ssh.max_startups_per_address,
            client_alive_interval=ssh.client_alive_interval,
            client_alive_count_max=ssh.client_alive_count_max,
            max_connections=ssh.max_connections,
            max_sessions=sec.max_sessions,
            max_connections_per_user=sec.max_connections_per_user,
            max_signals_per_second=sec.max_signals_per_second,
            fd_reserve=sec.fd_reserve)


_CONVERTER = make_converter()
_SECTIONS = ("ssh", "auth", "security", "kubernetes", "log", "lease", "gc", "metrics", "health",
             "audit", "instance", "configserver")
_HINTS = {
    "authorized_keys": "the key is authorizedKeys",
    "hostKey": "the key is hostKeys (a list)",
    "authorizedKey": "the key is authorizedKeys (a list)",
    "MaxStartups": "the key is maxStartups",
    "maxSessionsPerConnection": "the key is security.maxSessions",
    "s3": "only audit.storage: file is supported",
    "passwords": "passwords are never recorded",
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
    raw_ssh = data.get("ssh")
    if isinstance(raw_ssh, Mapping) and isinstance(raw_ssh.get("maxStartups"), int) and \
            not isinstance(raw_ssh.get("maxStartups"), bool):
        # YAML reads an unquoted 10 as a number; OpenSSH's "10" form means start=full=10.
        raw_ssh = {**raw_ssh, "maxStartups": str(raw_ssh["maxStartups"])}
    ssh = structure_section(_CONVERTER, raw_ssh, SSHConfig, "ssh", problems, _HINTS)
    if ssh is not None:
        check_ssh(ssh, problems)
    security = structure_section(_CONVERTER, data.get("security"), SecurityConfig, "security",
                                 problems, _HINTS)
    if security is not None:
        check_security(security, problems)
    auth = structure_section(_CONVERTER, data.get("auth"), AuthConfig, "auth", problems, _HINTS)
    if auth is not None:
        check_auth(auth, problems)
    log = structure_section(_CONVERTER, data.get("log"), LogConfig, "log", problems, _HINTS)
    if log is not None:
        log = check_log(log, problems)
    lease = structure_section(_CONVERTER, data.get("lease"), LeaseConfig, "lease", problems,
                              _HINTS)
    if lease is not None:
        check_lease(lease, problems)
    gc = structure_section(_CONVERTER, data.get("gc"), GcConfig, "gc", problems, _HINTS)
    metrics = structure_section(_CONVERTER, data.get("metrics"), MetricsConfig, "metrics",
                                problems, _HINTS)
    health = structure_section(_CONVERTER, data.get("health"), HealthConfig, "health",
                               problems, _HINTS)
    check_endpoints(metrics, health, data.get("ssh"), problems)
    audit = structure_section(_CONVERTER, data.get("audit"), AuditConfig, "audit", problems,
                              _HINTS)
    if audit is not None:
        check_audit(audit, problems, files=files)
    configserver = structure_section(_CONVERTER, data.get("configserver"), ConfigServerConfig,
                                     "configserver", problems, _HINTS)
    if configserver is not None:
        _check_configserver(configserver, problems)
        if files:
            _configserver_files(configserver, problems)
    kubernetes = None
    try:
        kubernetes = parse_config(data.get("kubernetes") or {})
    except ConfigErrors as exc:
        problems.errors.extend(exc.errors)
    except ConfigError as exc:
        problems.errors.append(exc)
    name = data.get("instance", instance if instance is not None else default_instance())
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
    assert lease is not None and gc is not None and security is not None and audit is not None
    assert metrics is not None and health is not None and configserver is not None
    return ServerConfig(ssh=ssh, auth=auth, kubernetes=kubernetes, log=log, lease=lease, gc=gc,
                        instance=str(name), security=security, metrics=metrics, health=health,
                        audit=audit, configserver=configserver)


def load_server_config(path: str | os.PathLike[str], *,
                       instance: str | None = None) -> ServerConfig:
    """The configuration in the YAML file at ``path`` (see :func:`parse_server_config`)."""
    return parse_server_config(read_yaml_mapping(path), instance=instance)


def check_files(config: ServerConfig, *, cluster: bool = False) -> None:
    """Open every file the configuration names; raise a ConfigError per unusable one.

    Host keys must parse as private keys; the other files must be readable. ``cluster``
    also checks that the cluster connection loads (:mod:`.kubecheck`).
    """
    problems = ConfigProblems()
    _file_problems(config.ssh, config.auth, problems)
    _configserver_files(config.configserver, problems)
    check_audit(config.audit, problems, files=True)
    if cluster:
        from .kubecheck import connection_problems

        problems.errors.extend(connection_problems(config.kubernetes.connection))
    problems.raise_if_any()


def _check_configserver(config: ConfigServerConfig, problems: ConfigProblems) -> None:
    if not config.url:
        return
    if not re.match(r"https?://[^/]", config.url):
        problems.add("configserver.url",
                     f"expected an http:// or https:// URL, got {config.url!r}")
    for name in ("cacert", "cert", "key"):
        if getattr(config, name) is not None and not config.url.startswith("https://"):
            problems.add(f"configserver.{name}", "only valid with an https:// url")
    if (config.cert is None) != (config.key is None):
        problems.add("configserver.cert" if config.cert is None else "configserver.key",
                     "configserver.cert and configserver.key go together")


def _configserver_files(config: ConfigServerConfig, problems: ConfigProblems) -> None:
    for name in ("cacert", "cert", "key"):
        path = getattr(config, name) if config.url else None
        if path is not None:
            try:
                _read(path)
            except OSError as exc:
                problems.add(f"configserver.{name}", f"cannot read {path}: {exc.strerror or exc}")


_T = TypeVar("_T")


def _lenient(cls: type[_T], raw: Any, fields: tuple[str, ...]) -> _T | None:
    """``cls`` with only the well-formed path ``fields`` of the raw section (or None)."""
    if not isinstance(raw, Mapping):
        return None
    kwargs: dict[str, Any] = {}
    defaults = attrs.fields_dict(cls)  # type: ignore[arg-type]
    for name in fields:
        head, *rest = name.split("_")
        value = raw.get(head + "".join(w.title() for w in rest))
        wants_list = isinstance(defaults[name].default, tuple)  # else one path or None
        if isinstance(value, str) and not wants_list:
            kwargs[name] = value
        elif (wants_list and isinstance(value, list)
              and all(isinstance(v, str) for v in value)):
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
