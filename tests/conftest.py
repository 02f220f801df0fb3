"""Shared fixtures: the embedded cluster in-process, kubectl binaries."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import support

from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs("ssh", ...)``: skip off CI, fail on CI when a program is missing."""
    for mark in item.iter_markers("needs"):
        support.require_tools(*mark.args)
        support.require_paths(*mark.kwargs.get("paths", ()))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    """An HTTPS embedded cluster with a fast crash-loop back-off."""
    async with open_embedded_cluster(
        https=True, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2
    ) as c:
        yield c


@pytest.fixture
async def http_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    """A plain-HTTP embedded cluster."""
    async with open_embedded_cluster(
        https=False, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2
    ) as c:
        yield c
