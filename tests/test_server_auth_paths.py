"""``server/auth.py``'s remaining paths: file → webhook fallback, the decision cache, bad keys.

The webhook is the real local HTTP server of ``test_webhook.py``; time is
trio's autojump clock where the cache's TTL is the subject.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import trio
import trio.testing
from test_webhook import Hook, ok, webhook_server

from kuberun_trio.server import auth as server_auth
from kuberun_trio.server.auth import ServerAuthenticator
from kuberun_trio.server.authconfig import AuthConfig, WebhookConfig
from kuberun_trio.server.passwords import hash_scheme

LOG = logging.getLogger("test.auth.paths")


def pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def decisions(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.connection_id, r.result, r.reason) for r in caplog.records
            if getattr(r, "event", None) == "auth" and hasattr(r, "result")]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)


def files_and_hook(tmp_path: Path, hook: Hook | None, key: str) -> ServerAuthenticator:
    (tmp_path / "ak").write_text(key + "\n")
    (tmp_path / "pw").write_text(
        "alice:$2b$04$" + "a" * 22 + "b" * 31 + "\n")  # cheap bcrypt; nobody's password
    webhook = WebhookConfig(url=hook.url, timeout=5.0) if hook is not None else None
    return ServerAuthenticator(AuthConfig(authorized_keys=(str(tmp_path / "ak"),),
                                          password_file=str(tmp_path / "pw"), webhook=webhook),
                               logger=LOG)


# -- file → webhook fallback -----------------------------------------------------------------

async def test_key_not_in_the_file_falls_back_to_the_webhook(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    filed, offered = pub(), pub()
    async with webhook_server() as hook:
        hook.replies["/auth/pubkey"] = ok(environment={"FROM": "webhook"})
        auth = files_and_hook(tmp_path, hook, filed)
        result = await auth.check_public_key("c1", "bob", offered, remote_address="127.0.0.1:1")
        assert result is not None and dict(result.environment) == {"FROM": "webhook"}
        assert [path for path, _, _ in hook.requests] == ["/auth/pubkey"]
        # a key the file holds never reaches the webhook
        assert await auth.check_public_key("c2", "bob", filed) is not None
        assert len(hook.requests) == 1
    # the authenticator logs refusals only (``allow`` is the login gate's, once per login)
    assert decisions(caplog) == []


async def test_both_refusing_joins_the_reasons(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with webhook_server() as hook:
        hook.replies["/auth/pubkey"] = (200, b'{"success": false}')
        hook.replies["/auth/password"] = (200, b'{"success": false}')
        auth = files_and_hook(tmp_path, hook, pub())
        assert await auth.check_public_key("c1", "bob", pub()) is None
        assert await auth.check_password("c2", "alice", "guess") is None
    (_, r1, key_reason), (_, r2, password_reason) = decisions(caplog)
    assert (r1, r2) == ("deny", "deny")
    file_reason, webhook_reason = key_reason.split("; ")
    assert file_reason and "webhook" in webhook_reason
    assert password_reason.startswith("password file: wrong password; ")
    assert "webhook" in password_reason.split("; ", 1)[1]


# -- the decision cache ------------------------------------------------------------------------

async def test_cached_decision_expires_after_its_ttl(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    key = pub()
    async with webhook_server() as hook:
        hook.replies["/auth/pubkey"] = ok()
        auth = files_and_hook(tmp_path, hook, pub())
        assert await auth.check_public_key("c1", "bob", key) is not None
        assert await auth.check_public_key("c1", "bob", key) is not None  # cached
        assert len(hook.requests) == 1
        await trio.sleep(server_auth._CACHE_TTL + 1)
        assert await auth.check_public_key("c1", "bob", key) is not None  # asked afresh
        assert len(hook.requests) == 2


async def test_the_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_auth, "_CACHE_ENTRIES", 3)
    key = pub()
    async with webhook_server() as hook:
        hook.replies["/auth/pubkey"] = ok()
        auth = files_and_hook(tmp_path, hook, pub())
        for i in range(5):
            assert await auth.check_public_key(f"ok{i}", "bob", key) is not None
    assert [cid for cid, _, _ in auth._recent] == ["ok2", "ok3", "ok4"]  # oldest evicted


# -- a malformed offered key -------------------------------------------------------------------

@pytest.mark.parametrize("offered", [
    "ssh-ed25519 !!!not-base64!!!",
    "ssh-ed25519",
    "",
    "ssh-ed25519 " + "A" * 8,  # base64, but not a key blob
])
async def test_a_malformed_offered_key_is_refused_and_logged(
        tmp_path: Path, offered: str, caplog: pytest.LogCaptureFixture) -> None:
    async with webhook_server() as hook:
        auth = files_and_hook(tmp_path, hook, pub())
        assert await auth.check_public_key("c1", "bob", offered) is None
        assert hook.requests == []  # never sent on
    ((cid, result, reason),) = decisions(caplog)
    assert (cid, result) == ("c1", "deny") and reason


# -- unknown users cost the same: counted, not timed -------------------------------------------

@pytest.mark.parametrize("scheme", ["bcrypt", "argon2"])
async def test_an_unknown_user_costs_one_hash_of_the_same_cost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    import argon2
    import bcrypt

    from kuberun_trio.server import passwords

    hashed = (bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=5)).decode() if scheme == "bcrypt"
              else argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1).hash("pw"))
    (tmp_path / "pw").write_text(f"alice:{hashed}\n")
    checked: list[str] = []
    real = passwords.check_password

    def counting(target: str, password: str) -> bool:
        checked.append(target)
        return real(target, password)

    monkeypatch.setattr(passwords, "check_password", counting)
    pw = passwords.PasswordFile(str(tmp_path / "pw"), LOG)
    assert (await pw.verify("alice", "no")).reason == "wrong password"
    assert (await pw.verify("mallory", "pw")).reason == "unknown user"
    assert len(checked) == 2  # one hash each: the unknown user is not answered early
    known, dummy = checked
    assert known == hashed and dummy != hashed
    assert hash_scheme(dummy) == scheme
    assert cost(dummy) == cost(known)


def cost(hashed: str) -> Any:
    """The parameters that make a hash slow: bcrypt's rounds, argon2's m/t/p."""
    if hashed.startswith("$2"):
        return hashed[:7]
    return hashed.split("$")[3]
