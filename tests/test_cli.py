"""``python -m kuberun_trio`` as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kuberun_trio", *args], capture_output=True, text=True, timeout=60
    )


def test_help() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "SSH gateway" in result.stdout


def test_unknown_option_is_usage_error() -> None:
    result = run("--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
