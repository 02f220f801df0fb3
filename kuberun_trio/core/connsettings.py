"""Per-connection settings: the hook that decides a connection's pod after its login.

Theory of operation
-------------------
By default every connection gets the gateway's one ``kubernetes`` configuration. An
embedding application (or the server, with ContainerSSH's configuration webhook, see
:mod:`kuberun_trio.server.configwebhook`) may pass ``GatewayOptions.configure``: a
trio-flavoured ``async (LoginInfo) -> ConnectionSettings``. The SSH side calls it once
per connection, after the credential is proven and the per-user limits passed, before
the client is told that it is logged in -- so every session channel of the connection
already sees the connection's own settings, and the pod is created from them:

* :attr:`ConnectionSettings.kubernetes` -- the connection's ``kubernetes`` configuration
  (image, namespace, resources, shell command, timeouts, ...);
* :attr:`~ConnectionSettings.environment` -- variables for every session (they win over
  the login's and the client's);
* :attr:`~ConnectionSettings.metadata` -- facts added to the login's metadata (pod labels
  and annotations per ``exposeAuthMetadataAs*``);
* :attr:`~ConnectionSettings.files` -- files written into the pod once it is Ready, before
  the first session starts (:func:`file_problem` says which paths are acceptable);
* :attr:`~ConnectionSettings.max_sessions` / ``max_signals_per_second`` -- the
  connection's own session and signal limits (None: the gateway's).

The hook refuses a login by raising :class:`ConfigRefused`: its ``client_message`` is
what the client reads in the SSH disconnect message, ``detail`` goes to the log only.
Any other exception refuses the login too, as "Cannot get configuration at this time".
The gateway bounds nothing itself: the hook must return in reasonable time (the login
grace time still runs).

The login's throttling keys are reset as soon as the credential is proven, so a slow
hook delays no other login; the ``auth allow`` line is written when the login completes
(or, if the hook refuses, right before the refusal).
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ..errors import KuberunError
from .auth import AuthResult
from .config import KubernetesConfig
from .forwarding import AgentOptions, ForwardingPolicy

CANNOT_CONFIGURE = "Cannot get configuration at this time"
"""What the client reads when the hook fails (ContainerSSH's words)."""
MAX_FILES = 64
"""Files one connection may have written into its pod."""
MAX_FILE_BYTES = 1024 * 1024
"""Bytes of all files of one connection together."""


def _frozen(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@attrs.frozen
class LoginInfo:
    """What is known about a connection when its settings are decided."""

    connection_id: str
    username: str
    """The username the client sent."""
    authenticated_username: str
    """The username the login proved (the auth webhook's ``authenticatedUsername``, else
    ``username``): the pod's and the logs' username."""
    remote_address: str
    """``IP:port`` (``[v6]:port``)."""
    client_version: str
    """The client's SSH version string (``SSH-2.0-OpenSSH_9.2p1 ...``)."""
    auth: AuthResult
    """What the authenticator said (metadata, environment, which of them are sensitive)."""


@attrs.frozen
class ConnectionSettings:
    """One connection's settings (what ``GatewayOptions.configure`` returns)."""

    kubernetes: KubernetesConfig
    """The connection's ``kubernetes`` configuration. Its ``connection`` part is ignored:
    every pod goes to the gateway's cluster."""
    environment: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    """Variables for every session channel of the connection."""
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    """Added to the login's metadata (exposed on the pod per ``exposeAuthMetadataAs*``)."""
    files: Mapping[str, bytes] = attrs.field(factory=dict, converter=_frozen)
    """Absolute path → content, written into the console container before any session."""
    max_sessions: int | None = None
    """Session channels open at once on this connection (None: the gateway's limit)."""
    max_signals_per_second: float | None = None
    """Signals per second per session (None: the gateway's limit)."""
    forwarding: ForwardingPolicy | None = None
    """``ssh -L``/``-D`` for this connection (None: the gateway's ``forwarding``)."""
    agent: AgentOptions | None = None
    """``ssh -A`` for this connection (None: the gateway's ``agent``)."""

    def auth_for(self, auth: AuthResult) -> AuthResult:
        """``auth`` with this connection's metadata and environment added (ours win)."""
        if not self.metadata and not self.environment:
            return auth
        return attrs.evolve(auth, metadata={**auth.metadata, **self.metadata},
                            environment={**auth.environment, **self.environment})


class ConfigRefused(KuberunError):
    """The connection's settings could not be decided: refuse the login."""

    def __init__(self, client_message: str, detail: str) -> None:
        self.client_message = client_message
        """What the client may read (no URLs, no addresses)."""
        self.detail = detail
        """The whole story, for the log."""
        super().__init__(detail)


Configure = Callable[[LoginInfo], Awaitable[ConnectionSettings]]
"""The hook's type (see the module docstring)."""


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be written into a pod, or None if it can.

    It must be absolute, normalized (no ``.``/``..`` parts, no ``//``), not ``/`` itself,
    without NUL or newline, and at most 4096 bytes.
    """
    if not path.startswith("/"):
        return "must be an absolute path"
    if "\0" in path or "\n" in path or "\r" in path:
        return "must not hold NUL or line breaks"
    if len(path.encode("utf-8", "surrogateescape")) > 4096:
        return "longer than 4096 bytes"
    if path == "/" or path.endswith("/"):
        return "must name a file, not a directory"
    if posixpath.normpath(path) != path or path.startswith("//"):
        return "must be a normalized path (no '.', '..' or '//')"
    return None


WRITE_FILE_SCRIPT = (
    'umask 077; d=$(dirname -- "$1") && mkdir -p -- "$d" && '
    'head -c "$2" > "$1.kuberun-tmp" && mv -f -- "$1.kuberun-tmp" "$1"'
)
"""Writes stdin (exactly ``$2`` bytes) to ``$1``: private (files 0600, new directories
0700, as the container's user), whole or not at all (a temporary file, then ``mv``).
``head -c`` stops at the size, so an API server without stdin EOF (v4 exec) works too."""


def write_file_argv(path: str, size: int) -> tuple[str, ...]:
    """The exec argv that writes ``size`` bytes of stdin to ``path`` (never parsed by a
    shell: the path travels as its own argument)."""
    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"{path!r}: {problem}")
    return ("/bin/sh", "-c", WRITE_FILE_SCRIPT, "sh", path, str(size))
