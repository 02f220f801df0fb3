"""Session recording end to end: ``python -m kuberun_trio`` with ``audit.enable``, the real
OpenSSH client (``ssh -t`` driven in tmux, plain exec, sftp) and the real player:
``asciinema cat`` replays the recording and shows what the terminal showed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import test_e2e_openssh as e2e
from test_e2e_openssh import ENV, Cluster, Keys, short_dir, wait_for
from test_limits_e2e import gateway_with

pytestmark = [e2e.pytestmark,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]
cluster = e2e.cluster
keys = e2e.keys
__all__ = ["short_dir"]

ASCIINEMA = str(Path(sys.executable).with_name("asciinema"))


def _casts(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.rglob("*.cast")}


def test_recorded_tty_session_replays_in_asciinema(cluster: Cluster, keys: Keys,
                                                   tmp_path: Path, short_dir: Path) -> None:
    root = tmp_path / "recordings"
    config = {"audit": {"enable": True, "format": "asciinema", "storage": "file",
                        "file": {"directory": str(root)}}}
    tmux = ["tmux", "-S", str(short_dir / "tmux"), "-f", "/dev/null"]
    env = {**ENV, "TERM": "xterm-256color"}

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t", "rec"],
                              capture_output=True, env=env, check=True).stdout.decode()

    with gateway_with(cluster, keys, tmp_path, "rec-tty", config) as gateway:
        status = short_dir / "status"
        client = shlex.join(["ssh", "-tt", *gateway.opts(), "alice@127.0.0.1"])
        subprocess.run([*tmux, "new-session", "-d", "-s", "rec", "-x", "90", "-y", "25",
                        f"{client}; echo $? > {status}; sleep 600"], env=env, check=True)
        try:
            wait_for(lambda: pane().strip(), 30, "the shell prompt")
            subprocess.run([*tmux, "send-keys", "-t", "rec", "-l",
                            "echo rec-$((6*7))-done; printf 'caf\\303\\251\\n'; exit 3"],
                           env=env, check=True)
            subprocess.run([*tmux, "send-keys", "-t", "rec", "Enter"], env=env, check=True)
            wait_for(lambda: status.exists() and status.read_text().strip(), 30,
                     "the ssh client to exit")
            assert status.read_text().strip() == "3"
            shown = pane()
        finally:
            subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
        assert "rec-42-done" in shown and "café" in shown, shown
        # a plain exec and an sftp session on other connections
        result = gateway.run("echo from-exec; echo to-stderr >&2", input=b"typed-secret\n")
        assert result.returncode == 0
        sftp = subprocess.run(["sftp", *gateway.opts(), "-b", "-", "alice@127.0.0.1"],
                              input=b"ls /\n", capture_output=True, env=ENV, timeout=60)
        assert sftp.returncode == 0, sftp.stderr
        wait_for(lambda: len(_casts(root)) >= 3, 20, "three recordings")
        casts = _casts(root)
    shell = casts["0-shell.cast"]
    assert shell.parent.parent.parent == root and len(shell.parent.name) == 16
    assert stat.S_IMODE(os.stat(shell).st_mode) == 0o600
    header = json.loads(shell.read_text().splitlines()[0])
    assert (header["width"], header["height"]) == (90, 25)
    assert header["env"]["TERM"].endswith("256color")  # tmux's own terminal type
    assert header["env"]["SHELL"] == "/bin/sh"
    assert header["title"] == "alice: /bin/sh -l"
    replay = subprocess.run([ASCIINEMA, "cat", str(shell)], capture_output=True, timeout=60,
                            env={**ENV, "HOME": str(tmp_path)})
    assert replay.returncode == 0, replay.stderr
    text = replay.stdout.decode()
    assert "rec-42-done" in text and "café" in text, text
    assert "typed" not in shell.read_text()  # input is not recorded by default

    exec_cast = next(p for name, p in casts.items() if name.endswith("-exec.cast"))
    exec_text = exec_cast.read_text()
    assert json.loads(exec_text.splitlines()[0])["title"].startswith("alice: echo from-exec")
    assert "from-exec" in exec_text and "to-stderr" in exec_text
    assert "typed-secret" not in exec_text
    sub = next(p for name, p in casts.items() if name.endswith("-subsystem.cast"))
    events = [json.loads(line) for line in sub.read_text().splitlines()[1:]]
    assert len(events) == 1 and events[0][1] == "m", events
    assert events[0][2].startswith("subsystem: ") and "bytes out (not recorded)" in events[0][2]
