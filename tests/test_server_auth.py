"""Server authentication: authorized_keys, password file, throttling, logs, end to end."""

from __future__ import annotations

import base64
import calendar
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import argon2
import asyncssh
import bcrypt
import pytest
import trio
import trio.testing
import trio_asyncio
from gatewaykit import kube_config

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import open_embedded_cluster
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway
from kuberun_trio.gateway.throttle import LoginPolicy
from kuberun_trio.server.auth import ServerAuthenticator, build_authenticator
from kuberun_trio.server.authconfig import AuthConfig
from kuberun_trio.server.authkeys import (
    AuthorizedKeysFiles,
    KeyLineError,
    client_ip,
    decide,
    match_from,
    parse_authorized_keys,
    parse_expiry,
    parse_line,
)
from kuberun_trio.server.passwords import (
    PasswordFile,
    check_password,
    dummy_hash_like,
    parse_password_file,
)

LOG = logging.getLogger("test.auth")
NO_THROTTLE = LoginPolicy(free_failures=1000)


def pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key("openssh").decode().strip())


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    made = {t: pub(asyncssh.generate_private_key(t)) for t in (
        "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")}
    made["ssh-rsa"] = pub(asyncssh.generate_private_key("ssh-rsa", key_size=1024))
    # A security-key public key (no FIDO device here): built in wire format by hand.
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (
        b"sk-ssh-ed25519@openssh.com", bytes(range(32)), b"ssh:"))
    made["sk-ssh-ed25519@openssh.com"] = \
        f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()}"
    made["other"] = pub(asyncssh.generate_private_key("ssh-ed25519"))
    return made


# == authorized_keys parsing =============================================================

@pytest.mark.parametrize("kind", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                                  "ecdsa-sha2-nistp521", "ssh-rsa",
                                  "sk-ssh-ed25519@openssh.com"])
def test_every_key_type_parses(keys: dict[str, str], kind: str) -> None:
    key = parse_line(f"{keys[kind]} user@host with spaces", "f")
    assert key is not None and key.key_type == kind
    assert key.comment == "user@host with spaces"
    assert base64.b64encode(key.blob).decode() == keys[kind].split()[1]
    assert decide([key], keys[kind], "127.0.0.1:22", time.time()).key is key


@pytest.mark.parametrize(("options", "expect"), [
    ('from="10.0.0.0/8,!10.1.2.3"', {"from_patterns": "10.0.0.0/8,!10.1.2.3"}),
    ('environment="A=1",environment="B=x y, z",environment="A=2"',
     {"environment": (("A", "1"), ("B", "x y, z"))}),
    ('command="echo \\"hi\\", there"', {"command": 'echo "hi", there'}),
    ("no-pty", {"no_pty": True}),
    ("restrict", {"no_pty": True}),
    ("restrict,pty", {"no_pty": False}),
    ("NO-PORT-FORWARDING,no-X11-forwarding,no-agent-forwarding", {"no_pty": False}),
    ('permitopen="host:80",permitlisten="8080",tunnel="0"', {"command": None}),
    ("cert-authority", {"cert_authority": True}),
    ('principals="a,b"', {"principals": "a,b"}),
    ("verify-required,no-touch-required", {"verify_required": True}),
    ('expiry-time="20300101Z"',
     {"expiry": float(calendar.timegm((2030, 1, 1, 0, 0, 0, 0, 0, 0)))}),
])
def test_options(keys: dict[str, str], options: str, expect: dict[str, Any]) -> None:
    key = parse_line(f"{options} {keys['ssh-ed25519']} comment", "f")
    assert key is not None and key.comment == "comment"
    for name, value in expect.items():
        assert getattr(key.options, name) == value


@pytest.mark.parametrize(("line", "problem"), [
    ('bogus-option {k}', "unknown option bogus-option"),
    ('command="never closed {k}', "no closing quote"),
    ("command=unquoted {k}", "double-quoted value"),
    ("from {k}", "from needs a value"),
    ('no-pty="x" {k}', "takes no value"),
    ('environment="1BAD=x" {k}', "invalid environment"),
    ('expiry-time="2030" {k}', "invalid expiry-time"),
    ("ssh-ed25519", "without key data"),
    ("ssh-ed25519 !!notbase64!!", "not valid base64"),
    ("ecdsa-sha2-nistp256 AAAAC3NzaC1lZDI1NTE5AAAAIGfmP330aNxfsLq6i3jKDpaheRoR83kF2OBQrFrcK3mO",
     "does not hold a ecdsa-sha2-nistp256 key"),
    ("no-pty", "expected a key type"),
    ('from="x",,no-pty {k}', "bad option syntax"),
])
def test_bad_lines(keys: dict[str, str], line: str, problem: str) -> None:
    with pytest.raises(KeyLineError, match=problem):
        parse_line(line.format(k=keys["ssh-ed25519"]))


