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
"""

from __future__ import annotations

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
