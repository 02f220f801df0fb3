"""Agent forwarding (``ssh -A``) end to end: real ``ssh-agent``, ``ssh-add``, ``ssh-keygen``.

``python -m kuberun_trio`` runs against an embedded cluster subprocess (as in
``test_e2e_openssh``); the pods are processes on this host, so "the image" is this host's
file system, seen through the container's ``PATH``. A pod template whose ``PATH`` holds
only a few chosen programs (symlinks in a temporary directory) makes an image without
socat, or without socat and python3 -- no mock.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_e2e_openssh as e2e
import trio
import trio_asyncio
import yaml
from gatewaykit import open_rig
from test_e2e_openssh import (
    ENV,
    Cluster,
    GatewayProcess,
    Keys,
    first_line,
    start_gateway,
    stop_process,
    wait_for,
)

from kuberun_trio.core.forwarding import AgentOptions
from kuberun_trio.gateway.agent import CONNECT_WAIT, TOOLS_MISSING

pytestmark = [e2e.pytestmark, pytest.mark.needs("ssh-agent", "ssh-add", "socat", "python3")]
cluster = e2e.cluster
keys = e2e.keys

ENABLED = {"security": {"forwarding": {"agentForwardingMode": "enable"}}}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real ssh-agent (private socket directory) holding one fresh key; yields the
    client environment (``SSH_AUTH_SOCK``) plus ``pub``: the key's public line."""
    folder = Path(tempfile.mkdtemp(prefix="kr-agent-", dir="/tmp"))
    sock = folder / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for(sock.exists, 10, "ssh-agent's socket")
        key = tmp_path_factory.mktemp("agentkey") / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key",
                        "-f", str(key)], check=True, env=ENV)
        env = {**ENV, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env=env, capture_output=True)
        yield {**env, "pub": Path(f"{key}.pub").read_text().strip()}
    finally:
        stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def client_env(agent: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in agent.items() if k != "pub"}


def image_path(folder: Path, *programs: str) -> str:
    """A ``PATH`` of one directory holding only ``programs`` (symlinks to this host's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in programs:
        found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        assert found, name
        (folder / name).symlink_to(found)
    return str(folder)


def pod_with_path(path: str) -> dict[str, Any]:
    return {"kubernetes": {"pod": {"spec": {"containers": [{
        "name": "shell", "image": "busybox", "env": [{"name": "PATH", "value": path}],
        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"],
    }]}}}}


@contextlib.contextmanager
def gateway_with(cluster: Cluster, keys: Keys, folder: Path, instance: str,
                 *configs: dict[str, Any], extra: tuple[str, ...] = ()) -> Iterator[GatewayProcess]:
    config: dict[str, Any] = {}
    for part in configs:
        for section, value in part.items():
            config[section] = {**config.get(section, {}), **value}
    path = folder / f"{instance}.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(cluster, keys, folder, instance, "--config", str(path), *extra)
    try:
        yield gateway
    finally:
        stop_process(gateway.proc)
        cluster.kube.wait_no_pods(instance, timeout=30)


def host_processes(text: str) -> list[str]:
    """Command lines of this host's processes that mention ``text`` (pods run here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline:
                    found.append(cmdline)
    return found


def fingerprint(pub: str) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=pub.encode(), check=True,
                         capture_output=True, env=ENV).stdout.decode()
    return out.split()[1]


SIGN = """\
set -e
d=$(mktemp -d)
printf '%s\\n' "$1" >"$d/key.pub"
printf 'signed through the forwarded agent\\n' >"$d/message"
ssh-keygen -q -Y sign -f "$d/key.pub" -n file "$d/message" </dev/null
cat "$d/message.sig"
rm -r "$d"
"""


