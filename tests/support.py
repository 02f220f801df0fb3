"""Helpers shared by test modules (importable as ``support``).

Real parts or a failure, never a silent skip on CI. The suite drives real
programs (kubectl, ssh, sftp, scp, tmux) and Linux namespaces (``unshare``).
A test that needs one calls :func:`require_tools`, :func:`require_paths` or
:func:`require_namespaces`, or carries ``@pytest.mark.needs("ssh", ...)``
(``conftest.py`` turns the marker into a :func:`require_tools` call). Off CI
a missing part skips the test with a reason that names it; with ``CI=true``
(how ``.ci/run`` is run) the same absence fails the test, because CI installs
every part and a skip there would hide a broken install step.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import trio

from kuberun_trio.cluster.sandbox import namespaces_supported

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
"""Debian's openssh-sftp-server binary (the gateway's embedded pods run it)."""


def on_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where every real part must be present."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test off CI; fail it on CI."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so this is a failure)",
                    pytrace=False)
    pytest.skip(reason)


def missing_tools(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def require_tools(*tools: str) -> None:
    """Every program in ``tools`` is on PATH, or the test skips (off CI) / fails (CI)."""
    if missing := missing_tools(*tools):
        unavailable(f"not installed: {', '.join(missing)}")


def require_paths(*paths: str | Path) -> None:
    """Every file in ``paths`` exists, or the test skips (off CI) / fails (CI)."""
    if missing := [str(p) for p in paths if not Path(p).exists()]:
        unavailable(f"missing: {', '.join(missing)}")


NO_NAMESPACES = ("Linux namespaces not permitted here (unshare failed): pods share the "
                 "host's hostname and PID namespace")


async def require_namespaces() -> None:
    """Linux namespaces (``unshare``) are permitted, or the test skips (off CI) / fails (CI).

    Pods get their own UTS namespace only then, so a test that expects the
    pod's hostname to be its name calls this (or :func:`require_namespaces_sync`) first.
    """
    if not await namespaces_supported():
        unavailable(NO_NAMESPACES)


def require_namespaces_sync() -> None:
    """:func:`require_namespaces` for synchronous tests and fixtures (outside trio)."""
    if not trio.run(namespaces_supported):
        unavailable(NO_NAMESPACES)


@functools.cache
def kubectl_version(path: str) -> tuple[int, int]:
    """``(major, minor)`` from ``kubectl version --client``."""
    out = subprocess.run([path, "version", "--client"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    match = re.search(r"Client Version:\s*v?(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"{path} version --client printed no version: {out!r}")
    return int(match[1]), int(match[2])


@functools.cache
def kubectl_versions() -> tuple[str, ...]:
    """The kubectl binaries to test with, newest first.

    Where versioned ``kubectl.1.NN`` binaries sit beside ``kubectl`` (this
    workplace's image): the newest and ``kubectl.1.30`` (the first that speaks
    WebSocket for exec). Otherwise the plain ``kubectl`` on PATH (``.ci/run``
    installs one on a machine without it). Empty when there is none.
    """
    found = shutil.which("kubectl")
    if found is None:
        return ()
    folder = Path(os.path.realpath(found)).parent
    versioned = sorted(folder.glob("kubectl.1.*"), key=lambda p: int(p.name.split(".")[-1]))
    if not versioned:
        return (found,)
    picks = [p for p in versioned if p.name == "kubectl.1.30"]
    if versioned[-1] not in picks:
        picks.insert(0, versioned[-1])
    return tuple(str(p) for p in picks)


def kubectl_id(path: str) -> str:
    """A test id naming the kubectl version (``kubectl-1.33``)."""
    major, minor = kubectl_version(path)
    return f"kubectl-{major}.{minor}"


def require_kubectl() -> str:
    """The newest kubectl to test with, or skip (off CI) / fail (CI)."""
    paths = kubectl_versions()
    if not paths:
        unavailable("kubectl is not installed (.ci/run installs it)")
    return paths[0]
