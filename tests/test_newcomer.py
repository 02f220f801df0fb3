"""Issue 11, the first hour: what a new user trips over in the demo, the tutorial and the CLI.

The replay at the end runs the README's two commands and the tutorial's commands as written
(see :func:`doc_commands` for the marker convention); the tests before it pin each fix.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import pytest
import trio
import trio_asyncio

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.config import ConnectionConfig
from kuberun_trio.errors import ConfigErrors
from kuberun_trio.server import authkeys
from kuberun_trio.server.auth import build_authenticator
from kuberun_trio.server.authconfig import AuthConfig
from kuberun_trio.server.config import parse_server_config

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
    from kuberun_trio.server.kubecheck import connection_problems

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


# == the replay: the README's two commands and the tutorial, as written ==========================
#
# Marker convention (in the Markdown, on the line before a fenced ``sh`` block):
#
#   <!-- replay: run [cwd=repo] [args="..."] -->  run the block with bash to its end; it
#                                                  must exit 0 (``args`` are appended to
#                                                  its last line)
#   <!-- replay: start [cwd=repo] -->              start the block in the background (its own
#                                                  process group, as a terminal would) and go
#                                                  on once it prints ``connect with:`` (the
#                                                  gateway), ``try: KUBECONFIG=`` (the
#                                                  standalone embedded cluster) or
#                                                  ``listening on`` (embedding.md's program)
#   <!-- replay: stop -->                          (no block) Ctrl-C: SIGINT to the process
#                                                  group last started; it must exit 0
#   <!-- replay: interactive -->                   each line under ``script`` (a pty), typing
#                                                  ``q`` where the line says "q to quit",
#                                                  else ``exit``
#
# Blocks run in a fresh HOME (the "second terminal"), or with ``cwd=repo`` in the repository
# (for docs/embedding.md, whose example writes files there: a scratch directory with the
# repository's ``.venv`` linked in).
# Assignments of earlier blocks (``STATE=...``) are carried into later ones, as in one shell.
# Substitutions, so that parallel test runs never meet on a port: ``2222`` (and ``8000``,
# ``8080``, ``1080``) becomes a free port, and a block that starts the gateway without
# ``--listen`` gets ``--listen 127.0.0.1:PORT`` appended. Whatever is still running at the
# end is stopped as ``stop`` does.

MARKER = re.compile(r"^[ \t]*<!-- replay: (\w+)(.*?)-->[ \t]*\n"
                    r"(?:\s*^[ \t]*```sh\n(.*?)^[ \t]*```)?", re.S | re.M)
ASSIGNMENT = re.compile(r"""[A-Za-z_][A-Za-z0-9_]*=("[^"]*"|'[^']*'|\S+)\s*(#.*)?""")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ")


@attrs.frozen
class Step:
    kind: str
    options: dict[str, str]
    script: str


