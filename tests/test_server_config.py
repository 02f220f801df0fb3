"""The server configuration, flags over file, keys, the state dir and the log formatters."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from kuberun_trio.cli import build_parser
from kuberun_trio.core.limits import Limits, MaxStartups
from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.gateway.throttle import LoginPolicy
from kuberun_trio.server.authconfig import AuthConfig, WebhookConfig
from kuberun_trio.server.config import check_files, load_server_config, parse_server_config
from kuberun_trio.server.demo import StateDir, default_state_dir, ssh_command
from kuberun_trio.server.keys import (
    ensure_private_key,
    fingerprint,
    generate_ed25519,
    load_private_key,
    public_key_line,
)
from kuberun_trio.server.logs import configure_logging
from kuberun_trio.server.settings import cluster_mode, load_settings, owner_reference
from kuberun_trio.server.sshconfig import parse_listen


def problems(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_server_config(data, instance="gw")
    errors = info.value.errors if isinstance(info.value, ConfigErrors) else (info.value,)
    return {e.path: e.problem for e in errors}


def test_defaults() -> None:
    config = parse_server_config({}, instance="gw")
    assert config.ssh.address == ("127.0.0.1", 2222)
    assert config.ssh.host_keys == ()
    assert config.auth == AuthConfig()
    assert config.log.format == "text" and config.log.level == "INFO"
    assert config.instance == "gw"
    assert config.kubernetes.pod.metadata["namespace"] == "default"


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
ssh: {listen: "[::1]:2022", hostKeys: [/k1, /k2]}
auth:
  authorizedKeys: [/a]
  passwordFile: /p
  webhook: {url: "https://auth.example/", timeout: 1m30s, cacert: /ca.pem}
kubernetes:
  pod: {metadata: {namespace: ssh}}
  timeouts: {podStart: 5s}
log: {format: json, level: debug}
instance: gw-1
""")
    config = load_server_config(path)
    assert config.ssh.address == ("::1", 2022)
    assert config.ssh.host_keys == ("/k1", "/k2")
    assert config.auth == AuthConfig(("/a",), "/p", WebhookConfig("https://auth.example/",
                                                                   90.0, "/ca.pem"))
    assert config.kubernetes.pod.metadata["namespace"] == "ssh"
    assert config.kubernetes.timeouts.pod_start == 5.0
    assert (config.log.format, config.log.level) == ("json", "DEBUG")
    assert config.instance == "gw-1"


def test_every_error_with_its_key_path() -> None:
    found = problems({
        "ssh": {"listen": "2222"},
        "auth": {"authorizedKeys": "/one/file", "webhook": {"url": "ftp://x", "timeout": "9x"}},
        "log": {"format": "xml", "level": "loud"},
        "kubernetes": {"timeouts": {"podStart": "6x"}, "pod": {"mode": "sessions"}},
        "instance": "",
        "sssh": {},
    })
    assert found["ssh.listen"].startswith("expected HOST:PORT")
    assert found["auth.authorizedKeys"] == "expected a list of strings, got string"
    assert found["auth.webhook.timeout"] == 'invalid duration "9x"'
    assert found["log.format"] == "must be text or json, got 'xml'"
    assert "DEBUG" in found["log.level"]
    assert found["kubernetes.timeouts.podStart"] == 'invalid duration "6x"'
    assert "unknown mode 'sessions'" in found["kubernetes.pod.mode"]
    assert found["instance"] == "must be a non-empty string"
    assert found["sssh"] == "unknown key (did you mean ssh?)"


def test_webhook_rules() -> None:
    found = problems({"auth": {"webhook": {"url": "ftp://x", "cacert": "/ca"}}})
    assert set(found) == {"auth.webhook.url", "auth.webhook.cacert"}
    assert problems({"auth": {"webhook": {}}}) == {"auth.webhook.url": "required"}
    assert problems({"ssh": {"hostKey": "/k"}}) == {
        "ssh.hostKey": "unknown key: the key is hostKeys (a list)"}


