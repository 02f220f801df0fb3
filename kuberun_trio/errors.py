"""The project's one error tree.

Everything kuberun_trio raises on purpose is a :class:`KuberunError`. Errors of
third-party libraries (aiohttp, kubernetes-asyncio, asyncssh, the OS) are
translated where they cross into our code -- mostly in
:mod:`kuberun_trio.aio.bridge` -- and chained with ``raise ... from exc`` so the
original stays visible in tracebacks.

    KuberunError
    ├── ConfigError            bad configuration: names the key path and the problem
    │   └── ConfigErrors       several at once (``errors`` lists each ConfigError)
    ├── KubernetesError        the API server said no (carries HTTP status and reason)
    │   └── NotFoundError      404
    ├── PodStartError          a connection's pod never became Running+Ready
    ├── ExecError              a pods/exec stream could not be opened or broke
    ├── AuthError              the gateway refused a client
    └── ClusterError           the embedded cluster could not do what was asked

What a *client* may read of an error is :func:`client_message`: a short reason that never
holds the API server's address, URLs or a client library's exception text (those go to
the log only). Only a :class:`PodStartError` is told as it is: its reason and message are
what the cluster said about the user's own pod (an image that does not pull, a timeout).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class KuberunError(Exception):
    """Base class of every error kuberun_trio raises on purpose."""


class ConfigError(KuberunError):
    """Invalid configuration.

    ``path`` is the dotted key path, e.g. ``kubernetes.timeouts.podStart``.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass; ``errors`` holds each of them.

    ``path`` and ``problem`` are those of the first, so code that handles a single
    :class:`ConfigError` still gets something precise; ``str()`` lists them all.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(errors)
        self.path = self.errors[0].path
        self.problem = self.errors[0].problem
        lines = "".join(f"\n  {error}" for error in self.errors)
        KuberunError.__init__(self, f"{len(self.errors)} configuration errors:{lines}")


class KubernetesError(KuberunError):
    """The Kubernetes API answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")


class NotFoundError(KubernetesError):
    """The object does not exist (HTTP 404)."""


class PodStartError(KuberunError):
    """A pod failed to start. ``reason`` is what the cluster said (event or condition)."""

    def __init__(self, pod: str, reason: str, message: str) -> None:
        self.pod = pod
        self.reason = reason
        self.message = message
        super().__init__(f"pod {pod} failed to start: {reason}: {message}")


class ExecError(KuberunError):
    """An exec stream into a pod failed to open or broke mid-way."""


class AuthError(KuberunError):
    """Authentication or authorisation of an SSH client failed."""


class ClusterError(KuberunError):
    """The embedded cluster could not do what was asked."""


_STATUS_REASON = re.compile(r"[A-Z][A-Za-z]{1,40}")
"""A Kubernetes ``StatusReason`` (``Forbidden``, ``AlreadyExists``): safe to show."""
_HANDSHAKE = re.compile(r"exec handshake refused with HTTP \d{3}")


def status_reason(text: str) -> str:
    """``text`` if it is a Kubernetes ``StatusReason`` word (safe to show a client), else ""."""
    return text if _STATUS_REASON.fullmatch(text or "") else ""


def _http(error: KubernetesError) -> str:
    return f"HTTP {error.status} {status_reason(error.reason)}".rstrip()


def client_message(exc: BaseException) -> str:
    """What an SSH client may be told about ``exc``: a short reason, no internal detail."""
    if isinstance(exc, PodStartError):
        return f"{exc.reason}: {exc.message}"
    if isinstance(exc, ExecError):
        shown = _HANDSHAKE.search(str(exc))
        if shown is not None:
            return shown.group()
        cause = exc.__cause__
        if isinstance(cause, KubernetesError):
            return client_message(cause)
        return "the exec stream could not be opened"
    if isinstance(exc, KubernetesError):
        if exc.status == 0:
            return "the Kubernetes API is unreachable"
        if exc.status in (401, 403):
            return f"the gateway is not allowed to do this in the cluster ({_http(exc)})"
        if exc.status == 429:
            return f"the cluster is busy, try again later ({_http(exc)})"
        if exc.status >= 500:
            return f"the Kubernetes API failed ({_http(exc)})"
        return f"the cluster refused the request ({_http(exc)})"
    return "internal error in the gateway"