def doc_commands(doc: str) -> list[Step]:
    """The marked steps of ``doc`` (a path below the repository), in order."""
    steps = []
    for match in MARKER.finditer((ROOT / doc).read_text()):
        options = {k: quoted or plain for k, quoted, plain in
                   re.findall(r'(\w+)=(?:"([^"]*)"|(\S+))', match[2])}
        steps.append(Step(match[1], options, textwrap.dedent(match[3] or "")))
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define
class Replay:
    """Runs the steps of one document in a fresh HOME, as a newcomer would."""

    home: Path
    repo: Path = ROOT
    """Where ``cwd=repo`` blocks run."""
    port: int = attrs.field(factory=free_port)
    ports: dict[str, int] = attrs.field(
        factory=lambda: {p: free_port() for p in ("8000", "8080", "1080")})
    """More ports the docs name (the tutorial's forwarding example), each a free one here."""
    prelude: list[str] = attrs.field(factory=list)
    started: list[tuple[subprocess.Popen[bytes], Path]] = attrs.field(factory=list)
    outputs: list[tuple[str, str]] = attrs.field(factory=list)

    def env(self) -> dict[str, str]:
        return fresh_env(self.home)

    def prepare(self, step: Step) -> tuple[str, Path]:
        script = step.script.replace("2222", str(self.port))
        for written, free in self.ports.items():
            script = script.replace(written, str(free))
        lines = script.rstrip("\n").split("\n")
        if step.kind == "start" and re.search(r"-m kuberun_trio(?! embedded-cluster)", script) \
                and "--listen" not in script:
            lines[-1] += f" --listen 127.0.0.1:{self.port}"
        if "args" in step.options:
            lines[-1] += " " + step.options["args"]
        script = "\n".join([*self.prelude, *lines]) + "\n"
        self.prelude += [line for line in lines if ASSIGNMENT.fullmatch(line.strip())]
        return script, self.repo if step.options.get("cwd") == "repo" else self.home

    def run(self, step: Step, timeout: float = 600) -> tuple[str, str]:
        script, cwd = self.prepare(step)
        out, err = self.home / f".replay-{len(self.outputs)}.out", \
            self.home / f".replay-{len(self.outputs)}.err"
        with out.open("wb") as o, err.open("wb") as e:  # files: background jobs may outlive bash
            code = subprocess.run(["bash", "-c", script], cwd=cwd, env=self.env(), stdout=o,
                                  stderr=e, stdin=subprocess.DEVNULL, timeout=timeout,
                                  start_new_session=True).returncode
        result = (out.read_text(), err.read_text())
        self.outputs.append(result)
        assert code == 0, f"{step.script}\nexit {code}\n{result}"
        return result

    def interactive(self, step: Step) -> None:
        _, cwd = self.prepare(step)
        prelude = list(self.prelude)
        for number, line in enumerate(step.script.strip().split("\n")):
            command = line.replace("2222", str(self.port)).split("#")[0].strip()
            keys = b"q" if "q to quit" in line else b"exit\n"
            program = shlex.quote("\n".join([*prelude, command]))
            screen = self.home / f".replay-pty-{len(self.outputs)}-{number}"
            with screen.open("wb") as sink:
                proc = subprocess.Popen(["script", "-qfec", f"bash -c {program}", "/dev/null"],
                                        stdin=subprocess.PIPE, stdout=sink, cwd=cwd,
                                        env=self.env(), start_new_session=True)
            try:
                deadline = time.monotonic() + 60
                while screen.stat().st_size == 0:  # the prompt, or top's first screen
                    assert proc.poll() is None and time.monotonic() < deadline, line
                    time.sleep(0.1)
                time.sleep(1)
                assert proc.stdin is not None
                proc.stdin.write(keys)  # what a person types to leave
                proc.stdin.close()
                assert proc.wait(60) == 0, (line, screen.read_bytes()[-500:])
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.outputs.append((screen.read_text(errors="replace"), ""))

    def start(self, step: Step, timeout: float = 600) -> str:
        script, cwd = self.prepare(step)
        log = self.home / f".replay-start-{len(self.started)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=self.env(),
                                    stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((proc, log))
        deadline = time.monotonic() + timeout
        ready = re.compile(r"^(connect with:|try: KUBECONFIG=|listening on )", re.M)
        while not ready.search(log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        return log.read_text()

    def stop(self) -> str:
        proc, log = self.started.pop()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in that terminal
        try:
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log.read_text()
        assert code == 0, text
        return text

    def replay(self, doc: str) -> list[str]:
        """Every step of ``doc``; returns the logs of the processes it stopped."""
        stopped = []
        try:
            for step in doc_commands(doc):
                if step.kind == "run":
                    self.run(step)
                elif step.kind == "start":
                    self.start(step)
                elif step.kind == "stop":
                    stopped.append(self.stop())
                else:
                    assert step.kind == "interactive", step
                    self.interactive(step)
            while self.started:
                stopped.append(self.stop())
        finally:
            for proc, _ in self.started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return stopped


needs_openssh = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("ssh", "sftp", "ssh-keygen", "script"))
    or not Path("/usr/lib/openssh/sftp-server").exists(),
    reason="needs openssh-client, openssh-sftp-server and util-linux script")


