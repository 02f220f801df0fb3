"""The audit trail (issue 10 §5): a log nobody can forge, and what clients are told.

The gateway runs as an operator runs it (``python -m kuberun_trio``, its log on stderr
into a file) against an embedded cluster; the clients are the real OpenSSH ``ssh`` and
asyncssh (for what OpenSSH will not send: control characters in usernames and env
names). Every test reads the gateway's own log output.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import attrs
import pytest
import trio
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.sshserver import lost_reason
from kuberun_trio.cluster import EmbeddedCluster, open_embedded_cluster
from kuberun_trio.core.audit import AuditPolicy
from kuberun_trio.errors import ExecError, KubernetesError, PodStartError, client_message
from kuberun_trio.server.config import parse_server_config
from kuberun_trio.server.keys import ensure_private_key, public_key_line
from kuberun_trio.server.logs import configure_logging

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH")

FORGED = ("2031-01-01T00:00:00.000Z INFO kuberun_trio.auth: auth allow: user 'root' from "
          "10.6.6.6:1 by password: ok event=auth connection_id=forged result=allow")
"""A complete-looking log line an attacker would like to see in the audit log."""
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
          "\u2029", "\x1b[2K\r", "\x1b[1A\x1b[2K", "\x7f", "\x9b2K", "\u202e"]
"""Everything a terminal, ``str.splitlines`` or a log shipper may take for a line break
(or use to hide one): C0, DEL, C1, ESC sequences, Unicode separators, a bidi override."""
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) "
                  r"[\w.]+: ")
TOKEN = re.compile(r'(?:[^\s"=]+=)?"(?:[^"\\]|\\.)*"|\S+')
"""A logfmt-ish tokenizer: ``key="quoted value"``, ``"quoted"`` or a bare word."""


# == unit level: the formatters and the command policy =======================================

@pytest.fixture
def restore_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def assert_unforgeable(text: str) -> list[str]:
    """Every line of a text log is one whole record; returns the lines."""
    lines = text.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert text.splitlines() == lines  # no line break by any of Python's definitions
    odd = {c for c in text if c != "\n" and (unicodedata.category(c) in ("Cc", "Zl", "Zp")
                                             or "\u202a" <= c <= "\u202e")}
    assert not odd, odd
    for line in lines:
        assert LINE.match(line), line
        assert not line.startswith("2031-"), line
        bare = [t for t in TOKEN.findall(line) if '"' not in t]
        assert "connection_id=forged" not in bare, line
        assert "result=allow" not in bare or "event=auth" in bare, line
    return lines


def test_text_format_escapes_every_line_break(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", out)
    log = logging.getLogger("kuberun_trio.test")
    for brk in BREAKS:
        log.info("session started: %s", "true #" + brk + FORGED,
                 extra={"event": "session-start", "connection_id": "c1",
                        "command": "true #" + brk + FORGED, "username": "eve" + brk + FORGED})
    log.info('a "quote that would swallow the fields', extra={"event": "x"})
    lines = assert_unforgeable(out.getvalue())
    assert len(lines) == len(BREAKS) + 1
    assert lines[-1].endswith(r'"a \"quote that would swallow the fields" event=x')
    # the escapes are JSON escapes: a quoted value reads back exactly
    value = re.search(r' command=("(?:[^"\\]|\\.)*")', lines[1])
    assert value is not None and json.loads(value[1]) == "true #\r" + FORGED


def test_json_format_is_lossless_and_one_line_per_record(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", out)
    log = logging.getLogger("kuberun_trio.test")
    for brk in BREAKS:
        log.info("%s", brk, extra={"event": "e", "command": "x" + brk + FORGED})
    log.info("%s", "\udc80", extra={"event": "e", "path": "/tmp/\udcff"})  # surrogateescape
    text = out.getvalue()
    text.encode("utf-8")  # nothing a UTF-8 stream cannot write
    assert len(text.splitlines()) == len(BREAKS) + 1
    for brk, line in zip([*BREAKS, "\udc80"], text.splitlines(), strict=True):
        doc = json.loads(line)
        assert doc["message"] == brk
        assert doc.get("command", "x" + brk + FORGED) == "x" + brk + FORGED
    assert doc["path"] == "/tmp/\udcff"


def test_command_policy_cuts_at_a_character_boundary() -> None:
    policy = AuditPolicy(max_command_bytes=10)
    assert policy.command_fields("short") == {"command": "short"}
    assert policy.command_fields("ä" * 6) == {  # 12 bytes: 5 whole characters fit
        "command": "ä" * 5, "command_truncated": True, "command_bytes": 12}
    assert AuditPolicy(commands=False).command_fields("secret") == {}
    assert AuditPolicy().max_command_bytes == 1024


def test_log_keys_are_checked() -> None:
    config = parse_server_config({"log": {"commands": False, "maxCommandBytes": 64}})
    assert config.log.audit == AuditPolicy(commands=False, max_command_bytes=64)
    assert parse_server_config({}).log.audit == AuditPolicy()
    with pytest.raises(Exception, match=r"log\.maxCommandBytes: must be 1\.\.65536, got 0"):
        parse_server_config({"log": {"maxCommandBytes": 0}})
    with pytest.raises(Exception, match=r"log\.commands: expected a boolean"):
        parse_server_config({"log": {"commands": "no"}})


def test_client_messages_hold_no_internal_detail() -> None:
    unreachable = KubernetesError(0, "ClientConnectorError", "Cannot connect to host "
                                  "10.96.0.1:443 ssl:default [Connection refused]")
    assert client_message(unreachable) == "the Kubernetes API is unreachable"
    assert client_message(KubernetesError(403, "Forbidden", "pods is forbidden: User "
                                          "system:serviceaccount:gw:gw cannot create")) == (
        "the gateway is not allowed to do this in the cluster (HTTP 403 Forbidden)")
    assert client_message(KubernetesError(500, "https://10.96.0.1/x", "boom")) == (
        "the Kubernetes API failed (HTTP 500)")
    wrapped = ExecError(str(unreachable))
    wrapped.__cause__ = unreachable
    assert client_message(wrapped) == "the Kubernetes API is unreachable"
    assert client_message(ExecError("exec handshake refused with HTTP 403")) == (
        "exec handshake refused with HTTP 403")
    assert client_message(ExecError("ws://10.0.0.1:10250/exec broke")) == (
        "the exec stream could not be opened")
    assert client_message(PodStartError("p", "ErrImagePull", "not found")) == (
        "ErrImagePull: not found")
    assert client_message(RuntimeError("https://10.96.0.1/api")) == (
        "internal error in the gateway")


def test_lost_reasons() -> None:
    assert lost_reason(None) == "client disconnected"
    assert lost_reason(asyncssh.ConnectionLost("Connection lost")) == "client disconnected"
    assert lost_reason(asyncssh.ConnectionLost("Login timeout expired")) == (
        "login grace time exceeded")
    assert lost_reason(asyncssh.PermissionDenied("Too many auth failures")) == (
        "disconnected: Too many auth failures")
    assert lost_reason(asyncssh.ConnectionLost("Client not responding to keepalive")) == (
        "client not responding to keepalive")
    assert lost_reason(ConnectionResetError()) == "connection lost: ConnectionResetError"
    assert lost_reason(KeyError("name")) == "internal error in the gateway: KeyError"


# == the gateway process ======================================================================

@attrs.frozen
class Keys:
    host: Path
    client: Path
    stranger: Path
    authorized: Path


def make_keys(tmp_path: Path) -> Keys:
    tmp_path.mkdir(parents=True, exist_ok=True)
    host, client, stranger = (tmp_path / name for name in ("host_key", "client_key", "stranger"))
    client_key = [ensure_private_key(path)[0] for path in (host, client, stranger)][1]
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(public_key_line(client_key) + "\n")
    return Keys(host, client, stranger, authorized)


@attrs.define
class Gateway:
    proc: trio.Process
    port: int
    log_path: Path
    keys: Keys

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def events(self, connection_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("connection_id") == connection_id]

    def ssh_argv(self, *options: str, key: Path | None = None) -> list[str]:
        # ssh takes the first value of each keyword: ``options`` override the defaults
        return ["ssh", *options, "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-p", str(self.port),
                "-i", str(key or self.keys.client), "alice@127.0.0.1"]

    async def ssh(self, command: str | None, *options: str, key: Path | None = None,
                  stdin: bytes = b"", env: dict[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[bytes]:
        argv = self.ssh_argv(*options, key=key) + ([command] if command is not None else [])
        with trio.fail_after(60):
            result: subprocess.CompletedProcess[bytes] = await trio.run_process(
                argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
                env=env or clean_env())
        return result

    async def asyncssh(self, username: str) -> asyncssh.SSHClientConnection:
        key = asyncssh.import_private_key(self.keys.client.read_bytes())

        async def go() -> asyncssh.SSHClientConnection:
            return await asyncssh.connect("127.0.0.1", self.port, username=username,
                                          client_keys=[key], known_hosts=None)

        conn: asyncssh.SSHClientConnection = await trio_asyncio.aio_as_trio(go)()
        return conn

    async def wait_for(self, what: str, predicate: Any, seconds: float = 20) -> Any:
        with trio.fail_after(seconds):
            while not (found := predicate()):
                await trio.sleep(0.05)
        return found

    async def end_of(self, connection_id: str) -> dict[str, Any]:
        """The connection's end record, once it is written."""
        def end() -> dict[str, Any] | None:
            ends = [r for r in self.events(connection_id)
                    if r.get("event") in ("connection-end", "pre-auth-end")]
            return ends[0] if ends else None
        found: dict[str, Any] = await self.wait_for(f"the end of {connection_id}", end)
        return found