def test_ssh_add_and_sign_through_socat(cluster: Cluster, keys: Keys, tmp_path: Path,
                                        agent: dict[str, str]) -> None:
    env = client_env(agent)
    restricted = tmp_path / "restricted_keys"  # another key, with no-agent-forwarding
    restricted.write_text(f"no-agent-forwarding {Path(f'{keys.stranger}.pub').read_text()}")
    with gateway_with(cluster, keys, tmp_path, "agent-socat", ENABLED,
                      extra=("--authorized-keys", str(restricted))) as gw:
        listing = gw.run('d=${SSH_AUTH_SOCK%/*}; echo "$SSH_AUTH_SOCK"; stat -c %a "$d" '
                         '"$SSH_AUTH_SOCK"; ssh-add -l', "-A", env=env)
        assert listing.returncode == 0, listing.stderr
        sock, dir_mode, sock_mode, *keys_listed = listing.stdout.decode().splitlines()
        assert re.fullmatch(r"/tmp/kuberun-agent-[0-9a-f]{24}/agent", sock)
        assert (dir_mode, sock_mode) == ("700", "600")
        assert len(keys_listed) == 1 and fingerprint(agent["pub"]) in keys_listed[0]
        assert "forwarded-key" in keys_listed[0]

        # several agent connections at once, each on its own stream
        many = gw.run("for i in 1 2 3 4 5 6; do ssh-add -l >/tmp/kr-$$-$i & done; wait; "
                      "cat /tmp/kr-$$-*; rm -f /tmp/kr-$$-*", "-A", env=env)
        assert many.returncode == 0, many.stderr
        assert many.stdout.decode().count("forwarded-key") == 6, many.stdout

        signed = gw.run(f"sh -c {shlex.quote(SIGN)} sign {shlex.quote(agent['pub'])}", "-A",
                        env=env)
        assert signed.returncode == 0, signed.stderr
        signature = tmp_path / "message.sig"
        signature.write_bytes(signed.stdout)
        allowed = tmp_path / "allowed_signers"
        allowed.write_text(f"alice@example {agent['pub']}\n")
        verify = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "alice@example",
             "-n", "file", "-s", str(signature)],
            input=b"signed through the forwarded agent\n", capture_output=True, env=ENV)
        assert verify.returncode == 0, verify.stderr + verify.stdout
        tampered = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "alice@example",
             "-n", "file", "-s", str(signature)], input=b"something else\n",
            capture_output=True, env=ENV)
        assert tampered.returncode != 0
        assert "agent forwarding: relay (socat) listening" in gw.log()

        no_agent = subprocess.run(gw.ssh('echo "${SSH_AUTH_SOCK-no agent}"', "-A",
                                         key=keys.stranger), capture_output=True, env=env,
                                  timeout=30)
        assert (no_agent.returncode, no_agent.stdout) == (0, b"no agent\n"), no_agent.stderr
        wait_for(lambda: "not permitted for this key (no-agent-forwarding)" in gw.log(), 5,
                 "the refusal in the log")


