"""The ``ssh`` and ``security`` sections: the listener, its limits, and what a login may do.

Theory of operation
-------------------
``ssh`` is the listener (``listen``, ``hostKeys``) and the limits that protect it before
and after login (``maxStartups``, keepalives, ``maxConnections``, the session time limits);
``security`` is what one authenticated user may open (sessions, connections per user,
signals, the file-descriptor reserve) and ``security.forwarding`` (port and agent
forwarding, off by default). :class:`~kuberun_trio.server.config.ServerConfig` turns the
two into the gateway's :class:`~kuberun_trio.core.limits.Limits`.

The classes are structured by :func:`kuberun_trio.server.config.parse_server_config`;
:func:`check_ssh` and :func:`check_security` then add the cross-field problems, each under
its dotted key path. :func:`parse_listen` reads every ``HOST:PORT`` key of the file
(``ssh.listen``, ``metrics.listen``, ``health.listen``) and the ``--listen`` flag.
"""

from __future__ import annotations

import re

import attrs

from ..configtools import ConfigProblems, InvalidValue, duration, duration_or_off
from ..core.forwarding import FORWARDING_MODES, AgentOptions, ForwardingPolicy, command_problems
from ..core.limits import MaxStartups
from ..gateway.timelimits import SessionTimeLimits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2222


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


def check_ssh(ssh: SSHConfig, problems: ConfigProblems) -> None:
    """Add the problems of a structured ``ssh`` section: ``listen`` and the limits."""
    try:
        parse_listen(ssh.listen)
    except InvalidValue as exc:
        problems.add("ssh.listen", str(exc))
    _check_ssh_limits(ssh, problems)


def _check_ssh_limits(ssh: SSHConfig, problems: ConfigProblems) -> None:
    try:
        MaxStartups.parse(ssh.max_startups)
    except ValueError as exc:
        problems.add("ssh.maxStartups", str(exc))
    _at_least(problems, "ssh.maxStartupsPerAddress", ssh.max_startups_per_address, 1)
    _at_least(problems, "ssh.clientAliveCountMax", ssh.client_alive_count_max, 1)
    _at_least(problems, "ssh.maxConnections", ssh.max_connections, 1)


def check_security(security: SecurityConfig, problems: ConfigProblems) -> None:
    """Add the problems of a structured ``security`` section, ``forwarding`` included."""
    _at_least(problems, "security.maxSessions", security.max_sessions, 1)
    _at_least(problems, "security.maxConnectionsPerUser", security.max_connections_per_user, 1)
    if not security.max_signals_per_second > 0:
        problems.add("security.maxSignalsPerSecond",
                     f"must be positive, got {security.max_signals_per_second:g}")
    _at_least(problems, "security.fdReserve", security.fd_reserve, 0)
    _check_forwarding(security.forwarding, problems)


def _at_least(problems: ConfigProblems, key: str, value: float, minimum: float) -> None:
    if value < minimum:
        problems.add(key, f"must be at least {minimum:g}, got {value:g}")


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