def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")},
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, kubeconfig: Path, *, log_format: str = "json",
                  config: str = "") -> AsyncIterator[Gateway]:
    keys = make_keys(tmp_path)
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(config or "{}\n")
    log_path = tmp_path / f"gateway-{trio.current_time()}.log"
    with log_path.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kuberun_trio", "--config", str(config_path),
             "--kubeconfig", str(kubeconfig), "--instance", f"audit-{tmp_path.name}"[-50:],
             "--listen", "127.0.0.1:0", "--host-key", str(keys.host),
             "--authorized-keys", str(keys.authorized), "--log-format", log_format,
             "--state-dir", str(tmp_path / "state")],
            stdout=subprocess.PIPE, stderr=err, env=clean_env())
    assert proc.stdout is not None
    try:
        out = b""
        with trio.fail_after(60):
            while b"host key" not in out:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"the gateway exited: {log_path.read_text()}"
                out += chunk
        port = int(out.split(b" listening on ")[1].split()[0].rsplit(b":", 1)[1])
        yield Gateway(proc, port, log_path, keys)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def connection_ids(gw: Gateway, event: str, **match: Any) -> list[str]:
    return [r["connection_id"] for r in gw.records()
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())]


# == a log nobody can forge ===================================================================

async def test_client_input_cannot_forge_a_text_log_line(cluster: EmbeddedCluster,
                                                         tmp_path: Path) -> None:
    """Commands (OpenSSH), a username, env names and commands (asyncssh) holding every
    kind of line break end up escaped: each line of the log is exactly one record."""
    async with open_aio_loop(), gateway(tmp_path, cluster.kubeconfig_path, log_format="text",
                                        config="log: {maxCommandBytes: 65536}\n") as gw:
        command = "exit 0 #" + "".join(brk + FORGED for brk in BREAKS)
        result = await gw.ssh(command)
        assert result.returncode == 0, result.stderr
        # asyncssh (client and server) refuses control characters in usernames (SASLprep);
        # a client that does not is cut off before login -- and that is logged, too
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncssh.connection, "saslprep", lambda text: text)
            with pytest.raises((asyncssh.Error, OSError)):
                await gw.asyncssh("eve" + "".join(brk + FORGED for brk in BREAKS))
        # what a username may hold: quotes, '=', spaces -- fake fields in the message
        conn = await gw.asyncssh('eve" event=auth connection_id=forged result=allow x="')
        try:
            env = {f"BAD{i}{brk}{FORGED}": "1" for i, brk in enumerate(BREAKS)}

            async def run() -> Any:
                return await conn.run(command, env=env, check=False)

            completed = await trio_asyncio.aio_as_trio(run)()
            assert completed.exit_status == 0, completed.stderr
        finally:
            conn.close()
        await gw.wait_for("every connection's end", lambda: gw.log().count(
            "event=connection-end") == 2 and "event=pre-auth-end" in gw.log())
    text = gw.log()
    lines = assert_unforgeable(text)
    started = [line for line in lines if "event=session-start" in line]
    assert len(started) == 2
    for line in started:  # the command is there, escaped, and reads back exactly
        value = re.search(r' command=("(?:[^"\\]|\\.)*")', line)
        assert value is not None and json.loads(value[1]) == command
    refused = [line for line in lines if "event=request-refused" in line and "request=env" in line]
    assert len(refused) == len(BREAKS)