def test_login_limits() -> None:
    config = parse_server_config({"auth": {
        "maxTries": 3, "throttle": {"freeFailures": 0, "delay": "250ms", "maxDelay": "1m",
                                    "forgetAfter": "1h"},
        "passwordHashing": {"threads": 4, "queue": 0}}})
    policy = config.auth.login_policy()
    assert (policy.max_tries, policy.free_failures, policy.delay, policy.max_delay,
            policy.forget_after) == (3, 0, 0.25, 60.0, 3600.0)
    assert config.auth.password_hashing.threads == 4
    assert parse_server_config({}).auth.login_policy() == LoginPolicy()
    found = problems({"auth": {"maxTries": 0, "throttle": {"delay": "5s", "maxDelay": "1s",
                                                           "freeFailures": -1},
                               "passwordHashing": {"threads": 0, "queue": -1}}})
    assert set(found) == {"auth.maxTries", "auth.throttle.maxDelay",
                          "auth.throttle.freeFailures", "auth.passwordHashing.threads",
                          "auth.passwordHashing.queue"}
    assert found["auth.throttle.maxDelay"] == "must be at least auth.throttle.delay (5s), got 1s"
    assert "auth.throttle.dealy" in problems({"auth": {"throttle": {"dealy": "1s"}}})


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:2222", ("127.0.0.1", 2222)),
    (":22", ("0.0.0.0", 22)),
    ("[::]:0", ("::", 0)),
    ("gateway.local:65535", ("gateway.local", 65535)),
])
def test_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["2222", "host:", "host:65536", "::1:22", "host:22x"])
def test_listen_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_check_files(tmp_path: Path) -> None:
    good = tmp_path / "host"
    good.write_bytes(generate_ed25519())
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    config = parse_server_config({
        "ssh": {"hostKeys": [str(good), str(bad), str(tmp_path / "missing")]},
        "auth": {"authorizedKeys": [str(tmp_path / "nokeys")], "passwordFile": str(good)},
    })
    with pytest.raises(ConfigErrors) as info:
        check_files(config)
    paths = [e.path for e in info.value.errors]
    assert paths == ["ssh.hostKeys[1]", "ssh.hostKeys[2]", "auth.authorizedKeys[0]"]
    assert "not an OpenSSH or PEM private key" in info.value.errors[0].problem


@pytest.mark.parametrize("auth", [
    {"passwordFile": ["a", "b"]},  # a list where one path goes (used to crash: TypeError)
    {"authorizedKeys": "one-path"},  # one path where a list goes
])
def test_a_malformed_file_key_is_a_problem_not_a_crash(tmp_path: Path,
                                                       auth: dict[str, object]) -> None:
    good = tmp_path / "host"
    good.write_bytes(generate_ed25519())
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse_server_config({"ssh": {"hostKeys": [str(good)]}, "auth": auth}, files=True)
    errors = info.value.errors if isinstance(info.value, ConfigErrors) else [info.value]
    assert [e.path for e in errors] == [f"auth.{next(iter(auth))}"]