def test_file_with_comments_blank_and_bad_lines(keys: dict[str, str]) -> None:
    text = "\n".join([
        "# a comment", "", f"  {keys['ssh-rsa']}  ", "garbage here",
        f'from="127.0.0.1" {keys["ssh-ed25519"]} me', f"unknown-opt {keys['other']}",
    ])
    found, problems = parse_authorized_keys(text, "ak")
    assert [k.key_type for k in found] == ["ssh-rsa", "ssh-ed25519"]
    assert [k.source for k in found] == ["ak:3", "ak:5"]
    assert [n for n, _ in problems] == [4, 6]


# == from= and the decision ==============================================================

@pytest.mark.parametrize(("patterns", "address", "allowed"), [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("10.0.0.0/8", "10.200.3.4", True),
    ("10.0.0.0/8,!10.1.2.3", "10.1.2.3", False),
    ("!10.1.2.3,10.0.0.0/8", "10.1.2.4", True),
    ("!10.1.2.3", "192.168.1.1", False),  # only negative entries: no positive match
    ("192.168.*", "192.168.7.7", True),
    ("192.168.?.1", "192.168.12.1", False),
    ("10.0.0.1/8", "10.0.0.1", False),  # host bits set: an error, refused like sshd
    ("::1", "::1", True),
    ("2001:db8::/32", "2001:db8::5", True),
    ("2001:db8::/32", "10.0.0.1", False),
    ("*", "203.0.113.9", True),
    ("", "127.0.0.1", False),
])
def test_match_from(patterns: str, address: str, allowed: bool) -> None:
    assert match_from(patterns, address) is allowed


@pytest.mark.parametrize(("remote", "ip"), [
    ("127.0.0.1:2222", "127.0.0.1"), ("[::1]:22", "::1"), ("[::ffff:10.1.2.3]:5", "10.1.2.3"),
    ("10.9.8.7", "10.9.8.7"), ("2001:db8::1", "2001:db8::1"),
])
def test_client_ip(remote: str, ip: str) -> None:
    assert client_ip(remote) == ip


def test_decide_scans_every_matching_line(keys: dict[str, str]) -> None:
    k = keys["ssh-ed25519"]
    found, _ = parse_authorized_keys("\n".join([
        f'from="10.0.0.0/8" {k}', f'command="date" {k}',
        f'from="127.0.0.0/8",environment="WHO=local" {k}',
    ]), "ak")
    now = time.time()
    local = decide(found, k, "127.0.0.1:40000", now)
    assert local.key is found[2] and local.key.options.environment == (("WHO", "local"),)
    remote = decide(found, k, "192.0.2.1:40000", now)
    assert remote.key is None and "ak:3" in remote.reason and "192.0.2.1" in remote.reason
    assert decide(found[:2], k, "192.0.2.1:1", now).reason.endswith(
        "command= (forced command) is not supported by the gateway")
    assert decide(found, keys["other"], "127.0.0.1:1", now).key is None
    assert decide(found, "not a key", "127.0.0.1:1", now).key is None


def test_expiry(keys: dict[str, str]) -> None:
    key = parse_line(f'expiry-time="202001011200" {keys["ssh-ed25519"]}')
    assert key is not None and key.options.expiry == parse_expiry("202001011200")
    assert decide([key], keys["ssh-ed25519"], "1.1.1.1:1", key.options.expiry - 1).key is key
    assert "expired" in decide([key], keys["ssh-ed25519"], "1.1.1.1:1",
                               key.options.expiry).reason


