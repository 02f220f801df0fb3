"""The operations sections: ``log``, ``lease``, ``gc``, ``metrics``, ``health``, ``audit``.

Theory of operation
-------------------
Everything an operator tunes to run the gateway rather than to admit users: the log format,
level and command policy (``log``, turned into the gateway's
:class:`~kuberun_trio.core.audit.AuditPolicy`), the instance's Lease (``lease``), the orphan
pod sweeps (``gc``), the Prometheus and health endpoints (``metrics``, ``health``) and
session recording (``audit``, turned into :class:`~kuberun_trio.recording.RecordingOptions`).

The classes are structured by :func:`kuberun_trio.server.config.parse_server_config`; the
``check_*`` functions then add the cross-field problems, each under its dotted key path:
:func:`check_log` also returns the section with ``level`` upper-cased,
:func:`check_endpoints` refuses metrics/health addresses that clash with each other or with
``ssh.listen``, and :func:`check_audit` with ``files`` checks that recordings can be written.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from ..configtools import ConfigProblems, InvalidValue, duration
from ..configtools import duration as duration_field
from ..core.audit import DEFAULT_MAX_COMMAND_BYTES, AuditPolicy
from ..core.podtemplate import dns1123_label_problem
from ..recording import RecordingOptions
from .sshconfig import parse_listen

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_COMMAND_BYTES_LIMIT = 64 * 1024
"""The largest ``log.maxCommandBytes`` (the longest command a session accepts at all)."""


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


def check_log(log: LogConfig, problems: ConfigProblems) -> LogConfig:
    """Add the problems of a structured ``log`` section; return it with ``level`` upper-cased."""
    if log.format not in LOG_FORMATS:
        problems.add("log.format", f"must be text or json, got {log.format!r}")
    if log.level.upper() not in LOG_LEVELS:
        problems.add("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {log.level!r}")
    else:
        log = attrs.evolve(log, level=log.level.upper())
    if not 1 <= log.max_command_bytes <= MAX_COMMAND_BYTES_LIMIT:
        problems.add("log.maxCommandBytes", f"must be 1..{MAX_COMMAND_BYTES_LIMIT}, "
                     f"got {log.max_command_bytes}")
    return log


def check_lease(lease: LeaseConfig, problems: ConfigProblems) -> None:
    """Add the problems of a structured ``lease`` section."""
    if lease.namespace is not None and dns1123_label_problem(lease.namespace) is not None:
        problems.add("lease.namespace", f"{lease.namespace!r} "
                     f"{dns1123_label_problem(lease.namespace)}")
    if lease.renew_interval >= lease.duration:
        problems.add("lease.renewInterval", f"must be shorter than lease.duration "
                     f"({lease.renew_interval:g}s >= {lease.duration:g}s)")


def check_endpoints(metrics: MetricsConfig | None, health: HealthConfig | None, raw_ssh: Any,
                    problems: ConfigProblems) -> None:
    """Add the problems of the ``metrics`` and ``health`` sections (None: did not structure).

    ``raw_ssh`` is the file's ``ssh`` section as written: its ``listen`` must not clash.
    """
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
        ssh_address = parse_listen(str((raw_ssh or {}).get("listen", "")
                                       if isinstance(raw_ssh, Mapping) else ""))
    for name, address in addresses.items():
        if ssh_address is not None and _clash(address, ssh_address):
            problems.add(f"{name}.listen", f"port {address[1]} is the SSH listener's")
    if len(addresses) == 2 and addresses["metrics"] != addresses["health"] and _clash(
            addresses["metrics"], addresses["health"]):
        problems.add("health.listen", "clashes with metrics.listen (use the same address "
                                      "to serve both from one server, or another port)")


def _clash(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Would binding both fail (same port; same host, or one binds every interface)?"""
    wildcard = ("0.0.0.0", "::")
    return a[1] != 0 and a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard
                                           or b[0] in wildcard)


def check_audit(audit: AuditConfig, problems: ConfigProblems, *, files: bool) -> None:
    """Add the problems of a structured ``audit`` section; ``files``: can recordings be written?"""
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