def test_relay_is_gone_after_disconnect(cluster: Cluster, keys: Keys, tmp_path: Path,
                                        agent: dict[str, str]) -> None:
    env = client_env(agent)
    with gateway_with(cluster, keys, tmp_path, "agent-gone", ENABLED) as gw:
        client = subprocess.Popen(gw.ssh('echo "$SSH_AUTH_SOCK"; ssh-add -l >/dev/null && '
                                         'echo listed; sleep 60', "-A"),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        try:
            sock = first_line(client)
            assert first_line(client) == "listed"
            token = sock.split("/")[2]
            assert host_processes(token), "the relay should run while the session lasts"
        finally:
            stop_process(client)
        wait_for(lambda: not host_processes(token), 15, "the relay's processes to end")


HOLD = """\
f=/tmp/kr-hold-$$
(python3 -c 'import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["SSH_AUTH_SOCK"])
open(sys.argv[1], "w").close()
time.sleep(1)' "$f"; echo held-done) &
while [ ! -e "$f" ]; do sleep 0.05; done
ssh-add -l >/dev/null && echo listed
wait
rm -f "$f"
"""
"""One agent connection held open for 1 s; ``ssh-add -l`` asks once it is connected."""


@pytest.mark.parametrize("tool", ["socat", "python3"])
def test_agent_connections_over_the_limit_wait(cluster: Cluster, keys: Keys, tmp_path: Path,
                                               agent: dict[str, str], tool: str) -> None:
    """``maxAgentConnections: 1``: a second agent client waits for the first; with the
    python3 relay (an image without socat) as with socat."""
    limit = {"security": {"forwarding": {"agentForwardingMode": "enable",
                                         "maxAgentConnections": 1}}}
    programs = ["sleep", "rm", "mkdir", "ssh-add", "python3"] + (["socat"] if tool == "socat"
                                                                 else [])
    path = image_path(tmp_path / "bin", *programs)
    with gateway_with(cluster, keys, tmp_path, f"agent-limit-{tool}", limit,
                      pod_with_path(path)) as gw:
        result = gw.run(HOLD, "-A", env=client_env(agent))
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"held-done\nlisted\n", (result.stderr, gw.log())
        assert f"({tool})" in gw.log()
        # three at once all get through, one after the other
        result = gw.run("for i in 1 2 3; do ssh-add -l & done; wait", "-A",
                        env=client_env(agent))
        assert result.stdout.decode().count("forwarded-key") == 3, (result.stderr, gw.log())


def test_no_relay_tool_in_the_image(cluster: Cluster, keys: Keys, tmp_path: Path,
                                    agent: dict[str, str]) -> None:
    path = image_path(tmp_path / "bin", "sleep", "rm")
    with gateway_with(cluster, keys, tmp_path, "agent-none", ENABLED, pod_with_path(path)) as gw:
        result = gw.run('echo "session goes on: ${SSH_AUTH_SOCK-no agent}"', "-A",
                        env=client_env(agent))
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"session goes on: no agent\n"
        assert result.stderr == f"kuberun: {TOOLS_MISSING}\n".encode()
        assert "agent-forwarding-failed" in gw.log()


def test_disabled_refuses_and_logs(cluster: Cluster, keys: Keys, tmp_path: Path,
                                   agent: dict[str, str]) -> None:
    disabled = {"security": {"forwarding": {"agentForwardingMode": "disable"}}}
    with gateway_with(cluster, keys, tmp_path, "agent-off", disabled) as gw:
        result = gw.run('echo "${SSH_AUTH_SOCK-no agent}"', "-A", env=client_env(agent))
        assert (result.returncode, result.stdout) == (0, b"no agent\n"), result.stderr
        wait_for(lambda: re.search(r"agent-forwarding request refused", gw.log()), 5,
                 "the refusal in the log")


async def test_agent_streams_close_before_the_pod_delete(tmp_path: Path,
                                                         agent: dict[str, str]) -> None:
    """The relay's exec and an agent connection's exec, both open at disconnect, are
    closed before the DELETE (read from the embedded cluster's request log)."""
    async with open_rig(tmp_path, options={"agent": AgentOptions(enabled=True)}) as rig:
        conn = await rig.connect(agent_path=agent["SSH_AUTH_SOCK"], agent_forwarding=True)

        async def hold() -> object:  # an agent connection kept open by the pod side
            return await conn.create_process(
                'sleep 30 | socat - UNIX-CONNECT:"$SSH_AUTH_SOCK"')

        await trio_asyncio.aio_as_trio(hold)()
        pod = rig.pods()[0]["metadata"]["name"]
        with trio.fail_after(15):  # the session, the relay, the agent connection
            while sum(e.kind == "exec-open"
                      for e in rig.cluster.request_log.for_pod("default", pod)) < 3:
                await trio.sleep(0.02)
        conn.close()
        with trio.fail_after(15):
            while rig.pods():
                await trio.sleep(0.05)
        entries = rig.cluster.request_log.for_pod("default", pod)
        text = "\n".join(f"{e.seq} {e.kind} {e.method} {e.path.rsplit('/', 1)[-1][:60]} "
                         f"received={e.received:.4f} time={e.time:.4f}" for e in entries)
        opens = [e for e in entries if e.kind == "exec-open"]
        closes = [e for e in entries if e.kind == "exec-close"]
        deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
        assert len(opens) == len(closes) == 3 and len(deletes) == 1, text
        assert max(e.time for e in closes) < deletes[0].received, text


KILL_RELAY = """\
d=${SSH_AUTH_SOCK%/*}
for p in /proc/[0-9]*; do
  case "$(tr '\\0' ' ' <"$p/cmdline" 2>/dev/null)" in *"$d"*) kill -9 "${p#/proc/}" ;; esac
done
echo killed
"""


async def test_a_relay_killed_in_the_pod_is_reported(tmp_path: Path,
                                                     agent: dict[str, str]) -> None:
    """Later sessions of the connection hear that the relay is gone (and get no socket)."""
    async with open_rig(tmp_path, options={"agent": AgentOptions(enabled=True)}) as rig:
        conn = await rig.connect(agent_path=agent["SSH_AUTH_SOCK"], agent_forwarding=True)

        async def run(command: str) -> Any:
            return await conn.run(command)

        first = await trio_asyncio.aio_as_trio(run)(KILL_RELAY)
        assert first.stdout == "killed\n", first.stderr
        (runtime,) = rig.gateway.connections.values()
        with trio.fail_after(10):
            while runtime.agent is None or runtime.agent.problem is None:
                await trio.sleep(0.02)
        second = await trio_asyncio.aio_as_trio(run)('echo "${SSH_AUTH_SOCK-no agent}"')
        assert (second.stdout, second.stderr) == (
            "no agent\n", "kuberun: the agent relay in the pod has ended\n")
        conn.close()


async def test_an_agent_the_client_lost_fails_in_the_pod_at_once(tmp_path: Path) -> None:
    """The client asked for forwarding but cannot reach its agent any more: it refuses
    the channel, and the agent client in the pod is told at once (not after the relay's
    wait for a stream that never comes)."""
    async with open_rig(tmp_path, options={"agent": AgentOptions(enabled=True)}) as rig:
        conn = await rig.connect(agent_path=str(tmp_path / "no-agent-here"),
                                 agent_forwarding=True)

        async def run(command: str) -> Any:
            return await conn.run(command)

        with trio.fail_after(CONNECT_WAIT - 3):
            result = await trio_asyncio.aio_as_trio(run)("ssh-add -l; echo status $?")
        assert result.stdout.endswith("status 1\n"), (result.stdout, result.stderr)
        assert "communication with agent failed" in result.stderr
        conn.close()