def test_files_missing_reload(tmp_path: Path, keys: dict[str, str],
                              caplog: pytest.LogCaptureFixture) -> None:
    good, missing = tmp_path / "good", tmp_path / "missing"
    good.write_text(keys["ssh-rsa"] + "\n")
    files = AuthorizedKeysFiles([str(good), str(missing)], LOG)
    assert "cannot read authorized keys file" in caplog.text and str(missing) in caplog.text
    assert files.decide(keys["ssh-rsa"], "1.1.1.1:1").key is not None
    assert files.decide(keys["other"], "1.1.1.1:1").key is None
    missing.write_text(keys["other"] + "\n")
    good.write_text("")
    files.reload()
    assert files.decide(keys["other"], "1.1.1.1:1").key is not None
    assert files.decide(keys["ssh-rsa"], "1.1.1.1:1").key is None
    missing.chmod(0)
    good.unlink()
    files.reload()  # unreadable for non-root; gone for everyone: no crash, no keys left
    assert files.decide(keys["ssh-rsa"], "1.1.1.1:1").key is None


# == passwords ===========================================================================

CHEAP_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def test_password_hashes() -> None:
    a = CHEAP_ARGON2.hash("correct horse")
    b = bcrypt.hashpw(b"battery staple", bcrypt.gensalt(rounds=4)).decode()
    assert check_password(a, "correct horse") and not check_password(a, "wrong")
    assert check_password(b, "battery staple") and not check_password(b, "battery")
    long = "x" * 100
    assert check_password(bcrypt.hashpw(long.encode()[:72], bcrypt.gensalt(4)).decode(), long)
    for real in (a, b, None):
        dummy = dummy_hash_like(real)
        assert not check_password(dummy, "correct horse")
        assert not check_password(dummy, "battery staple")
        if real is not None and real.startswith("$argon2"):
            assert argon2.extract_parameters(dummy) == argon2.extract_parameters(real)
        elif real is not None:
            assert dummy[:7] == real[:7] and dummy != real


def test_parse_password_file() -> None:
    a = CHEAP_ARGON2.hash("pw")
    text = "\n".join(["# users", "", f"alice:{a}", "bob:$2b$04$short", "carol",
                      f"alice:{a}", "dave:plaintext", f":{a}"])
    users, problems = parse_password_file(text)
    assert users == {"alice": a}
    assert [n for n, _ in problems] == [4, 5, 6, 7, 8]