async def test_commands_are_cut_or_left_out(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    long = "echo " + "ä" * 40  # 85 bytes
    async with gateway(tmp_path / "cut", cluster.kubeconfig_path,
                       config="log: {maxCommandBytes: 16}\n") as gw:
        result = await gw.ssh(long)
        assert result.stdout == ("ä" * 40 + "\n").encode(), result.stderr
        (start,) = await gw.wait_for("session-start", lambda: [
            r for r in gw.records() if r.get("event") == "session-start"])
        assert (start["command"], start["command_truncated"], start["command_bytes"]) == (
            "echo " + "ä" * 5, True, 85)
        refused = await gw.ssh("echo " + "x" * 70_000)  # over the session's 64 KiB limit
        assert refused.returncode != 0
        (too_long,) = await gw.wait_for("the refusal", lambda: [
            r for r in gw.records() if r.get("event") == "request-refused"])
        assert too_long["reason"] == "command is 70005 bytes, over the limit of 65536"
        assert (len(too_long["command"]), too_long["command_bytes"]) == (16, 70005)
        assert max(len(line) for line in gw.log().splitlines()) < 2000
    async with gateway(tmp_path / "off", cluster.kubeconfig_path,
                       config="log: {commands: false}\n") as gw:
        result = await gw.ssh("echo secret-token-4711")
        assert result.stdout == b"secret-token-4711\n", result.stderr
        await gw.wait_for("the connection's end",
                          lambda: connection_ids(gw, "connection-end"))
        assert "secret-token-4711" not in gw.log()
        (start,) = [r for r in gw.records() if r.get("event") == "session-start"]
        assert start["kind"] == "exec" and "command" not in start


# == the events ===============================================================================

async def test_every_connection_is_accounted_for(cluster: EmbeddedCluster,
                                                 tmp_path: Path) -> None:
    async with gateway(tmp_path, cluster.kubeconfig_path) as gw:
        # a scanner: TCP connect, read the banner, leave
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as probe:
            assert probe.recv(64).startswith(b"SSH-2.0-")
        # a stranger's key: refused
        denied = await gw.ssh("true", key=gw.keys.stranger)
        assert denied.returncode == 255 and b"Permission denied" in denied.stderr
        # a session with known traffic each way
        moved = await gw.ssh("cat >/dev/null; head -c 3000 /dev/zero; printf 12345 >&2",
                             stdin=b"x" * 1234)
        assert (moved.returncode, len(moved.stdout), moved.stderr) == (0, 3000, b"12345")
        await gw.wait_for("three connections ended", lambda: len(
            connection_ids(gw, "pre-auth-end") + connection_ids(gw, "connection-end")) == 3)
        records = gw.records()
        accepted = connection_ids(gw, "connection-accepted")
        assert len(accepted) == 3
        for record in records:
            if record.get("connection_id") is not None:
                assert re.fullmatch(r"127\.0\.0\.1:\d+", record["remote_address"]), record
        probe_id, stranger_id, session_id = accepted
        probe_end = await gw.end_of(probe_id)
        assert (probe_end["event"], probe_end["reason"]) == ("pre-auth-end",
                                                             "client disconnected")
        stranger_end = await gw.end_of(stranger_id)
        assert (stranger_end["event"], stranger_end["username"]) == ("pre-auth-end", "alice")
        assert [r["result"] for r in gw.events(stranger_id) if r.get("event") == "auth"] == ["deny"]
        end = await gw.end_of(session_id)
        assert end["event"] == "connection-end"
        assert (end["reason"], end["bytes_from_client"], end["bytes_to_client"]) == (
            "client disconnected", 1234, 3005)
        assert isinstance(end["duration_ms"], int) and end["username"] == "alice"
        events = [r.get("event") for r in gw.events(session_id)]
        assert events[0] == "connection-accepted" and events[-1] == "connection-end"
        assert "auth" in events and "session-start" in events


async def test_refused_requests_are_logged_with_a_reason(cluster: EmbeddedCluster,
                                                         tmp_path: Path) -> None:
    async with gateway(tmp_path, cluster.kubeconfig_path) as gw:
        stdio = await gw.ssh(None, "-o", "LogLevel=INFO", "-W", "127.0.0.1:22")
        assert stdio.returncode == 255
        assert b"administratively prohibited: forwarding is disabled" in stdio.stderr, (
            stdio.stderr)
        remote = await gw.ssh("true", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22")
        assert remote.returncode == 255 and b"remote port forwarding failed" in remote.stderr
        x11 = await gw.ssh("true", "-X", env={**clean_env(), "DISPLAY": ":99"})
        assert b"X11 forwarding request failed" in x11.stderr
        subsystem = await gw.ssh("no-such-subsystem", "-s")
        assert subsystem.returncode == 255 and b"subsystem request failed" in subsystem.stderr
        env = await gw.ssh("true", "-o", "SetEnv=PPID=1")
        assert env.returncode == 0, env.stderr
        agent = await agent_forwarding_attempt(gw)
        assert agent.stdout == b"agent=\n", agent.stderr
        expected = [
            ("port-forwarding", "direct-tcpip", "forwarding is disabled on this gateway"),
            ("port-forwarding", "tcpip-forward", "remote forwarding (ssh -R) is not supported: "
             "Kubernetes has no reverse port-forward into a pod"),
            ("x11-forwarding", None, "forwarding is disabled on this gateway"),
            ("subsystem", None, "unknown subsystem"),
            ("env", None, "variable may not be set"),
            ("agent-forwarding", None, "forwarding is disabled on this gateway"),
        ]
        refused = await gw.wait_for("six refusals", lambda: len(
            r := [r for r in gw.records() if r.get("event") == "request-refused"]) == 6 and r)
        assert [(r["request"], r.get("kind"), r["reason"]) for r in refused] == expected
        assert refused[0]["destination"] == "127.0.0.1:22"
        assert refused[3]["subsystem"] == "no-such-subsystem"
        assert refused[4]["env_name"] == "PPID"
        accepted = connection_ids(gw, "connection-accepted")
        assert [r["connection_id"] for r in refused] == accepted
        assert all(r["remote_address"].startswith("127.0.0.1:") for r in refused)


async def agent_forwarding_attempt(gw: Gateway) -> subprocess.CompletedProcess[bytes]:
    """``ssh -A`` with a running ssh-agent (the client asks only when it has an agent)."""
    folder = tempfile.mkdtemp(prefix="kr-", dir="/tmp")  # short: a unix socket goes here
    agent = await trio.run_process(["ssh-agent", "-s"], capture_stdout=True, check=True,
                                   env={"TMPDIR": folder, "PATH": "/usr/bin:/bin"})
    found = dict(re.findall(r"(SSH_AUTH_SOCK|SSH_AGENT_PID)=([^;]+);", agent.stdout.decode()))
    try:
        return await gw.ssh('echo "agent=$SSH_AUTH_SOCK"', "-A",
                            env={**clean_env(), "SSH_AUTH_SOCK": found["SSH_AUTH_SOCK"]})
    finally:
        await trio.run_process(["kill", found["SSH_AGENT_PID"]], check=False)
        shutil.rmtree(folder, ignore_errors=True)


# == what clients are told ====================================================================

async def test_clients_never_see_the_api_server_or_library_errors(tmp_path: Path) -> None:
    """The cluster goes away under a live connection: a new session and a new connection
    both fail with a short reason; the API address and aiohttp's text are only logged."""
    stop = trio.Event()

    async def run_cluster(*, task_status: trio.TaskStatus[EmbeddedCluster]) -> None:
        async with open_embedded_cluster(https=True, kubeconfig_path=tmp_path / "kubeconfig",
                                         backoff_base=0.2) as cluster:
            task_status.started(cluster)
            await stop.wait()

    config = "kubernetes: {timeouts: {podStop: 2s, http: 3s}}\n"
    async with open_aio_loop(), trio.open_nursery() as nursery:
        cluster: EmbeddedCluster = await nursery.start(run_cluster)
        api = cluster.url.split("//", 1)[1].rstrip("/")
        async with gateway(tmp_path, cluster.kubeconfig_path, config=config) as gw:
            conn = await gw.asyncssh("alice")

            async def run(command: str) -> Any:
                return await conn.run(command, check=False)

            try:
                first = await trio_asyncio.aio_as_trio(run)("echo up")
                assert first.stdout == "up\n", first.stderr
                stop.set()
                with trio.fail_after(20):
                    while _listening(api):
                        await trio.sleep(0.05)
                second = await trio_asyncio.aio_as_trio(run)("echo again")
            finally:
                conn.close()
            fresh = await gw.ssh("echo hello")
            told = [second.stderr, fresh.stderr.decode()]
            assert second.exit_status == 255 and fresh.returncode == 255
            assert re.fullmatch(r"kuberun: cannot start the command in pod kuberun-\w+: the "
                                r"Kubernetes API is unreachable\n", second.stderr), second.stderr
            assert re.search(r"kuberun: cannot start your pod: the Kubernetes API is "
                             r"unreachable \(connection [0-9a-f]{16}\)", told[1]), told[1]
            for text in told:
                for leak in (api, api.split(":")[1], "Cannot connect", "ClientConnector",
                             "https://", "aiohttp", "ssl"):
                    assert leak not in text, (leak, text)
            detail = " ".join(json.dumps(r) for r in gw.records()
                              if r.get("event") in ("exec-failed", "connection-error"))
            assert "Cannot connect to host" in detail and api in detail


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False



async def test_login_grace_time_ends_before_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A client that never logs in is cut off by the login grace timer: ``pre-auth-end``
    says so (embedding API; the timer is 1 s here instead of the default)."""
    from gatewaykit import open_rig

    from kuberun_trio.core.limits import Limits

    caplog.set_level(logging.INFO, logger="kuberun_trio")
    async with open_rig(tmp_path, limits=Limits(login_grace_time=1.0)) as rig:
        with trio.fail_after(20):
            stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
            async with stream:
                assert (await stream.receive_some(64)).startswith(b"SSH-2.0-")
                await stream.send_all(b"SSH-2.0-silent\r\n")
                while await stream.receive_some(65536):  # until the gateway hangs up
                    pass
            while not [r for r in caplog.records if getattr(r, "event", "") == "pre-auth-end"]:
                await trio.sleep(0.05)
    (end,) = [r for r in caplog.records if getattr(r, "event", "") == "pre-auth-end"]
    (accepted,) = [r for r in caplog.records
                   if getattr(r, "event", "") == "connection-accepted"]
    assert end.reason == "login grace time exceeded"  # type: ignore[attr-defined]
    assert end.connection_id == accepted.connection_id  # type: ignore[attr-defined]
    # the login timer runs on the loop's clock, the duration on time.monotonic: a few ms apart
    assert 900 <= end.duration_ms < 10_000, end.duration_ms  # type: ignore[attr-defined]


async def test_a_cut_stream_is_told_briefly_and_logged(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """An exec stream that ends without a status (fault: cut after 5 bytes)."""
    from gatewaykit import open_rig

    caplog.set_level(logging.INFO, logger="kuberun_trio")
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def run() -> Any:
            return await conn.run("head -c 100000 /dev/zero", check=False, encoding=None)

        try:
            rig.cluster.faults.cut_exec(after_bytes=5)
            result = await trio_asyncio.aio_as_trio(run)()
        finally:
            conn.close()
    assert result.exit_status == 255
    assert re.fullmatch(rb"kuberun: the command's stream ended without an exit status"
                        rb"( \([A-Za-z]+\))?\n", result.stderr), result.stderr
    (ended,) = [r for r in caplog.records if getattr(r, "event", "") == "exec-ended"]
    assert ended.pod.startswith("kuberun-")  # type: ignore[attr-defined]


async def test_a_request_flood_is_counted_not_logged(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """300 refused env requests cost 20 log lines and one warning, and the total is kept."""
    from gatewaykit import open_rig

    from kuberun_trio.core.audit import REFUSALS_LOGGED

    caplog.set_level(logging.INFO, logger="kuberun_trio")
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def run() -> Any:
            return await conn.run("true", env={f"1BAD{i}": "x" for i in range(300)},
                                  check=False)

        try:
            assert (await trio_asyncio.aio_as_trio(run)()).exit_status == 0
        finally:
            conn.close()
        with trio.fail_after(20):
            while not [r for r in caplog.records
                       if getattr(r, "event", "") == "connection-end"]:
                await trio.sleep(0.05)
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("request-refused") == REFUSALS_LOGGED == 20
    assert events.count("request-refused-suppressed") == 1
    (end,) = [r for r in caplog.records if getattr(r, "event", "") == "connection-end"]
    assert end.requests_refused == 300  # type: ignore[attr-defined]


async def test_a_bug_in_a_callback_shows_in_the_audit_trail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """asyncssh drops a connection whose callback raised and logs that at debug level
    only; the gateway writes it as an error and as the connection's end reason."""
    from gatewaykit import open_rig

    from kuberun_trio.aio import sshsession

    def broken(self: Any, name: str, value: str) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sshsession.GatewaySession, "env_requested", broken)
    caplog.set_level(logging.INFO, logger="kuberun_trio")
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def run() -> Any:
            return await conn.run("true", env={"LANG": "C"}, check=False)

        with pytest.raises((asyncssh.Error, OSError)):
            await trio_asyncio.aio_as_trio(run)()
        conn.close()
        with trio.fail_after(20):
            while not [r for r in caplog.records
                       if getattr(r, "event", "") == "connection-end"]:
                await trio.sleep(0.05)
    (error,) = [r for r in caplog.records if getattr(r, "event", "") == "connection-error"]
    assert error.levelno == logging.ERROR and error.exc_info is not None
    (end,) = [r for r in caplog.records if getattr(r, "event", "") == "connection-end"]
    assert end.reason == "internal error in the gateway: RuntimeError"  # type: ignore[attr-defined]
