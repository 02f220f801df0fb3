"""``python -m kuberun_trio embedded-cluster`` run standalone, as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
from support import require_kubectl


def pod_processes(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("scheme", ["--https", "--http"])
async def test_standalone_cluster_kills_pods_on_sigterm(tmp_path: Path, scheme: str) -> None:
    require_kubectl()
    kubeconfig = tmp_path / "kc.yaml"
    with (tmp_path / "stderr").open("wb") as stderr:
        await _standalone(kubeconfig, scheme, stderr)


async def _standalone(kubeconfig: Path, scheme: str, stderr: BinaryIO) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kuberun_trio", "embedded-cluster", "--kubeconfig-out",
         str(kubeconfig), scheme, "--fail-image", "broken/*"],
        stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    try:
        out = b""
        with trio.fail_after(30):
            while b"kubeconfig:" not in out:
                out += await proc.stdout.receive_some(4096)
        assert os.stat(kubeconfig).st_mode & 0o777 == 0o600
        kubectl = require_kubectl()
        marker = f"marker{uuid.uuid4().hex[:10]}"
        base = [kubectl, "--kubeconfig", str(kubeconfig)]
        await trio.run_process([*base, "run", "p1", "--image=busybox", "--restart=Never", "--",
                                "sh", "-c", f"sleep 1000; : {marker}"], capture_stdout=True)
        await trio.run_process([*base, "wait", "--for=condition=Ready", "pod/p1",
                                "--timeout=30s"], capture_stdout=True)
        assert pod_processes(marker), "the pod's process runs on this host"
        await trio.run_process([*base, "run", "p2", "--image=broken/image", "--restart=Never"],
                               capture_stdout=True)
        with trio.fail_after(20):
            while True:
                got = await trio.run_process([*base, "get", "pod", "p2", "--no-headers"],
                                             capture_stdout=True)
                if b"ErrImagePull" in got.stdout or b"ImagePullBackOff" in got.stdout:
                    break
                await trio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        assert pod_processes(marker) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_image_root_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kuberun_trio", "embedded-cluster", "--kubeconfig-out",
         str(tmp_path / "kc"), "--image-root", "busybox"],
        capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 2
    assert "--image-root: expected IMAGE=DIR" in result.stderr
