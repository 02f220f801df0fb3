"""Issue 11, the first hour: what a new user trips over in the demo, the tutorial and the CLI.

The replay at the end runs the README's two commands and the tutorial's commands as written
(see :func:`doc_commands` for the marker convention); the tests before it pin each fix.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import trio

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.errors import ConfigErrors
from kuberun_trio.gateway.config import ConnectionConfig
from kuberun_trio.server import authkeys
from kuberun_trio.server.auth import build_authenticator
from kuberun_trio.server.config import AuthConfig, parse_server_config
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


# -- 10, 11: kubectl against the embedded cluster -----------------------------------------------

def kubectl_binary(minor: int) -> str | None:
    found = shutil.which("kubectl")
    if found is None:
        return None
    path = Path(os.path.realpath(found)).parent / f"kubectl.1.{minor}"
    return str(path) if path.exists() else None


async def kubectl(minor: int, cluster: EmbeddedCluster,
                  *args: str) -> subprocess.CompletedProcess[str]:
    binary = kubectl_binary(minor)
    if binary is None:
        pytest.skip(f"kubectl.1.{minor} is not installed")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}
    with trio.fail_after(60):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [binary, *args], capture_stdout=True, capture_stderr=True, check=False, env=env)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


@pytest.mark.parametrize(("minor", "server"), [(33, "v1.33.0"), (30, "v1.31.0")])
async def test_kubectl_version_has_no_skew_warning(cluster: EmbeddedCluster, minor: int,
                                                   server: str) -> None:
    result = await kubectl(minor, cluster, "version")
    assert result.returncode == 0, result.stderr
    assert f"Server Version: {server}" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


async def test_spdy_exec_is_told_why(cluster: EmbeddedCluster) -> None:
    created = await kubectl(33, cluster, "run", "p", "--image=busybox", "--command", "--",
                            "sleep", "300")
    assert created.returncode == 0, created.stderr
    waited = await kubectl(33, cluster, "wait", "--for=condition=Ready", "pod/p", "--timeout=30s")
    assert waited.returncode == 0, waited.stderr
    old = await kubectl(29, cluster, "exec", "p", "--", "echo", "hi")
    assert (old.returncode, old.stdout) == (1, "")
    assert old.stderr.strip() == (
        "Error from server (BadRequest): unable to upgrade connection: this API server speaks "
        "WebSocket streaming only; use kubectl ≥ 1.30")
    new = await kubectl(30, cluster, "exec", "p", "--", "echo", "hi")
    assert (new.returncode, new.stdout) == (0, "hi\n"), new.stderr


# -- 9: the soak's --plot without matplotlib -----------------------------------------------------

def test_soak_plot_without_matplotlib_says_which_extra(tmp_path: Path) -> None:
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # as if not installed
            "sys.argv = ['soak', '--plot', sys.argv[1]]; "
            "runpy.run_module('benchmarks.soak', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, str(tmp_path / "p.png")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "error: --plot needs matplotlib: install the bench extra: pip install -e '.[bench]'")
    assert "Traceback" not in result.stderr
    assert "pip install -e '.[bench]'" in (ROOT / "docs/performance.md").read_text()
    assert "matplotlib" in (ROOT / "pyproject.toml").read_text()


# -- 13: %u, %h and %% in auth.authorizedKeys ---------------------------------------------------

def public_key() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return str(key.export_public_key("openssh").decode().strip())


@pytest.mark.parametrize(("template", "user", "expanded"), [
    ("/etc/kuberun/keys/%u", "alice", "/etc/kuberun/keys/alice"),
    ("%h/.ssh/authorized_keys", "bob", "/home/bob/.ssh/authorized_keys"),
    ("/k/100%%/%u.pub", "carol", "/k/100%/carol.pub"),
    ("/k/%%u", "dave", "/k/%u"),
    ("keys-%u", "erin", "keys-erin"),
])
def test_tokens_expand_as_openssh_does(template: str, user: str, expanded: str) -> None:
    assert authkeys.expand(template, user) == expanded


@pytest.mark.parametrize("user", ["..", ".", "", "a/b", "../../etc", "x\0y"])
@pytest.mark.parametrize("template", ["/etc/kuberun/keys/%u", "%h/.ssh/authorized_keys",
                                      "/k/%u.pub"])
def test_a_username_cannot_leave_the_directory(template: str, user: str) -> None:
    with pytest.raises(ValueError, match=r"cannot name a keys file|would leave"):
        authkeys.expand(template, user)


def test_unknown_tokens_are_configuration_errors() -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse_server_config({"auth": {"authorizedKeys": ["/k/%u", "/k/%x"],
                                      "homeDirectory": "/srv/%h"}})
    assert [str(e) for e in caught.value.errors] == [
        "auth.authorizedKeys[1]: unknown token %x in '/k/%x' (use %%, %u or %h)",
        "auth.homeDirectory: %h cannot be used in its own definition"]
    config = parse_server_config({"auth": {"authorizedKeys": ["/nonexistent/%u"]}},
                                 files=True)  # a per-user file need not exist up front
    assert config.auth.home_directory == "/home/%u"


async def test_per_user_keys_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    alice_key, bob_key, shared_key = public_key(), public_key(), public_key()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alice").write_text(alice_key + "\n")
    (tmp_path / "homes" / "bob" / ".ssh").mkdir(parents=True)
    (tmp_path / "homes" / "bob" / ".ssh" / "authorized_keys").write_text(bob_key + "\n")
    (tmp_path / "shared").write_text(shared_key + "\n")
    (tmp_path / "alice").write_text(bob_key + "\n")  # one level up: must stay out of reach
    auth = build_authenticator(AuthConfig(
        authorized_keys=(str(tmp_path / "keys" / "%u"), "%h/.ssh/authorized_keys",
                         str(tmp_path / "shared")),
        home_directory=str(tmp_path / "homes" / "%u")), logger=logging.getLogger("t"))

    async def allowed(user: str, key: str) -> bool:
        return await auth.check_public_key("c", user, key, remote_address="127.0.0.1:1") \
            is not None

    assert await allowed("alice", alice_key)
    assert not await allowed("bob", alice_key)  # alice's file is alice's only
    assert await allowed("bob", bob_key)  # %h
    assert not await allowed("carol", bob_key)  # no file for carol: no keys
    assert await allowed("carol", shared_key)  # a plain file still lets anyone in
    assert not await allowed("../alice", bob_key)
    assert not await allowed("..", bob_key)
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert refusals == [
        f"username {u!r} cannot name a keys file: refused for {tmp_path}/keys/%u"
        for u in ("../alice", "..")]