def settings_for(tmp_path: Path, *argv: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(list(argv))
    return load_settings(args, environ or {"HOME": str(tmp_path)})


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
ssh: {listen: "0.0.0.0:22", hostKeys: [/from-file]}
auth: {authorizedKeys: [/file-keys]}
kubernetes:
  connection: {host: "https://10.0.0.1:6443", bearerToken: t}
  pod:
    metadata: {namespace: file-ns}
    spec: {containers: [{name: sidecar, image: side}, {name: shell, image: old}]}
    consoleContainerNumber: 1
log: {format: json, level: ERROR}
instance: file-instance
""")
    settings = settings_for(
        tmp_path, "--config", str(path), "--listen", "127.0.0.1:0", "--host-key", "/a",
        "--host-key", "/b", "--authorized-keys", "/k", "--kubeconfig", "/kc", "--context", "dev",
        "--namespace", "flag-ns", "--image", "new", "--instance", "flag-instance",
        "--log-format", "text", "--log-level", "debug", "--state-dir", str(tmp_path / "st"))
    config = settings.config
    assert settings.cluster == "config" and not settings.demo
    assert config.ssh.address == ("127.0.0.1", 0)
    assert config.ssh.host_keys == ("/a", "/b")
    assert config.auth.authorized_keys == ("/k",)
    conn = config.kubernetes.connection
    assert (conn.source, conn.kubeconfig, conn.context, conn.bearer_token) == (
        "kubeconfig", "/kc", "dev", None)
    assert config.kubernetes.pod.metadata["namespace"] == "flag-ns"
    assert [c["image"] for c in config.kubernetes.pod.spec["containers"]] == ["side", "new"]
    assert (config.log.format, config.log.level) == ("text", "DEBUG")
    assert config.instance == "flag-instance"
    assert settings.state.path == tmp_path / "st"


def test_bad_flag_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        settings_for(tmp_path, "--namespace", "Not_A_Namespace")
    assert info.value.path == "kubernetes.pod.metadata.namespace"


def test_image_flag_without_a_spec(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "--image", "alpine:3")
    (container,) = settings.config.kubernetes.pod.spec["containers"]
    assert container["image"] == "alpine:3"


@pytest.mark.parametrize(("argv", "mode"), [
    ([], "embedded"),
    (["--listen", ":2222"], "embedded"),
    (["--kubeconfig", "/kc"], "config"),
    (["--cluster", "in-cluster"], "in-cluster"),
    (["--cluster", "kubeconfig"], "kubeconfig"),
])
def test_cluster_mode(argv: list[str], mode: str) -> None:
    assert cluster_mode(build_parser().parse_args(argv)) == mode


DOWNWARD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "gw-0", "POD_UID": "u-1",
            "POD_NAMESPACE": "ssh"}


def test_owner_reference_in_cluster(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "--cluster", "in-cluster", "--namespace", "ssh",
                            environ=DOWNWARD)
    conn = settings.config.kubernetes.connection
    assert conn.source == "inCluster"
    assert settings.config.kubernetes.pod.metadata["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "gw-0", "uid": "u-1",
        "controller": False, "blockOwnerDeletion": False}]


def test_owner_reference_only_when_it_can_be_valid() -> None:
    assert owner_reference(DOWNWARD, "ssh") is not None
    assert owner_reference(DOWNWARD, "other-namespace") is None
    assert owner_reference({**DOWNWARD, "KUBERNETES_SERVICE_HOST": ""}, "ssh") is None
    assert owner_reference({k: v for k, v in DOWNWARD.items() if k != "POD_UID"}, "ssh") is None


def test_no_owner_reference_outside_in_cluster_mode(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "--kubeconfig", "/kc", "--namespace", "ssh",
                            environ=DOWNWARD)
    assert "ownerReferences" not in settings.config.kubernetes.pod.metadata


def test_default_state_dir() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/kuberun-trio")
    assert default_state_dir({"HOME": "/h"}) == Path("/h/.local/state/kuberun-trio")


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key, created = ensure_private_key(path)
    assert created and os.stat(path).st_mode & 0o777 == 0o600
    again, created_again = ensure_private_key(path)
    assert not created_again and fingerprint(again) == fingerprint(key)
    listed = subprocess.run(["ssh-keygen", "-lf", str(path)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed[1] == fingerprint(key)


def test_pem_host_key(tmp_path: Path) -> None:
    path = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "",
                    "-f", str(path)], check=True)
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    key = load_private_key(path.read_bytes())
    assert public_key_line(key).split()[:2] == (tmp_path / "rsa.pub").read_text().split()[:2]


def test_state_dir_authorizes_the_client_key_once(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    key = state.ensure_client_key()
    state.ensure_client_key()
    lines = state.authorized_keys.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(public_key_line(key))
    assert os.stat(state.path).st_mode & 0o777 == 0o700
    assert os.stat(state.client_key).st_mode & 0o777 == 0o600
    state.write_known_hosts("127.0.0.1", 2200, [key])
    assert state.known_hosts.read_text().startswith("[127.0.0.1]:2200 ssh-ed25519 ")
    assert ssh_command(state, "127.0.0.1", 2200) == (
        f"ssh -i {state.client_key} -p 2200 -o UserKnownHostsFile={state.known_hosts} "
        "user@127.0.0.1")


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


def test_json_logs(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", out)
    log = logging.getLogger("kuberun_trio.test")
    log.info("pod %s", "created", extra={"event": "pod-created", "connection_id": "c1",
                                         "duration_ms": 12})
    log.debug("hidden")
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        log.exception("failed", extra={"connection_id": "c2"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "pod created" and first["level"] == "INFO"
    assert (first["event"], first["connection_id"], first["duration_ms"]) == (
        "pod-created", "c1", 12)
    assert second["error"] == "ValueError: boom\nline two"
    assert "Traceback" in second["traceback"]


def test_text_logs_one_line_per_event(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", out)
    log = logging.getLogger("kuberun_trio.test")
    log.info("auth\ndecision", extra={"event": "auth", "connection_id": "c1",
                                       "reason": "no such key"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"connection_id": "c2"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        'kuberun_trio.test: auth\\ndecision event=auth connection_id=c1 reason="no such key"')
    assert lines[1].endswith('failed connection_id=c2 error="ValueError: boom"')


def test_limit_defaults_and_keys() -> None:
    assert parse_server_config({}, instance="gw").limits == Limits()
    config = parse_server_config({
        "ssh": {"loginGraceTime": "30s", "maxStartups": "5:50:20", "maxStartupsPerAddress": 3,
                "clientAliveInterval": "1m", "clientAliveCountMax": 2, "maxConnections": 50},
        "security": {"maxSessions": 4, "maxConnectionsPerUser": 2, "maxSignalsPerSecond": 0.5,
                     "fdReserve": 0},
    }, instance="gw")
    assert config.limits == Limits(
        login_grace_time=30.0, max_startups=MaxStartups(5, 50, 20), max_startups_per_address=3,
        client_alive_interval=60.0, client_alive_count_max=2, max_connections=50,
        max_sessions=4, max_connections_per_user=2, max_signals_per_second=0.5, fd_reserve=0)
    # OpenSSH's single-number form, also as a YAML number
    assert parse_server_config({"ssh": {"maxStartups": 7}}, instance="gw").limits.max_startups \
        == MaxStartups(7, 100, 7)


def test_limit_errors_name_the_key() -> None:
    found = problems({
        "ssh": {"maxStartups": "20:30:10", "maxStartupsPerAddress": 0, "clientAliveCountMax": 0,
                "maxConnections": -1},
        "security": {"maxSessions": 0, "maxConnectionsPerUser": 0, "maxSignalsPerSecond": 0,
                     "fdReserve": -1},
    })
    assert found == {
        "ssh.maxStartups": "need 1 <= start <= full and 1 <= rate <= 100, got '20:30:10'",
        "ssh.maxStartupsPerAddress": "must be at least 1, got 0",
        "ssh.clientAliveCountMax": "must be at least 1, got 0",
        "ssh.maxConnections": "must be at least 1, got -1",
        "security.maxSessions": "must be at least 1, got 0",
        "security.maxConnectionsPerUser": "must be at least 1, got 0",
        "security.maxSignalsPerSecond": "must be positive, got 0",
        "security.fdReserve": "must be at least 0, got -1",
    }
    found = problems({"ssh": {"loginGraceTime": "0s", "maxStartups": True},
                      "security": {"maxSession": 3, "maxSessions": "3"}, "securty": {}})
    assert found["ssh.loginGraceTime"] == "must be a positive duration, got '0s'"
    assert found["ssh.maxStartups"] == "expected a string, got boolean"
    assert found["security.maxSession"] == "unknown key (did you mean maxSessions?)"
    assert found["security.maxSessions"] == "expected an integer, got string"
    assert found["securty"] == "unknown key (did you mean security?)"
