"""Issue 11, the first hour: what a new user trips over in the demo, the tutorial and the CLI.

The replay at the end runs the README's two commands and the tutorial's commands as written
(see :func:`doc_commands` for the marker convention); the tests before it pin each fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kuberun_trio.gateway.config import ConnectionConfig
from kuberun_trio.server.kubecheck import connection_problems

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}, {name: y, context: {cluster: gone}}]
current-context: x
"""


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new user: a fresh HOME, no $KUBECONFIG, no agent, no proxy."""
    drop = {"KUBECONFIG", "SSH_AUTH_SOCK", "XDG_STATE_HOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kuberun_trio", *args], capture_output=True,
                          text=True, timeout=60, env=fresh_env(home), cwd=ROOT)


# -- 1, 2: the kubeconfig is checked before use, and a missing one is called missing ------------

def test_kubeconfig_problems_name_what_is_wrong(tmp_path: Path) -> None:
    def problems(env: dict[str, str], **conn: Any) -> list[str]:
        return [str(e) for e in connection_problems(ConnectionConfig(**conn), env)]

    home = {"HOME": str(tmp_path)}
    (missing,) = problems(home)
    assert f"file not found: {tmp_path}/.kube/config (the default" in missing
    assert "pass --kubeconfig FILE" in missing
    (listed,) = problems({**home, "KUBECONFIG": f"{tmp_path}/a:{tmp_path}/b"})
    assert f"file not found: {tmp_path}/a:{tmp_path}/b (from $KUBECONFIG)" in listed
    kc = tmp_path / "kc"
    kc.write_text(KUBECONFIG)
    assert problems(home, kubeconfig=str(kc)) == []
    (bad_context,) = problems(home, kubeconfig=str(kc), context="z")
    assert bad_context.startswith("kubernetes.connection.context: ")
    assert "no context 'z' (contexts: x, y)" in bad_context
    (dangling,) = problems(home, kubeconfig=str(kc), context="y")
    assert "names cluster 'gone', which it lacks" in dangling
    kc.write_text(KUBECONFIG.replace("current-context: x\n", ""))
    (no_current,) = problems(home, kubeconfig=str(kc))
    assert "sets no current-context; pass --context NAME" in no_current
    kc.write_text("{")
    (not_yaml,) = problems(home, kubeconfig=str(kc))
    assert "is not YAML" in not_yaml
    (outside,) = problems({}, in_cluster=True)
    assert "not running in a Kubernetes pod" in outside


def test_check_config_lists_listen_with_the_missing_kubeconfig(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ssh: {listen: '127.0.0.1:notaport'}\n"
                      "kubernetes: {connection: {kubeconfig: /etc/kuberun/kubeconfig}}\n")
    result = cli("check-config", str(config), home=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.splitlines()[1:] == [
        "  ssh.listen: expected HOST:PORT (e.g. \"0.0.0.0:2222\"), got '127.0.0.1:notaport'",
        "  kubernetes.connection.kubeconfig: file not found: /etc/kuberun/kubeconfig; pass "
        "--kubeconfig FILE (or set $KUBECONFIG, or kubernetes.connection.kubeconfig in "
        "--config FILE)"]


@pytest.mark.parametrize("args", [["gc", "--dry-run"], ["gc", "--cluster", "kubeconfig"],
                                  ["--cluster", "kubeconfig"]])
def test_no_kubeconfig_says_what_to_pass(tmp_path: Path, args: list[str]) -> None:
    result = cli(*args, "--state-dir", str(tmp_path / "state"), home=tmp_path) \
        if args[0] != "gc" else cli(*args, home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"configuration error: kubernetes.connection.kubeconfig: file not found: "
        f"{tmp_path}/.kube/config (the default, as kubectl: no --kubeconfig, no $KUBECONFIG); "
        "pass --kubeconfig FILE (or set $KUBECONFIG, or kubernetes.connection.kubeconfig in "
        "--config FILE)")
    assert "Expected key current-context" not in result.stderr
