"""Lingering close: a refused client reads why before the socket goes.

Theory of operation: asyncssh ends a connection by writing ``MSG_DISCONNECT`` and
then *aborting* its transport. When the client still has bytes in flight (its
next key-exchange or auth packet), our kernel answers them with a TCP reset,
and a client that writes before it reads (OpenSSH in its key exchange) sees
"Broken pipe" or "Connection reset by peer" instead of the gateway's message
("too many connections for user ..."). Even a plain FIN can win: asyncssh's
client reports "Connection lost" when the end of the stream reaches it while
its key exchange still holds the ``MSG_DISCONNECT`` unprocessed.

:func:`linger_on_abort` puts a thin proxy in front of an asyncssh connection's
transport. asyncssh's abort then hands the socket to a protocol that discards
whatever the client still sends (so nothing unread can cause a reset) and
leaves the closing to the client, which closes once it has read the
disconnect. A client that does not is dropped after :data:`LINGER` seconds, and
at most :data:`MAX_LINGERING` sockets linger at once (beyond that a close is an
abort), so a flood of refused connections cannot hoard descriptors. asyncssh's
own clean-up is not delayed: it never waits for the transport.
:class:`Lingering` owns the sockets in that state, so a gateway that stops
aborts them at once (nothing outlives its owner).

Asyncio-flavoured.
"""

from __future__ import annotations

import asyncio
from typing import Any

LINGER = 2.0
"""Seconds a refused connection may stay half-closed while its client reads."""

MAX_LINGERING = 256
"""Sockets lingering at once; beyond that a close is an abort (a flood holds no fds)."""


class Lingering:
    """The sockets of one listener that are closing gracefully."""

    def __init__(self, seconds: float = LINGER, max_sockets: int = MAX_LINGERING) -> None:
        self.seconds, self.max_sockets = seconds, max_sockets
        self._transports: set[asyncio.Transport] = set()

    def __len__(self) -> int:
        return len(self._transports)

    def close(self, transport: asyncio.Transport) -> None:
        """Keep ``transport`` until the peer closes it (or time is up), reading nothing."""
        if transport.is_closing() or len(self._transports) >= self.max_sockets:
            transport.abort()
            return
        drain = _Drain(self, transport)
        transport.set_protocol(drain)
        self._transports.add(transport)
        transport.resume_reading()
        drain.timer = asyncio.get_running_loop().call_later(self.seconds, transport.abort)

    def abort_all(self) -> None:
        """Drop every lingering socket (the gateway stops)."""
        for transport in list(self._transports):
            transport.abort()

    def _gone(self, transport: asyncio.Transport) -> None:
        self._transports.discard(transport)


class _Drain(asyncio.Protocol):
    """Discard what the client still sends; close when it does."""

    def __init__(self, owner: Lingering, transport: asyncio.Transport) -> None:
        self._owner, self._transport = owner, transport
        self.timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client has closed: the transport closes (after what is buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._owner._gone(self._transport)


class _LingeringTransport:
    """asyncssh's view of the transport: every call passes through but ``abort``."""

    def __init__(self, transport: asyncio.Transport, lingering: Lingering) -> None:
        self._transport, self._lingering = transport, lingering

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def abort(self) -> None:
        self._lingering.close(self._transport)


def linger_on_abort(conn: Any, lingering: Lingering) -> None:
    """Make asyncssh's next abort of ``conn`` (an asyncssh connection) a lingering close."""
    transport = conn._transport  # asyncssh offers no hook for how it closes
    if transport is not None and not isinstance(transport, _LingeringTransport):
        conn._transport = _LingeringTransport(transport, lingering)
