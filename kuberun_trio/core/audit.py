"""The audit trail of one SSH connection: who connected, what was refused, how it ended.

Theory of operation
-------------------
A :class:`ConnectionAudit` is made for every TCP connection the SSH listener accepts,
before anything is known about the client, and lives as long as the connection. It is a
plain synchronous object (no trio, no asyncio), so the asyncssh callbacks, the trio
connection task and the server's limits can all call it. Each method writes one log line
on the logger ``kuberun_trio.audit`` whose ``extra`` always holds ``event``,
``connection_id`` and ``remote_address`` (``IP:port``, ``[v6]:port``):

* :meth:`accepted` -- ``connection-accepted``;
* :meth:`refused` -- ``request-refused`` with ``request`` (``port-forwarding``,
  ``agent-forwarding``, ``x11-forwarding``, ``env``, ``exec``, ``subsystem``, ...) and
  ``reason``: a client request the gateway said no to. The first
  :data:`REFUSALS_LOGGED` per connection are logged, the rest only counted (one
  ``request-refused-suppressed`` line says so): a client cannot turn a flood of
  requests into a flood of log lines;
* :meth:`pre_auth_end` -- ``pre-auth-end`` with ``reason``, ``duration_ms`` and the
  ``username`` tried (if any): the connection ended before a login succeeded (login
  grace time, client disconnect, a limit such as ``maxStartups`` -- which calls
  :func:`log_pre_auth_end` or this method before it drops the connection);
* :meth:`connection_end` -- ``connection-end`` with ``reason`` (the words),
  ``end`` (one of the :class:`ConnectionEnd` values: ``idle``, ``max-duration``,
  ``client``, ``shutdown``, ``pod-lost``, ``error`` -- the metric label of
  ``kuberun_connections_ended_total``), ``duration_ms``, ``bytes_from_client``,
  ``bytes_to_client`` and ``requests_refused``.

At most one of the two end events is written per connection.

Bytes are the session channels' payload (stdin, stdout, stderr), counted by the channel
code with one integer addition where the data already flows -- no per-chunk logging and
no clock on the data path.

Commands are client input of any size: :meth:`AuditPolicy.command_fields` applies
``log.commands`` (off: no command in any line) and ``log.maxCommandBytes`` (the UTF-8 text
is cut at a character boundary, the line says ``command_truncated=true`` and the original
``command_bytes``). What the log does with control characters is up to the formatter
(:mod:`kuberun_trio.server.logs` escapes them).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs

log = logging.getLogger("kuberun_trio.audit")

DEFAULT_MAX_COMMAND_BYTES = 1024
REFUSALS_LOGGED = 20
"""``request-refused`` lines per connection; further refusals are only counted (a client
can send env or signal requests without end, and each must not cost a log line)."""
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime"}


class ConnectionEnd(enum.Enum):
    """Why an authenticated connection ended, in one word (a closed set: metric labels)."""

    IDLE = "idle"
    """``ssh.idleTimeout``: no channel data for that long."""
    MAX_DURATION = "max-duration"
    """``ssh.maxSessionDuration`` reached."""
    CLIENT = "client"
    """The client left (disconnect, lost TCP, keepalives unanswered)."""
    SHUTDOWN = "shutdown"
    """The gateway shut down."""
    POD_LOST = "pod-lost"
    """The pod was deleted, evicted or killed under the connection."""
    ERROR = "error"
    """The pod could not be started, or the gateway failed."""


@attrs.frozen
class AuditPolicy:
    """What the audit trail records of client input (the server's ``log.*`` keys)."""

    commands: bool = True
    """Log the command of every ``exec`` session (``log.commands``)."""
    max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES
    """Longest command logged, in UTF-8 bytes; longer ones are cut (``log.maxCommandBytes``)."""

    def command_fields(self, command: str) -> dict[str, Any]:
        """The log fields for ``command``: none if commands are not logged."""
        if not self.commands:
            return {}
        data = command.encode("utf-8", "surrogateescape")
        if len(data) <= self.max_command_bytes:
            return {"command": command}
        cut = data[: self.max_command_bytes].decode("utf-8", "ignore")
        return {"command": cut, "command_truncated": True, "command_bytes": len(data)}


def format_address(host: str, port: int) -> str:
    """``IP:port``, or ``[v6]:port`` for IPv6 (as ContainerSSH's webhook has it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionAudit:
    """One connection's audit record (see the module docstring)."""

    def __init__(self, connection_id: str, remote_address: str,
                 policy: AuditPolicy | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.connection_id = connection_id
        self.remote_address = remote_address
        self.policy = policy or AuditPolicy()
        self.log = logger or log
        self.started = time.monotonic()
        self.bytes_from_client = 0
        """Session channel payload received from the client (stdin)."""
        self.bytes_to_client = 0
        """Session channel payload sent to the client (stdout and stderr)."""
        self.username = ""
        """Set once a login succeeded."""
        self.lost_reason: str | None = None
        """Why the SSH side went away (set by the SSH layer; e.g. a keepalive timeout)."""
        self.refusals = 0
        """Client requests refused so far (all of them, logged or not)."""
        self.ended = False
        self.on_refused: Callable[[str], None] = lambda request: None
        """Called with the request's name for each refusal (the gateway counts them)."""
        self.on_end: Callable[[ConnectionEnd], None] = lambda end: None
        """Called once with the connection's end (the gateway counts it in its metrics)."""

    def __repr__(self) -> str:
        return (f"<ConnectionAudit {self.connection_id} {self.remote_address} "
                f"in={self.bytes_from_client} out={self.bytes_to_client}>")

    @property
    def fields(self) -> dict[str, Any]:
        """``connection_id`` and ``remote_address``: what every line of this connection has."""
        return {"connection_id": self.connection_id, "remote_address": self.remote_address}

    def duration_ms(self) -> int:
        return round(1000 * (time.monotonic() - self.started))

    def emit(self, level: int, event: str, message: str, *args: Any,
             exc_info: BaseException | None = None, **fields: Any) -> None:
        """One log line of this connection: ``event``, the id and the address, ``fields``.

        A field named like a :class:`logging.LogRecord` attribute (``name``, ``args``) gets
        a ``field_`` prefix: ``logging`` would raise, inside an asyncssh callback.
        """
        extra = {"event": event, **self.fields}
        for key, value in fields.items():
            extra[f"field_{key}" if key in _RESERVED else key] = value
        self.log.log(level, message, *args, extra=extra, exc_info=exc_info)

    def accepted(self) -> None:
        self.emit(logging.INFO, "connection-accepted", "connection %s accepted from %s",
                  self.connection_id, self.remote_address)

    def refused(self, request: str, reason: str, **fields: Any) -> None:
        """A client request was refused: ``request`` names it, ``reason`` says why.

        Only the first :data:`REFUSALS_LOGGED` of a connection are logged, then one
        ``request-refused-suppressed`` line; ``connection-end`` gives the total.
        """
        self.refusals += 1
        self.on_refused(request)
        if self.refusals <= REFUSALS_LOGGED:
            self.emit(logging.INFO, "request-refused", "%s request refused: %s", request,
                      reason, request=request, reason=reason, **fields)
        elif self.refusals == REFUSALS_LOGGED + 1:
            self.emit(logging.WARNING, "request-refused-suppressed",
                      "more than %d requests refused: further refusals are only counted",
                      REFUSALS_LOGGED, request=request, reason=reason)

    def pre_auth_end(self, reason: str, *, username: str = "") -> None:
        """The connection ended before a login succeeded (once; later calls do nothing).

        ``username`` is the one the client asked to log in as, if it got that far.
        """
        if self.ended:
            return
        self.ended = True
        took = self.duration_ms()
        more: dict[str, Any] = {"username": username} if username else {}
        if self.refusals:
            more["requests_refused"] = self.refusals
        self.emit(logging.INFO, "pre-auth-end", "connection %s ended before login: %s",
                  self.connection_id, reason, reason=reason, duration_ms=took, **more)

    def connection_end(self, reason: str, end: ConnectionEnd = ConnectionEnd.CLIENT,
                       **fields: Any) -> None:
        """The connection ended (once; later calls do nothing).

        ``reason`` says why in words; ``end`` is the same in one word: every
        authenticated connection's end passes here, so this is where a counter of ends by
        ``end.value`` belongs.
        """
        if self.ended:
            return
        self.ended = True
        self.on_end(end)
        took = self.duration_ms()
        self.emit(logging.INFO, "connection-end",
                  "connection %s ended after %d ms: %s (%d bytes in, %d bytes out)",
                  self.connection_id, took, reason, self.bytes_from_client,
                  self.bytes_to_client, reason=reason, end=end.value, duration_ms=took,
                  bytes_from_client=self.bytes_from_client,
                  bytes_to_client=self.bytes_to_client, requests_refused=self.refusals,
                  **fields)


def log_pre_auth_end(connection_id: str, remote_address: str, reason: str) -> None:
    """A ``pre-auth-end`` line for a connection that has no :class:`ConnectionAudit` (yet),
    e.g. one dropped by a limit as soon as it was accepted."""
    ConnectionAudit(connection_id, remote_address).pre_auth_end(reason)
