"""The one place a refusal is logged.

Every path that says "no" to a client -- a wrong credential, a throttled or queued-out
login, too many tries -- calls :func:`refuse`, which writes one log line with a structured
``event`` field (and ``reason``, plus whatever the caller knows: ``connection_id``,
``username``, ``remote_address``, ``method``, ``fingerprint``). Counting refusals by event
(a metric) belongs here too, so that no path can be forgotten. :class:`Refusal` is
what the login gate answers instead of a verdict (the SSH side acts on it).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs


@attrs.frozen
class Refusal:
    """A login attempt refused by the login gate itself (not by the authenticator)."""

    disconnect: str | None = None
    """Disconnect the client with this message (too many failures)."""
    banner: str | None = None
    """Tell the client this (an SSH auth banner) before the failure reply."""


def refuse(logger: logging.Logger | logging.LoggerAdapter[Any], event: str, message: str,
           *args: Any, reason: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a refusal: ``message % args`` with ``extra={"event": event, "reason": reason,
    **fields}``."""
    logger.log(level, message, *args, extra={"event": event, "reason": reason, **fields})
