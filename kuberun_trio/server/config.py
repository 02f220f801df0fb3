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
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ..configtools import (
    ConfigProblems,
    InvalidValue,
    check_keys,
    duration,
    duration_or_off,
    key_path,
    make_converter,
    read_yaml_mapping,
    structure_section,
)
from ..configtools import duration as duration_field
from ..core.audit import DEFAULT_MAX_COMMAND_BYTES, AuditPolicy
from ..core.config import ConnectionConfig, KubernetesConfig, parse_config
from ..core.forwarding import FORWARDING_MODES, AgentOptions, ForwardingPolicy, command_problems
from ..core.limits import Limits, MaxStartups
from ..core.podtemplate import dns1123_label_problem
from ..errors import ConfigError, ConfigErrors
from ..gateway.lease import default_instance
from ..gateway.throttle import LoginPolicy
from ..gateway.timelimits import SessionTimeLimits
from ..recording import RecordingOptions

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2222
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_COMMAND_BYTES_LIMIT = 64 * 1024
"""The largest ``log.maxCommandBytes`` (the longest command a session accepts at all)."""


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
class ThrottleConfig:
    """Login throttling (``auth.throttle``): see :mod:`kuberun_trio.gateway.throttle`."""

    free_failures: int = 3
    """Attempts (per address and per username) since the last success that cost no wait."""
    delay: float = duration(1.0)
    """The wait after the first attempt beyond ``freeFailures``; it doubles with each."""
    max_delay: float = duration(10.0)
    """The longest wait; an attempt whose turn is further away is refused at once."""
    forget_after: float = duration(900.0)
    """Time after an address's or username's last attempt when its count restarts."""


@attrs.frozen
class PasswordHashingConfig:
    """Password verification (``auth.passwordHashing``): see :mod:`.hashing`."""

    threads: int = 2
    """Worker threads verifying hashes at once (argon2's default uses 64 MiB each)."""
    queue: int = 16
    """Checks that may wait for a thread; beyond that a password login is refused at once."""


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
    max_tries: int = 6
    """Failed attempts per connection (offered keys count) before it is disconnected."""
    throttle: ThrottleConfig = attrs.Factory(ThrottleConfig)
    password_hashing: PasswordHashingConfig = attrs.Factory(PasswordHashingConfig)

    def login_policy(self) -> LoginPolicy:
        """The gateway's :class:`~kuberun_trio.gateway.throttle.LoginPolicy` for this section."""
        t = self.throttle
        return LoginPolicy(max_tries=self.max_tries, free_failures=t.free_failures,
                           delay=t.delay, max_delay=t.max_delay, forget_after=t.forget_after)
    home_directory: str = "/home/%u"
    """What ``%h`` stands for: gateway users are not host users, so not the passwd entry."""


