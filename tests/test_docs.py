"""The documentation's examples work: the embedding program serves a real ``ssh`` client,
the authenticator snippet authenticates, the YAML examples load, the RBAC covers the API
calls the gateway makes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberun_trio.core.auth import AuthResult
from kuberun_trio.server.config import parse_server_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"},
       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def blocks(doc: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``doc`` (a path below the repository)."""
    text = (ROOT / doc).read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, env=ENV)
    return path


@pytest.mark.needs("ssh", "ssh-keygen")
def test_embedding_example_serves_ssh(tmp_path: Path) -> None:
    program = next(b for b in blocks("docs/embedding.md", "python") if "trio.run(main" in b)
    (tmp_path / "serve_ssh.py").write_text(program)
    keygen(tmp_path / "host_ed25519")
    client = keygen(tmp_path / "client")
    (tmp_path / "authorized_keys").write_text(
        "# comment lines are skipped\n" + Path(f"{client}.pub").read_text())
    out = tmp_path / "out"
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "serve_ssh.py", "0"], cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(rb"listening on 127\.0\.0\.1:(\d+)", out.read_bytes())):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        result = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
             "-o", "IdentitiesOnly=yes", "-i", str(client), "-p", found[1].decode(),
             "me@127.0.0.1", "hostname"], capture_output=True, env=ENV, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().startswith("kuberun-")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out.read_text()
        assert out.read_text().rstrip().endswith("stopped")
        assert (tmp_path / "kubeconfig").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_authenticator_snippet() -> None:
    snippet = next(b for b in blocks("docs/embedding.md", "python") if "class TeamKeys" in b)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/embedding.md", "exec"), namespace)
    alice = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a"
    stranger = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJm6VO0xl1r9lFbGWDwOR5ZOHpY0EC81HWHcDsC5zmR"
    auth = namespace["TeamKeys"]({"blue": [alice]})
    assert auth.methods() == frozenset({"publickey"})
    result = await auth.check_public_key("c1", "anyone", alice.rsplit(" ", 1)[0])
    assert isinstance(result, AuthResult)
    assert dict(result.metadata) == {"team": "blue"} and dict(result.environment) == {
        "TEAM": "blue"}
    assert await auth.check_public_key("c1", "anyone", stranger) is None
    assert await auth.check_password("c1", "anyone", "secret") is None


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_configuration_examples_load(doc: str) -> None:
    examples = [e for b in blocks(doc, "yaml") for e in yaml.safe_load_all(b)]
    configs = [parse_server_config(e) for e in examples if "kubernetes" in e]
    assert configs
    for config in configs:
        assert config.instance == "gateway-1"
        assert config.ssh.address == ("0.0.0.0", 2222)
        assert config.kubernetes.pod.metadata["namespace"] == "ssh-sessions"
        assert config.kubernetes.timeouts.pod_start == 60.0


def test_readme_rbac_covers_the_gateway() -> None:
    (rbac,) = [b for b in blocks("README.md", "yaml") if "kind: Role" in b]
    role = next(d for d in yaml.safe_load_all(rbac) if d["kind"] == "Role")
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    needed = {("pods", v) for v in ("create", "get", "list", "watch", "delete", "patch")}
    needed |= {("pods/exec", "get"), ("pods/exec", "create"), ("events", "list")}
    needed |= {("pods/portforward", "get"), ("pods/portforward", "create")}  # ssh -L / -D
    assert needed <= granted


