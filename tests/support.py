"""Helpers shared by test modules (importable as ``support``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def kubectl_versions() -> list[str]:
    """Paths of the newest ``kubectl.1.NN`` and of ``kubectl.1.30`` (WebSocket exec)."""
    found = shutil.which("kubectl")
    if found is None:
        return []
    folder = Path(os.path.realpath(found)).parent
    versioned = sorted(folder.glob("kubectl.1.*"), key=lambda p: int(p.name.split(".")[-1]))
    picks = [p for p in versioned if p.name == "kubectl.1.30"]
    if versioned and versioned[-1] not in picks:
        picks.insert(0, versioned[-1])
    return [str(p) for p in picks]