@attrs.frozen
class SSHConfig:
    """The SSH listener (``ssh``)."""

    listen: str = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    """``HOST:PORT`` (``[::1]:2222`` for IPv6; port 0 picks a free one)."""
    host_keys: tuple[str, ...] = ()
    """Host private key files (OpenSSH or PEM). None: an ed25519 key in the state dir."""
    login_grace_time: float = duration(60.0)
    """Time from TCP connect to a completed login; then the client is disconnected."""
    max_startups: str = "10:30:100"
    """OpenSSH's ``start:rate:full``: random early drop of unauthenticated connections."""
    max_startups_per_address: int = 10
    """Unauthenticated connections from one source address at once."""
    client_alive_interval: float = duration(15.0)
    """Silence after which the gateway probes the client (``keepalive@openssh.com``)."""
    client_alive_count_max: int = 3
    """Unanswered probes before the connection is closed (and its pod deleted)."""
    max_connections: int = 1000
    """Open connections at once, authenticated or not."""
    idle_timeout: float = duration_or_off()
    """No session channel data in either direction for this long ends the connection
    (keepalives do not count); 0: off."""
    max_session_duration: float = duration_or_off()
    """Time from login after which the connection is ended; 0: off. Pods then get
    ``activeDeadlineSeconds`` = this + ``timeoutGracePeriod`` + ``kubernetes.timeouts.podStop``."""
    timeout_warning: float = duration_or_off(60.0)
    """A warning is written to every open session this long before a limit (at most half
    the limit); 0: none."""
    timeout_grace_period: float = duration_or_off(10.0)
    """Time from the SIGTERM at a limit to closing the channels and the connection."""

    @property
    def time_limits(self) -> SessionTimeLimits:
        """The gateway's :class:`~kuberun_trio.gateway.timelimits.SessionTimeLimits`."""
        return SessionTimeLimits(idle_timeout=self.idle_timeout or None,
                                 max_session_duration=self.max_session_duration or None,
                                 timeout_warning=self.timeout_warning,
                                 timeout_grace_period=self.timeout_grace_period)

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as (host, port); the value was checked when it was loaded."""
        return parse_listen(self.listen)


@attrs.frozen
class ForwardingConfig:
    """``security.forwarding`` (ContainerSSH's keys; ``maxAgentConnections`` is ours)."""

    forwarding_mode: str = "disable"
    """``enable``: ``ssh -L``/``-D`` to the pod itself (``pods/portforward``); ``disable``."""
    pod_network_command: list[str] | None = None
    """argv run in the pod for other destinations (``{host}``, ``{port}``); None: refused."""
    agent_forwarding_mode: str = "disable"
    """``enable``: ``ssh -A`` works through a relay in the pod (gateway/agent.py)."""
    max_agent_connections: int = 8
    """Agent connections carried at once per SSH connection; more are refused."""

    def policy(self) -> ForwardingPolicy:
        """The gateway's :class:`~kuberun_trio.core.forwarding.ForwardingPolicy`."""
        command = self.pod_network_command
        return ForwardingPolicy(enabled=self.forwarding_mode == "enable",
                                pod_network_command=tuple(command) if command else None)

    @property
    def agent(self) -> AgentOptions:
        """The gateway's :class:`~kuberun_trio.core.forwarding.AgentOptions`."""
        return AgentOptions(enabled=self.agent_forwarding_mode == "enable",
                            max_connections=self.max_agent_connections)


def _check_forwarding(forwarding: ForwardingConfig, problems: ConfigProblems) -> None:
    for key, mode in (("forwardingMode", forwarding.forwarding_mode),
                      ("agentForwardingMode", forwarding.agent_forwarding_mode)):
        if mode not in FORWARDING_MODES:
            problems.add(f"security.forwarding.{key}", f"must be enable or disable, got {mode!r}")
    _at_least(problems, "security.forwarding.maxAgentConnections",
              forwarding.max_agent_connections, 1)
    if forwarding.pod_network_command is not None:
        for problem in command_problems(forwarding.pod_network_command):
            problems.add("security.forwarding.podNetworkCommand", problem)


@attrs.frozen
class SecurityConfig:
    """Limits for authenticated users (``security``; ContainerSSH's keys where it has them)."""

    max_sessions: int = 10
    """Session channels open at once on one connection."""
    max_connections_per_user: int = 10
    """Connections of one username at once (counted in this gateway process)."""
    max_signals_per_second: float = 5.0
    """``signal`` requests one session may make per second; the excess is refused."""
    fd_reserve: int = 64
    """File descriptors kept free: new TCP connections are refused below this."""
    forwarding: ForwardingConfig = attrs.Factory(ForwardingConfig)
    """Port and agent forwarding (all off by default)."""


@attrs.frozen
class LogConfig:
    """Logging (``log``)."""

    format: str = "text"
    """``text`` (one readable line per event) or ``json`` (one JSON object per line)."""
    level: str = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``."""
    commands: bool = True
    """Log the command of every ``exec`` session (false: commands appear in no line)."""
    max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES
    """Longest command logged, in UTF-8 bytes; longer ones are cut and marked."""

    @property
    def audit(self) -> AuditPolicy:
        """The gateway's :class:`~kuberun_trio.core.audit.AuditPolicy` for these keys."""
        return AuditPolicy(commands=self.commands, max_command_bytes=self.max_command_bytes)


@attrs.frozen
class LeaseConfig:
    """The instance's Lease (``lease``; see :mod:`kuberun_trio.gateway.lease`)."""

    enabled: bool = True
    """Hold a ``coordination.k8s.io/v1`` Lease ``kuberun-<instance>``: refuse to start while
    a live namesake holds it, and let replicas collect a dead sibling's pods."""
    namespace: str | None = None
    """Where the Lease lives; default: ``POD_NAMESPACE`` in a cluster, else the pods'
    namespace (``kubernetes.pod.metadata.namespace``)."""
    duration: float = duration(30.0)
    """``leaseDurationSeconds`` (whole seconds, rounded up)."""
    renew_interval: float = duration_field(10.0)
    """Seconds between renewals; must be shorter than ``duration``."""


@attrs.frozen
class GcConfig:
    """Orphan pods while the gateway runs (``gc``; see :mod:`kuberun_trio.gateway.reaper`)."""

    sweep_interval: float = duration(60.0)
    """Seconds between sweeps (each pause drawn from 80-100 % of it)."""
    margin: float = duration(15.0)
    """Cross-replica sweep: how long a Lease must have been expired, and how old a pod
    must be, before another replica's pod is deleted."""
    cross_instance: bool = True
    """Delete other instances' pods whose Lease is missing or expired (needs ``lease``)."""


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


AUDIT_FORMATS = ("asciinema",)
AUDIT_STORAGES = ("file",)


@attrs.frozen
class AuditFileConfig:
    """``audit.file``."""

    directory: str | None = None
    """Root of the recordings: ``<directory>/<date>/<connection_id>/<n>-<kind>.cast``."""


@attrs.frozen
class InterceptConfig:
    """``audit.intercept``: which streams are recorded."""

    stdin: bool = False
    """Client input (typed passwords are input: off by default)."""
    stdout: bool = True
    stderr: bool = True


@attrs.frozen
class AuditConfig:
    """Session recording (``audit``; ContainerSSH's keys, see :mod:`kuberun_trio.recording`)."""

    enable: bool = False
    format: str = "asciinema"
    """Only ``asciinema`` (asciicast v2) is supported."""
    storage: str = "file"
    """Only ``file`` is supported."""
    file: AuditFileConfig = attrs.Factory(AuditFileConfig)
    intercept: InterceptConfig = attrs.Factory(InterceptConfig)

    @property
    def recording(self) -> RecordingOptions | None:
        """The gateway's :class:`~kuberun_trio.recording.RecordingOptions`, or None if off."""
        if not self.enable or self.file.directory is None:
            return None
        i = self.intercept
        return RecordingOptions(directory=self.file.directory, stdin=i.stdin, stdout=i.stdout,
                                stderr=i.stderr)


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
        try:
            parse_listen(ssh.listen)
        except InvalidValue as exc:
            problems.add("ssh.listen", str(exc))
        _check_ssh_limits(ssh, problems)
    security = structure_section(_CONVERTER, data.get("security"), SecurityConfig, "security",
                                 problems, _HINTS)
    if security is not None:
        _check_security(security, problems)
    auth = structure_section(_CONVERTER, data.get("auth"), AuthConfig, "auth", problems, _HINTS)
    if auth is not None and auth.webhook is not None:
        _check_webhook(auth.webhook, problems)
    if auth is not None:
        _check_limits(auth, problems)
        _check_templates(auth, problems)
    log = structure_section(_CONVERTER, data.get("log"), LogConfig, "log", problems, _HINTS)
    if log is not None:
        if log.format not in LOG_FORMATS:
            problems.add("log.format", f"must be text or json, got {log.format!r}")
        if log.level.upper() not in LOG_LEVELS:
            problems.add("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {log.level!r}")
        else:
            log = attrs.evolve(log, level=log.level.upper())
        if not 1 <= log.max_command_bytes <= MAX_COMMAND_BYTES_LIMIT:
            problems.add("log.maxCommandBytes", f"must be 1..{MAX_COMMAND_BYTES_LIMIT}, "
                         f"got {log.max_command_bytes}")
    lease = structure_section(_CONVERTER, data.get("lease"), LeaseConfig, "lease", problems,
                              _HINTS)
    if lease is not None:
        _check_lease(lease, problems)
    gc = structure_section(_CONVERTER, data.get("gc"), GcConfig, "gc", problems, _HINTS)
    metrics, health = _observe_sections(data, problems)
    audit = structure_section(_CONVERTER, data.get("audit"), AuditConfig, "audit", problems,
                              _HINTS)
    if audit is not None:
        _check_audit(audit, problems, files=files)
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


def _check_audit(audit: AuditConfig, problems: ConfigProblems, *, files: bool) -> None:
    if audit.format not in AUDIT_FORMATS:
        problems.add("audit.format", f"{audit.format!r} is not supported "
                     f"(supported: {', '.join(AUDIT_FORMATS)})")
    if audit.storage not in AUDIT_STORAGES:
        problems.add("audit.storage", f"{audit.storage!r} is not supported "
                     f"(supported: {', '.join(AUDIT_STORAGES)})")
    if audit.enable and audit.file.directory is None:
        problems.add("audit.file.directory", "required when audit.enable is true")
    elif audit.enable and files:
        problem = _directory_problem(audit.file.directory or "")
        if problem is not None:
            problems.add("audit.file.directory", problem)


def _directory_problem(path: str) -> str | None:
    """Why recordings cannot be written under ``path`` (it may not exist yet), or None."""
    path = os.path.expanduser(path)
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "."
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _check_lease(lease: LeaseConfig, problems: ConfigProblems) -> None:
    if lease.namespace is not None and dns1123_label_problem(lease.namespace) is not None:
        problems.add("lease.namespace", f"{lease.namespace!r} "
                     f"{dns1123_label_problem(lease.namespace)}")
    if lease.renew_interval >= lease.duration:
        problems.add("lease.renewInterval", f"must be shorter than lease.duration "
                     f"({lease.renew_interval:g}s >= {lease.duration:g}s)")


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


def _at_least(problems: ConfigProblems, key: str, value: float, minimum: float) -> None:
    if value < minimum:
        problems.add(key, f"must be at least {minimum:g}, got {value:g}")


def _check_ssh_limits(ssh: SSHConfig, problems: ConfigProblems) -> None:
    try:
        MaxStartups.parse(ssh.max_startups)
    except ValueError as exc:
        problems.add("ssh.maxStartups", str(exc))
    _at_least(problems, "ssh.maxStartupsPerAddress", ssh.max_startups_per_address, 1)
    _at_least(problems, "ssh.clientAliveCountMax", ssh.client_alive_count_max, 1)
    _at_least(problems, "ssh.maxConnections", ssh.max_connections, 1)


def _check_security(security: SecurityConfig, problems: ConfigProblems) -> None:
    _at_least(problems, "security.maxSessions", security.max_sessions, 1)
    _at_least(problems, "security.maxConnectionsPerUser", security.max_connections_per_user, 1)
    if not security.max_signals_per_second > 0:
        problems.add("security.maxSignalsPerSecond",
                     f"must be positive, got {security.max_signals_per_second:g}")
    _at_least(problems, "security.fdReserve", security.fd_reserve, 0)
    _check_forwarding(security.forwarding, problems)


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


def _check_limits(auth: AuthConfig, problems: ConfigProblems) -> None:
    t, h = auth.throttle, auth.password_hashing
    for where, value, least in [("auth.maxTries", auth.max_tries, 1),
                                ("auth.throttle.freeFailures", t.free_failures, 0),
                                ("auth.passwordHashing.threads", h.threads, 1),
                                ("auth.passwordHashing.queue", h.queue, 0)]:
        if value < least:
            problems.add(where, f"must be at least {least}, got {value}")
    if t.delay < 0:
        problems.add("auth.throttle.delay", f"must not be negative, got {t.delay:g}s")
    if t.max_delay < t.delay:
        problems.add("auth.throttle.maxDelay",
                     f"must be at least auth.throttle.delay ({t.delay:g}s), got {t.max_delay:g}s")


def check_files(config: ServerConfig, *, cluster: bool = False) -> None:
    """Open every file the configuration names; raise a ConfigError per unusable one.

    Host keys must parse as private keys; the other files must be readable. ``cluster``
    also checks that the cluster connection loads (:mod:`.kubecheck`).
    """
    problems = ConfigProblems()
    _file_problems(config.ssh, config.auth, problems)
    _configserver_files(config.configserver, problems)
    _check_audit(config.audit, problems, files=True)
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