@pytest.fixture
def newcomer_home() -> Iterator[Path]:
    """A fresh HOME with a short path (ssh's ControlPath must fit a unix socket name)."""
    home = Path(tempfile.mkdtemp(prefix="kr-home-", dir="/tmp"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_the_docs_mark_what_the_replay_runs() -> None:
    kinds = [s.kind for s in doc_commands("README.md")]
    assert kinds == ["start", "run"]
    tutorial = doc_commands("docs/tutorial.md")
    assert [s.kind for s in tutorial].count("stop") == 1
    assert all(s.script.strip() for s in tutorial if s.kind != "stop")
    assert "~/.ssh" not in (ROOT / "docs/tutorial.md").read_text()
    assert "~/.ssh" not in (ROOT / "docs/embedding.md").read_text()


@needs_openssh
def test_readme_two_commands(newcomer_home: Path) -> None:
    replay = Replay(newcomer_home)
    start, tests = doc_commands("README.md")
    banner = replay.start(start)
    command = banner.split("connect with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("ssh -i ") and f"-p {replay.port} " in command
    state = newcomer_home / ".local/state/kuberun-trio"
    assert f"UserKnownHostsFile={state}/known_hosts" in command
    hello = subprocess.run([*shlex.split(command), "-o", "BatchMode=yes", "echo hello"],
                           capture_output=True, text=True, timeout=60,
                           env=fresh_env(newcomer_home), stdin=subprocess.DEVNULL)
    assert (hello.returncode, hello.stdout) == (0, "hello\n"), hello.stderr
    out, _ = replay.run(tests)  # ./tests/run with "--co -q": the installation and linters run
    assert re.search(r"\d+ tests collected", out), out
    log = replay.stop()
    assert "all connections closed" in log


@needs_openssh
def test_tutorial_as_written(newcomer_home: Path) -> None:
    replay = Replay(newcomer_home)
    demo_log, gateway_log, cluster_log = replay.replay("docs/tutorial.md")
    out = "".join(o for o, _ in replay.outputs)
    err = "".join(p.read_text() for p in sorted(newcomer_home.glob(".replay-*.err")))
    for expected in ("hello from kuberun-", "out\n", "exit status 3", "3\n", "bar\n",
                     "0\nnot in this machine's /tmp either", "kept\n", "kuberun.trio/instance",
                     "demo_key (ED25519)"):
        assert expected in out, (expected, out)
    assert "err\n" in err and "Permission denied" not in err
    served = re.findall(r"^served from (kuberun-\w{5})$", out, re.M)  # ssh -L, then ssh -D
    assert len(served) == 2 and served[0] == served[1], out
    assert (newcomer_home / "notes-back.txt").read_text() == "some data\n"
    hostnames = [line for line in out.splitlines() if re.fullmatch(r"kuberun-\w{5}", line)]
    assert len(hostnames) == 2 and hostnames[0] == hostnames[1]  # ControlMaster: one pod
    # 7. Ctrl-C with a session open (the background 'sleep 60', whose stderr went on into
    # its block's file after the block ended): one message, with one prefix
    assert "kuberun: the gateway is shutting down" in err
    assert "kuberun: kuberun" not in err
    assert "shutting down: 1 connection, grace" in demo_log
    assert demo_log.count("embedded cluster serving at") == 1
    for log in (demo_log, gateway_log, cluster_log):
        for line in log.splitlines():
            if " kuberun_trio." in line:  # a log line, not the banner: the same format
                assert TIMESTAMP.match(line), line
    assert "received SIGINT" in cluster_log
    # 3. outside demo mode the gateway prints an ssh command with the host key
    fingerprint = re.search(r"host key (SHA256:\S+)", gateway_log)
    assert fingerprint is not None
    assert f"ssh -p {replay.port} USER@127.0.0.1   # ssh must show the host key " \
        f"{fingerprint[1]}" in gateway_log
    # 5. no session left its PID file behind (pods of the standalone cluster share /tmp)
    connections = set(re.findall(r"connection_id=(\w+)", gateway_log + demo_log))
    assert connections
    left = [p for c in connections for p in Path("/tmp").glob(f".kuberun-{c}-*.pid")]
    assert left == []


@needs_openssh
def test_embedding_example_as_written(newcomer_home: Path) -> None:
    workdir = newcomer_home / "checkout"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    text = (ROOT / "docs/embedding.md").read_text()
    program = text.split("`serve_ssh.py`:\n\n```python\n", 1)[1].split("```", 1)[0]
    (workdir / "serve_ssh.py").write_text(program)
    replay = Replay(newcomer_home, repo=workdir)
    (log,) = replay.replay("docs/embedding.md")
    assert log.rstrip().endswith("stopped")
    out = "".join(o for o, _ in replay.outputs)
    assert re.search(r"^kuberun-\w{5}$", out, re.M), out


# -- 6, 8, 12: one demo per state directory, a taken port, a missing sftp-server, the script ----

def start_demo(home: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = home / f"demo-{time.monotonic_ns()}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "kuberun_trio", *args], cwd=ROOT,
                                env=fresh_env(home), stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while "connect with:" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, log


def stop_demo(proc: subprocess.Popen[bytes]) -> int:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_second_demo_is_refused_before_it_touches_the_state_dir(tmp_path: Path) -> None:
    first, _ = start_demo(tmp_path, "--listen", "127.0.0.1:0")
    try:
        state = tmp_path / ".local/state/kuberun-trio"
        before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
        second = cli("--listen", "127.0.0.1:0", home=tmp_path)
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"error: a demo is already running (pid {first.pid}) with the state directory "
            f"{state}; use --state-dir and --listen for another")
        after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
        assert after == before  # embedded-kubeconfig above all
        other = cli("--listen", "nowhere", "--state-dir", str(tmp_path / "other"), home=tmp_path)
        assert other.returncode == 2  # (flags are checked before any lock is taken)
    finally:
        assert stop_demo(first) == 0
    # the lock went with the process: the next demo starts
    again, _ = start_demo(tmp_path, "--listen", "127.0.0.1:0")
    assert stop_demo(again) == 0


def test_a_taken_port_suggests_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("--listen", f"127.0.0.1:{port}", home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pass --listen "
        "HOST:PORT for another address (port 0 picks a free one)")


def test_demo_says_which_package_sftp_needs(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"  # stands in for a host without openssh-sftp-server
    config.write_text("kubernetes: {pod: {subsystems: {sftp: /nonexistent/sftp-server}}}\n")
    proc, log = start_demo(tmp_path, "--cluster", "embedded", "--config", str(config),
                           "--listen", "127.0.0.1:0")
    assert stop_demo(proc) == 0
    warnings = [line for line in log.read_text().splitlines() if "sftp" in line]
    assert len(warnings) == 1
    assert "sftp and scp will fail: /nonexistent/sftp-server is missing on this host" in \
        warnings[0] and "fix kubernetes.pod.subsystems.sftp" in warnings[0]
    from kuberun_trio.core.config import KubernetesConfig
    from kuberun_trio.server.main import check_demo_sftp

    default = KubernetesConfig.default()
    if not os.access("/usr/lib/openssh/sftp-server", os.X_OK):  # pragma: no cover
        pytest.skip("this host lacks sftp-server: the default case is the one above")
    assert check_demo_sftp(default) is None
    pod = attrs.evolve(default.pod, subsystems={"sftp": str(tmp_path / "missing")})
    message = check_demo_sftp(attrs.evolve(default, pod=pod))
    assert message is not None and "fix kubernetes.pod.subsystems.sftp" in message
    readme = (ROOT / "README.md").read_text()
    first_command = readme.split("## Two commands", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    assert "openssh-sftp-server" in first_command


def test_missing_default_sftp_server_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from kuberun_trio.core.config import KubernetesConfig
    from kuberun_trio.server import main

    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a host without the package
    message = main.check_demo_sftp(KubernetesConfig.default())
    assert message == (
        "sftp and scp will fail: /usr/lib/openssh/sftp-server is missing on this host (the "
        "demo's pods run on the host's files); install it: sudo apt-get install "
        "openssh-sftp-server")


def test_console_script_is_the_cli() -> None:
    script = Path(sys.executable).parent / "kuberun-trio"
    assert script.exists()
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout.split()[0]) == (0, "kuberun_trio")
    assert "`kuberun-trio`" in (ROOT / "README.md").read_text()


# -- 7: a terminal's Ctrl-C reaches the gateway, not its pods' plumbing ---------------------------

async def test_pod_processes_are_out_of_the_owners_process_group() -> None:
    from kuberun_trio.cluster.sandbox import PodSandbox

    box = await PodSandbox.create("pg-test")
    try:
        proc = await box.exec(["sleep", "30"], env={}, cwd="/", tty=False, stdin=False,
                              stdout=False, stderr=False)
        mine = os.getpgid(0)
        assert os.getpgid(box._init.pid) != mine  # unshare (or the fallback's sleeper)
        assert os.getpgid(proc._process.pid) != mine  # nsenter / the process itself
    finally:
        await box.destroy()


# -- 4: the demo's pods get a private /tmp -------------------------------------------------------

async def test_private_tmp_is_the_pods_own() -> None:
    from kuberun_trio.cluster.sandbox import PodSandbox, namespaces_supported

    if not await namespaces_supported():
        pytest.skip("no mount namespaces here: pods share the host's /tmp")
    name = f"kr-private-{os.getpid()}"
    boxes = [await PodSandbox.create("tmp-a", private_tmp=True),
             await PodSandbox.create("tmp-b", private_tmp=True)]
    try:
        async def sh(box: PodSandbox, command: str) -> bytes:
            proc = await box.exec(["sh", "-c", command], env={}, cwd="/", tty=False,
                                  stdin=False, stdout=True, stderr=False)
            assert proc.stdout is not None
            out = b""
            with trio.fail_after(10):
                while chunk := await proc.stdout.receive_some():
                    out += chunk
                await proc.wait()
            await proc.aclose()
            return out

        assert await sh(boxes[0], f"echo a > /tmp/{name}; cat /tmp/{name}") == b"a\n"
        assert await sh(boxes[1], f"cat /tmp/{name} 2>/dev/null || echo absent") == b"absent\n"
        assert not os.path.exists(f"/tmp/{name}")  # noqa: ASYNC240 -- one stat
    finally:
        for box in boxes:
            await box.destroy()


# -- 5: sessions leave no PID file behind (on the embedded cluster that is the host's /tmp) -------

async def test_sessions_leave_no_pid_files(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from gatewaykit import open_rig

    caplog.set_level(logging.INFO)

    def aio(fn: Any, *args: Any) -> Any:
        return trio_asyncio.aio_as_trio(fn)(*args)

    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def sessions() -> list[Any]:
            results = [await conn.run("true"), await conn.run("exit 3"),
                       await conn.run("tty", term_type="xterm")]
            process = await conn.create_process("echo started; sleep 30")
            await process.stdout.readline()
            process.send_signal("TERM")
            results.append(await process.wait())
            async with conn.start_sftp_client() as sftp:
                results.append(await sftp.listdir("/"))
            return results

        with trio.fail_after(60):
            done = await aio(sessions)
        assert [r.exit_status for r in done[:3]] == [0, 3, 0]
        assert done[3].exit_signal is not None and done[3].exit_signal[0] == "TERM"
        conn.close()
        await aio(conn.wait_closed)
    ids = {getattr(r, "connection_id", None) for r in caplog.records} - {None}
    assert len(ids) == 1
    (cid,) = ids
    starts = [r for r in caplog.records if getattr(r, "event", None) == "session-start"]
    assert len(starts) == 5
    assert sorted(Path("/tmp").glob(f".kuberun-{cid}-*")) == []  # noqa: ASYNC240


# -- found by the replay: `exit` in an interactive shell sometimes read "internal error" ---------

class _Frame:
    def __init__(self, data: bytes) -> None:
        import aiohttp

        self.type, self.data = aiohttp.WSMsgType.BINARY, data


class _ClosingSocket:
    """A WebSocket whose server has sent ``frames`` and is closing: every write fails."""

    _waiting = False

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def __aiter__(self) -> Any:
        return self._frames()

    async def _frames(self) -> Any:
        import asyncio

        for _ in range(3):  # the writer runs (and fails) first
            await asyncio.sleep(0)
        for frame in self.frames:
            yield _Frame(frame)

    async def send_bytes(self, frame: bytes) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    async def close(self) -> bool:
        return True


class _Sink:
    def write_stdout(self, data: bytes) -> None: ...
    def write_stderr(self, data: bytes) -> None: ...
    async def wait_writable(self) -> None: ...


@pytest.mark.parametrize(("frames", "outcome"), [
    ([b"\x01bye\n", b'\x03{"status": "Success"}'], 0),  # exited: the lost EOF does not matter
    ([b"\x01bye\n"], "ExecError"),  # no status: the stream broke, say so
])
def test_stdin_eof_racing_the_exit_is_not_an_error(frames: list[bytes], outcome: object) -> None:
    import asyncio

    from kuberun_trio.aio.execstream import V5, ExecStream
    from kuberun_trio.errors import ExecError

    async def main() -> object:
        stream = ExecStream(_ClosingSocket(frames), V5)  # type: ignore[arg-type]
        stream.close_stdin()  # the client's EOF, just as the shell exits
        try:
            return (await stream.run(_Sink())).exit_code  # type: ignore[arg-type]
        except ExecError:
            return "ExecError"

    assert asyncio.run(main()) == outcome
