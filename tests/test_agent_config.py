"""Agent forwarding without a cluster: its config keys, the demo default, the session's
``SSH_AUTH_SOCK``, the relay's line protocol and the argv that reaches the pod."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from kuberun_trio.cli import build_parser
from kuberun_trio.core.session import SessionConfig, SessionMachine, State
from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.gateway import agent
from kuberun_trio.server import authkeys
from kuberun_trio.server.config import parse_server_config
from kuberun_trio.server.settings import load_settings


def problems(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_server_config(data, instance="gw")
    errors = info.value.errors if isinstance(info.value, ConfigErrors) else (info.value,)
    return {e.path: e.problem for e in errors}


def test_default_is_disabled_and_bad_values_name_the_key() -> None:
    forwarding = parse_server_config({}, instance="gw").security.forwarding
    assert forwarding.agent == agent.AgentOptions(enabled=False, max_connections=8)
    on = parse_server_config({"security": {"forwarding": {"agentForwardingMode": "enable"}}},
                             instance="gw")
    assert on.security.forwarding.agent.enabled
    found = problems({"security": {"forwarding": {"agentForwardingMode": "yes",
                                                  "maxAgentConnections": 0}}})
    assert found == {
        "security.forwarding.agentForwardingMode": "must be enable or disable, got 'yes'",
        "security.forwarding.maxAgentConnections": "must be at least 1, got 0"}
    assert "security.forwarding.agentForwarding" in problems(
        {"security": {"forwarding": {"agentForwarding": True}}})


def test_the_demo_enables_it_unless_its_file_says_no(tmp_path: Path) -> None:
    def settings(*argv: str):  # type: ignore[no-untyped-def]
        args = build_parser().parse_args(["--state-dir", str(tmp_path / "st"), *argv])
        return load_settings(args, {"HOME": str(tmp_path)})

    assert settings().demo and settings().config.security.forwarding.agent.enabled
    off = tmp_path / "off.yaml"
    off.write_text("security: {forwarding: {agentForwardingMode: disable}}\n")
    assert not settings("--cluster", "embedded", "--config", str(off)
                        ).config.security.forwarding.agent.enabled
    plain = tmp_path / "plain.yaml"
    plain.write_text("kubernetes: {connection: {host: 'https://10.0.0.1:6443'}}\n")
    assert not settings("--config", str(plain)).config.security.forwarding.agent.enabled


def test_the_socket_is_exported_last_and_only_before_the_exec() -> None:
    machine = SessionMachine(SessionConfig(), session_id="c-0")
    machine.env("SSH_AUTH_SOCK", "/client/chose/this")
    assert machine.exec("ssh-add -l").accepted
    assert machine.state is State.STARTING
    machine.agent_socket("/tmp/kuberun-agent-x/agent")
    plan = machine.plan
    assert plan is not None
    assert plan.env[-1] == ("SSH_AUTH_SOCK", "/tmp/kuberun-agent-x/agent")
    assert [k for k, _ in plan.env].count("SSH_AUTH_SOCK") == 1
    assert "SSH_AUTH_SOCK=/tmp/kuberun-agent-x/agent" in plan.argv
    machine.started()
    machine.agent_socket("/tmp/other/agent")  # too late: nothing changes
    assert machine.plan == plan


def test_relay_lines() -> None:
    assert agent.parse_line("kuberun-agent ready socat\n") == ("ready", "socat")
    assert agent.parse_line("kuberun-agent conn 4711") == ("conn", "4711")
    assert agent.parse_line("kuberun-agent none") == ("none", "")
    assert agent.parse_line("2024/01/01 socat[9] E connect(): No such file") is None
    directory = agent.relay_directory()
    assert directory.startswith("/tmp/kuberun-agent-") and directory != agent.relay_directory()
    assert agent.connect_argv("socat", directory, 3) == (
        "socat", "-t", "0.1", "-", f"UNIX-CONNECT:{directory}/c3,retry=200,interval=0.05")
    assert agent.connect_argv("python3", directory, 3)[-1] == f"{directory}/c3"


def test_listener_reports_a_missing_tool_and_an_existing_directory(tmp_path: Path) -> None:
    """The real script under /bin/sh, with a PATH lacking both tools, then with a
    directory that exists already (mkdtemp's rule: never reuse one)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = agent.listener_argv(str(tmp_path / "relay"))
    none = subprocess.run(argv, capture_output=True, text=True, env={"PATH": str(empty)},
                          timeout=10)
    assert (none.returncode, none.stdout) == (3, "kuberun-agent none\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    exists = subprocess.run(agent.listener_argv(str(taken)), capture_output=True, text=True,
                            timeout=10, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    assert (exists.returncode, exists.stdout) == (
        4, f"kuberun-agent failed cannot create {taken}\n")


@pytest.mark.needs("socat", "python3")
@pytest.mark.parametrize("tool", ["socat", "python3"])
def test_listener_ends_on_stdin_eof(tmp_path: Path, tool: str) -> None:
    """What a real kubelet does when the gateway closes the relay's stream: stdin EOF.
    The listener, its relay and the relay's children end, and the directory goes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("mkdir", "rm", "sleep", tool):
        found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        assert found, name
        (bin_dir / name).symlink_to(found)
    directory = tmp_path / "relay"
    proc = subprocess.Popen(agent.listener_argv(str(directory), 2), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": str(bin_dir)}, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline() == f"kuberun-agent ready {tool}\n".encode()
        sock = directory / "agent"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))  # an agent client: announced on stderr, then held
        assert re.fullmatch(rb"kuberun-agent conn \d+\n", proc.stderr.readline())
        assert processes_mentioning(str(directory))
        proc.stdin.close()
        assert proc.wait(10) == 0
        client.close()
        deadline = time.monotonic() + 10
        while processes_mentioning(str(directory)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(str(directory)) == []
        assert not directory.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline:
                    found.append(cmdline)
    return found


@pytest.mark.parametrize(("options", "forbidden"), [
    ("", False),
    ("no-agent-forwarding ", True),
    ('no-agent-forwarding,from="127.0.0.1",agent-forwarding ', False),
    ("agent-forwarding,no-agent-forwarding ", True),
])
def test_authorized_keys_no_agent_forwarding(options: str, forbidden: bool) -> None:
    key = authkeys.parse_line(f"{options}ssh-ed25519 {ED25519} someone")
    assert key is not None and key.options.no_agent_forwarding is forbidden
    assert key.options.unenforceable is None  # the key still logs in
    restricted = authkeys.parse_line(f"restrict ssh-ed25519 {ED25519}")
    assert restricted is not None and restricted.options.no_agent_forwarding


ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIGhr4kvHHZ1DfQ0QAfJ/eT8FCaNsjRcSW3PswdMpxUZi"