async def test_password_file_verify(tmp_path: Path) -> None:
    # That an unknown user costs the same is checked by counting hashes and comparing their
    # cost parameters (test_server_auth_paths.py), not by one wall-clock sample.
    path = tmp_path / "passwd"
    path.write_text("alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=10)).decode() + "\n")
    pw = PasswordFile(str(path), LOG)
    for user, password, expected in [("alice", "pw", "password matches"),
                                     ("alice", "no", "wrong password"),
                                     ("mallory", "pw", "unknown user")]:
        check = await pw.verify(user, password)
        assert check.reason == expected and check.ok is (expected == "password matches")


async def test_password_file_unreadable_denies(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    pw = PasswordFile(str(tmp_path / "nope"), LOG)
    assert "cannot read password file" in caplog.text
    check = await pw.verify("alice", "pw")
    assert not check.ok and check.reason == "password file unreadable"


# == the authenticator ===================================================================

def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fields = ("connection_id", "username", "method", "result", "reason", "remote_address")
    return [{f: getattr(r, f) for f in fields} for r in caplog.records
            if getattr(r, "event", None) == "auth"]


async def test_authenticator_keys_and_passwords(tmp_path: Path, keys: dict[str, str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.auth")
    (tmp_path / "ak").write_text(f'environment="TEAM=red" {keys["ssh-ed25519"]}\n')
    (tmp_path / "pw").write_text(f"alice:{CHEAP_ARGON2.hash('s3cret')}\n")
    auth = build_authenticator(AuthConfig(authorized_keys=(str(tmp_path / "ak"),),
                                          password_file=str(tmp_path / "pw")), logger=LOG)
    assert auth.methods() == {"publickey", "password"}
    ok = await auth.check_public_key("c1", "anyone", keys["ssh-ed25519"],
                                     remote_address="127.0.0.1:50000")
    assert ok is not None and ok.method == "publickey" and dict(ok.environment) == {"TEAM": "red"}
    assert await auth.check_public_key("c1", "anyone", keys["other"],
                                       remote_address="127.0.0.1:50000") is None
    good = await auth.check_password("c2", "alice", "s3cret", remote_address="127.0.0.1:50001")
    assert good is not None and good.method == "password"
    assert await auth.check_password("c2", "alice", "S3cret", remote_address="[::1]:1") is None
    assert good.reason == "password file: password matches"
    logged = decisions(caplog)  # the authenticator logs refusals; the gateway logs allow
    assert [(d["connection_id"], d["method"], d["result"]) for d in logged] == [
        ("c1", "publickey", "deny"), ("c2", "password", "deny")]
    assert logged[1]["reason"] == "password file: wrong password"
    assert logged[1]["remote_address"] == "[::1]:1"
    assert caplog.records[-2].fingerprint.startswith("SHA256:")
    assert "s3cret" not in caplog.text.lower()


async def test_deny_by_default(caplog: pytest.LogCaptureFixture, keys: dict[str, str]) -> None:
    auth = ServerAuthenticator(AuthConfig(), logger=LOG)
    assert "every login will be refused" in caplog.text
    assert auth.methods() == {"publickey"}
    assert await auth.check_public_key("c", "root", keys["ssh-ed25519"]) is None
    assert await auth.check_password("c", "root", "root") is None


async def test_reload_picks_up_new_keys(tmp_path: Path, keys: dict[str, str]) -> None:
    path = tmp_path / "ak"
    path.write_text(keys["ssh-rsa"] + "\n")
    auth = build_authenticator(AuthConfig(authorized_keys=(str(path),)), logger=LOG)
    assert await auth.check_public_key("c", "u", keys["ssh-rsa"]) is not None
    path.write_text(keys["other"] + "\n")
    auth.reload()
    assert await auth.check_public_key("c", "u", keys["ssh-rsa"]) is None  # cache cleared
    assert await auth.check_public_key("c", "u", keys["other"]) is not None


# == end to end: the gateway with the server's authenticator ============================

@contextlib.asynccontextmanager
async def gateway_with(tmp_path: Path, auth: ServerAuthenticator,
                       login: LoginPolicy = NO_THROTTLE) -> AsyncIterator[Any]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with open_aio_loop(), open_embedded_cluster(
            https=True, kubeconfig_path=tmp_path / "kubeconfig", backoff_base=0.2) as cluster:
        options = GatewayOptions(kubernetes=kube_config(cluster), authenticator=auth,
                                 host_keys=(host_key.export_private_key("openssh"),),
                                 port=0, instance="auth-gw", login=login)
        async with open_gateway(options) as gateway:
            yield cluster, gateway.address[1]


async def test_gateway_refuses_wrong_key_and_creates_no_pod(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.auth")
    caplog.set_level(logging.INFO, "kuberun_trio.gateway.login")
    good = asyncssh.generate_private_key("ssh-ed25519")
    wrong = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "ak").write_text(
        f'from="127.0.0.0/8",environment="GREETING=hello from keys" {pub(good)}\n')
    (tmp_path / "pw").write_text(f"bob:{CHEAP_ARGON2.hash('open sesame')}\n")
    auth = build_authenticator(AuthConfig(authorized_keys=(str(tmp_path / "ak"),),
                                          password_file=str(tmp_path / "pw")),
                               logger=LOG)
    async with gateway_with(tmp_path, auth) as (cluster, port):
        async def attempt(key: asyncssh.SSHKey | None, username: str = "alice",
                          password: str | None = None) -> str:
            async with asyncssh.connect(
                    "127.0.0.1", port, username=username, client_keys=[key] if key else None,
                    password=password, known_hosts=None, agent_path=None,
                    preferred_auth="password" if password else "publickey") as conn:
                result = await conn.run("echo $GREETING", check=True)
                return str(result.stdout)

        with pytest.raises(asyncssh.PermissionDenied):
            await trio_asyncio.aio_as_trio(attempt)(wrong)
        await trio.sleep(0.2)
        assert cluster.pods() == []
        assert not [e for e in cluster.request_log.entries
                    if e.method == "POST" and e.path.endswith("/pods")]
        denied = decisions(caplog)
        assert [d["result"] for d in denied] == ["deny"]
        assert denied[0]["username"] == "alice"
        assert denied[0]["remote_address"].startswith("127.0.0.1:")

        with pytest.raises(asyncssh.PermissionDenied):
            await trio_asyncio.aio_as_trio(attempt)(None, "bob", "open sesam")
        assert cluster.pods() == []

        out = await trio_asyncio.aio_as_trio(attempt)(good)
        assert out == "hello from keys\n"
        assert await trio_asyncio.aio_as_trio(attempt)(None, "bob", "open sesame") == "\n"
        assert [(d["method"], d["result"]) for d in decisions(caplog)] == [
            ("publickey", "deny"), ("password", "deny"), ("publickey", "allow"),
            ("password", "allow")]
