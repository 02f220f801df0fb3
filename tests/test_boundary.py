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


# == the layers: core/ at the bottom, aio/ never imports gateway/ at run time ===========

CORE = PACKAGE / "core"


def package_imports(path: Path, *, runtime_only: bool = True) -> set[str]:
    """The ``kuberun_trio`` subpackages (``core``, ``gateway``, ...) and the third-party
    top-level modules that the module at ``path`` imports. ``if TYPE_CHECKING:`` blocks
    are left out when ``runtime_only``."""
    tree = ast.parse(path.read_text())
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    here = path.relative_to(PACKAGE).parts[:-1]  # the package the module is in
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                parts = node.module.split(".")
                found.add(parts[1] if parts[0] == "kuberun_trio" and len(parts) > 1
                          else parts[0])
            elif node.level:
                base = list(here[:len(here) - (node.level - 1)])
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [alias.name for alias in node.names]
                found |= {target[0]} if target else set(names)
    return found


def modules_of(package: Path) -> list[Path]:
    return sorted(package.rglob("*.py"))


@pytest.mark.parametrize("path", modules_of(CORE), ids=lambda p: p.name)
def test_core_is_the_bottom_layer(path: Path) -> None:
    imported = package_imports(path, runtime_only=False)
    assert not imported & {"gateway", "aio", "server", "cluster", "observe", "recording",
                           "trio", *FORBIDDEN}, f"{path.name} imports {sorted(imported)}"


@pytest.mark.parametrize("path", modules_of(BOUNDARY), ids=lambda p: p.name)
def test_aio_never_imports_gateway_at_run_time(path: Path) -> None:
    assert "gateway" not in package_imports(path), f"aio/{path.name} imports gateway/"


def test_layer_detector() -> None:
    sshserver = BOUNDARY / "sshserver.py"
    assert "core" in package_imports(sshserver)
    assert "gateway" in package_imports(sshserver, runtime_only=False)  # LoginGate, typed
    assert "gateway" in package_imports(PACKAGE / "gateway" / "serve.py")
    assert {"aio", "core"} <= package_imports(PACKAGE / "gateway" / "connection.py")


def aio_siblings(path: Path) -> set[str]:
    """The ``aio/`` modules that the module at ``path`` imports (``if TYPE_CHECKING:`` too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= ({node.module.split(".")[0]} if node.module
                      else {alias.name for alias in node.names})
    return found


def test_the_ssh_session_side_never_imports_the_connection_side() -> None:
    """``aio/sshserver.py`` builds on ``aio/sshsession.py``; the reverse would be a cycle."""
    assert "sshsession" in aio_siblings(BOUNDARY / "sshserver.py")
    assert "sshserver" not in aio_siblings(BOUNDARY / "sshsession.py")