@pytest.mark.needs("ssh", "ssh-keygen")
def test_tutorial_configuration_webhook(tmp_path: Path) -> None:
    """The tutorial's webhook server, its configuration and its ssh command, as written
    (ports aside): alice gets her image, everyone the greeting and /tmp/motd."""
    from support import require_namespaces_sync

    require_namespaces_sync()  # the demo's pods get a private /tmp
    doc = "docs/tutorial.md"
    (tmp_path / "configserver.py").write_text(
        next(b for b in blocks(doc, "python") if "class ConfigWebhook" in b))
    (config,) = [b for b in blocks(doc, "yaml") if "configserver:" in b]
    (command,) = [b for b in blocks(doc, "sh") if "alice@127.0.0.1" in b]
    env = {**ENV, "HOME": str(tmp_path)}
    hook = subprocess.Popen([sys.executable, "configserver.py", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        assert hook.stdout is not None
        url = hook.stdout.readline().decode().split(" on ")[1].strip()
        (tmp_path / "webhook.yaml").write_text(config.replace("http://127.0.0.1:8080/", url))
        state, out = tmp_path / "state", tmp_path / "gateway.log"
        with out.open("wb") as sink:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "kuberun_trio", "--cluster", "embedded", "--config",
                 "webhook.yaml", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
                cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not (found := re.search(rb"listening on 127\.0\.0\.1:(\d+)", out.read_bytes())):
            assert gateway.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        port = found[1].decode()

        def ssh(user: str) -> subprocess.CompletedProcess[str]:
            script = command.replace("-p 2222", f"-p {port} -o BatchMode=yes") \
                .replace("alice@", f"{user}@")
            return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                  env={**env, "STATE": str(state)}, timeout=60)

        alice, bob = ssh("alice"), ssh("bob")
        assert alice.returncode == 0, alice.stderr
        assert re.fullmatch(r"hello alice\nwelcome, alice; you came from 127\.0\.0\.1:\d+\n",
                            alice.stdout), alice.stdout
        assert bob.stdout.startswith("hello bob\nwelcome, bob;"), bob.stderr
        log = out.read_text()
        assert re.search(r"configuration for connection \w+: kubernetes", log), log
        assert re.search(r"configuration for connection \w+: the file's", log), log
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(30) == 0, out.read_text()
    finally:
        for proc in (gateway, hook):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if hook.stdout is not None:
            hook.stdout.close()


async def test_configure_snippet() -> None:
    snippet = next(b for b in blocks("docs/embedding.md", "python") if "def team_images" in b)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/embedding.md", "exec"), namespace)
    from kuberun_trio.core.config import KubernetesConfig
    from kuberun_trio.core.connsettings import ConfigRefused, LoginInfo

    configure = namespace["team_images"](KubernetesConfig.default(), {"blue": "python:3.12"})

    def login(team: str) -> LoginInfo:
        return LoginInfo("c1", "al", "al", "127.0.0.1:2", "SSH-2.0-x",
                         AuthResult(metadata={"team": team} if team else {}))

    settings = await configure(login("blue"))
    assert settings.kubernetes.pod.spec["containers"][0]["image"] == "python:3.12"
    assert dict(settings.environment) == {"TEAM": "blue"}
    assert KubernetesConfig.default().pod.spec["containers"][0]["image"] == "busybox"
    with pytest.raises(ConfigRefused):
        await configure(login(""))

OWN_POD = re.compile(r"^[ \t]*<!-- own-pod: (\w+)(.*?)-->[ \t]*\n"
                     r"(?:\s*^[ \t]*```sh\n(.*?)^[ \t]*```)?", re.S | re.M)


@pytest.mark.needs("ssh", "kubectl")
def test_tutorial_own_pod_as_written() -> None:
    """The tutorial's "your own pod" section, replayed like tests/test_newcomer.py replays the
    rest: a fresh HOME whose state directory the earlier sections made, the assignments of
    the earlier blocks (``STATE``, ``SSH``), a free port."""
    import shutil
    import tempfile

    from test_newcomer import Replay, Step, doc_commands

    from kuberun_trio.core.podtemplate import persistent_pod_name

    home = Path(tempfile.mkdtemp(prefix="kr-home-", dir="/tmp"))
    replay = Replay(home)
    try:
        (home / ".local/state/kuberun-trio").mkdir(parents=True)  # sections 1-4 made it
        for step in doc_commands("docs/tutorial.md"):
            replay.prepare(step)  # collects STATE=..., SSH=...
        text = (ROOT / "docs/tutorial.md").read_text()
        steps = [Step(m[1], dict(re.findall(r"(\w+)=(\S+)", m[2])), m[3] or "")
                 for m in OWN_POD.finditer(text)]
        assert [s.kind for s in steps] == ["run", "start", "run", "stop"]
        stopped = []
        for step in steps:
            if step.kind == "run":
                replay.run(step, timeout=120)
            elif step.kind == "start":
                replay.start(step, timeout=120)
            else:
                stopped.append(replay.stop())
        out = "".join(o for o, _ in replay.outputs)
        pod = persistent_pod_name("user")
        assert f"# {pod}" in text, "the comment in the tutorial names the pod"
        assert f"{pod}\n{pod}\nwork in progress\n" in out, out
        assert re.search(rf"^{pod}\s+1/1\s+Running.*persistent$", out, re.M), out
        assert "persistent-pod-created" in stopped[0]
    finally:
        for proc, _ in replay.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)
