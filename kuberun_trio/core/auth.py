"""Authentication as the gateway core sees it: a verdict plus metadata.

The core authenticates nobody itself; whoever runs the SSH listener passes an
:class:`Authenticator`. Its methods are trio-flavoured (they may call a
webhook) and answer ``None`` (refuse) or an :class:`AuthResult`, whose
``metadata`` and ``environment`` flow into the pod (labels, annotations and
env per ``exposeAuthMetadataAs*``, ContainerSSH-style).

:class:`PublicKeyAuthenticator` is the simplest useful one: a fixed set of
OpenSSH public keys, any username. The server adds files, passwords, the
webhook and throttling on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

import attrs


def _frozen(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class AuthResult:
    """A successful authentication."""

    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    """Facts about the user (e.g. from the auth webhook), exposed per ``exposeAuthMetadataAs*``."""
    environment: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen)
    """Variables for every session of the connection (the server's env wins over the client's)."""
    method: str = ""
    """``publickey`` or ``password``."""
    reason: str = ""
    """Why the credential was accepted (for the ``auth allow`` log line)."""
    username: str | None = None
    """The user this login is, if not the SSH username (the webhook's
    ``authenticatedUsername``): the username of the pod's labels and of the logs."""
    agent_forwarding: bool = True
    """False: this credential may not forward an agent (authorized_keys
    ``no-agent-forwarding``), whatever ``security.forwarding`` allows."""
    sensitive_metadata: frozenset[str] = frozenset()
    """Names of ``metadata`` entries marked sensitive (not sent to the configuration
    webhook unless ``configserver.transmitSensitiveMetadata``)."""
    sensitive_environment: frozenset[str] = frozenset()
    """Names of ``environment`` entries marked sensitive (likewise)."""


class Authenticator(Protocol):
    """Decides who may connect. Trio-flavoured; ``None`` means refused."""

    def methods(self) -> frozenset[str]:
        """The SSH methods offered: a subset of ``{"publickey", "password"}``."""

    async def check_public_key(self, connection_id: str, username: str, key: str, *,
                               remote_address: str = "") -> AuthResult | None:
        """``key`` is the OpenSSH one-line form, e.g. ``ssh-ed25519 AAAA...``.

        ``remote_address`` is the client's ``IP:port`` (``[v6]:port``), as ContainerSSH's
        webhook has it.
        """

    async def check_password(self, connection_id: str, username: str, password: str, *,
                             remote_address: str = "") -> AuthResult | None: ...


def key_identity(line: str) -> str:
    """``"TYPE BASE64"`` of an OpenSSH public key line (options and comment dropped)."""
    parts = line.split()
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("ssh-", "ecdsa-", "sk-")):
            return f"{part} {parts[i + 1]}"
    raise ValueError(f"not an OpenSSH public key: {line[:40]!r}")


class PublicKeyAuthenticator:
    """Accepts any username holding one of ``keys`` (OpenSSH public key lines)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = frozenset(key_identity(k) for k in keys if k.strip())

    def __repr__(self) -> str:
        return f"<PublicKeyAuthenticator keys={len(self._keys)}>"

    def methods(self) -> frozenset[str]:
        return frozenset({"publickey"})

    async def check_public_key(self, connection_id: str, username: str, key: str, *,
                               remote_address: str = "") -> AuthResult | None:
        return AuthResult(method="publickey") if key_identity(key) in self._keys else None

    async def check_password(self, connection_id: str, username: str, password: str, *,
                             remote_address: str = "") -> AuthResult | None:
        return None
