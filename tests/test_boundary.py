"""The asyncio boundary: only ``kuberun_trio/aio/`` may touch asyncio-flavoured libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kuberun_trio"
BOUNDARY = PACKAGE / "aio"
FORBIDDEN = {"asyncio", "trio_asyncio", "asyncssh", "kubernetes_asyncio", "aiohttp"}


def forbidden_imports(source: str) -> list[str]:
    """Top-level names of forbidden modules that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def trio_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if BOUNDARY not in p.parents)


@pytest.mark.parametrize("path", trio_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_outside_boundary_imports_no_asyncio(path: Path) -> None:
    assert forbidden_imports(path.read_text()) == [], f"{path} crosses the asyncio boundary"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio", ["asyncio"]),
        ("import os, aiohttp.web", ["aiohttp.web"]),
        ("from kubernetes_asyncio.client import CoreV1Api", ["kubernetes_asyncio.client"]),
        ("def f():\n    import asyncssh", ["asyncssh"]),
        ("from .aio import bridge", []),
        ("import trio, attrs", []),
    ],
)
def test_detector(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source) == expected


def test_boundary_package_is_where_asyncio_lives() -> None:
    inside = [p for p in PACKAGE.rglob("*.py") if BOUNDARY in p.parents]
    assert any(forbidden_imports(p.read_text()) for p in inside)
    assert len(trio_modules()) > 3
