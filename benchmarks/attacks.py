"""Login attacks with asyncssh as the attacker (asyncio-flavoured).

Theory of operation
-------------------
One :func:`attack_connection` is one TCP connection of an attacker, from a chosen source
address (any of 127.0.0.0/8 works on Linux loopback), that guesses passwords:

* **plain** -- asyncssh's password method, one guess per request, the next one sent after
  the failure reply (until the server disconnects or the guesses run out);
* **pipelined** -- at the first password prompt, ``pipeline`` wrong guesses are sent at
  once, without waiting for replies, then the real next guess: asyncssh on the server
  cancels each attempt in progress when the next request arrives;
* **key query** -- first offers a key pair whose *public* half is an authorized key but
  whose private half is the attacker's own (the attacker holds only the public half):
  the server answers the unsigned query with PK_OK, the signed request then fails. A
  server that treats the query as a success resets its failure counts.

Each returns an :class:`AttemptLog`: replies seen, whether a guess got in, banners, and
how the connection ended. Used by :mod:`benchmarks.abuse` and the tests.

``python -m benchmarks.attacks PORT USER SOURCE COUNT INTERVAL`` (password in
``$LOGIN_PASSWORD``) is the legitimate user as its own process: COUNT logins, INTERVAL
seconds apart, printing ``{"latencies": [...], "errors": [...]}`` -- so that its latency
is not the attacker's event loop being busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import asyncssh
import attrs
from asyncssh.packet import Boolean, String

ATTACK_LIMIT = 120.0
"""Seconds after which one connection gives up (callers may bound it tighter)."""


@attrs.define
class AttemptLog:
    """What one attacking connection saw."""

    started: float = attrs.field(factory=time.monotonic)
    prompts: int = 0
    """Password prompts (each after the first is the reply to a failed guess)."""
    sent: int = 0
    """Password requests sent (pipelined ones included)."""
    banners: list[str] = attrs.field(factory=list)
    success_at: float | None = None
    """``time.monotonic()`` when the server accepted a guess."""
    ended: str = ""
    """``success``, ``denied``, ``disconnected: ...`` or the error."""


class _Attacker(asyncssh.SSHClient):
    def __init__(self, guesses: Iterator[str], log: AttemptLog, pipeline: int) -> None:
        self.guesses = guesses
        self.log = log
        self.pipeline = pipeline
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.log.banners.append(msg)

    def auth_completed(self) -> None:
        self.log.success_at = time.monotonic()

    async def password_auth_requested(self) -> str | None:
        self.log.prompts += 1
        if self.pipeline and self.conn is not None:
            for _ in range(self.pipeline):
                guess = next(self.guesses, None)
                if guess is None:
                    break
                await self.conn.send_userauth_request(b"password", Boolean(False),
                                                      String(guess))
                self.log.sent += 1
            self.pipeline = 0
        guess = next(self.guesses, None)
        if guess is not None:
            self.log.sent += 1
        return guess


def forged_keypair(authorized_public: asyncssh.SSHKey) -> asyncssh.SSHKeyPair:
    """A key pair offering ``authorized_public`` but signing with an unrelated key."""
    own = asyncssh.generate_private_key(authorized_public.algorithm.decode())
    pair = asyncssh.load_keypairs([own])[0]
    pair.public_data = pair.key_public_data = authorized_public.public_data
    return pair


async def attack_connection(port: int, username: str, guesses: Iterator[str], *,
                            source: str = "127.0.0.1", pipeline: int = 0,
                            query_key: asyncssh.SSHKey | None = None) -> AttemptLog:
    """One attacking connection (see the module docstring). Asyncio-flavoured."""
    log = AttemptLog()
    options: dict[str, Any] = {"preferred_auth": "password"}
    if query_key is not None:
        options = {"preferred_auth": "publickey,password",
                   "client_keys": [forged_keypair(query_key)]}
    try:
        async with asyncio.timeout(ATTACK_LIMIT):
            conn = await asyncssh.connect(
                "127.0.0.1", port, username=username, local_addr=(source, 0),
                known_hosts=None, agent_path=None, password=None,
                client_factory=lambda: _Attacker(guesses, log, pipeline), **options)
            conn.close()
            log.ended = "success"
    except asyncssh.PermissionDenied as exc:
        log.ended = "denied" if not exc.reason or "no more" in exc.reason.lower() \
            or exc.reason == "Permission denied" else f"disconnected: {exc.reason}"
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        log.ended = f"{type(exc).__name__}: {exc}"
    return log


async def login(port: int, username: str, password: str, *,
                source: str = "127.0.0.2") -> float:
    """A legitimate password login (auth only, then close): seconds it took, or raises."""
    start = time.monotonic()
    async with asyncio.timeout(ATTACK_LIMIT):
        conn = await asyncssh.connect("127.0.0.1", port, username=username, password=password,
                                      local_addr=(source, 0), known_hosts=None,
                                      agent_path=None, client_keys=None,
                                      preferred_auth="password")
    took = time.monotonic() - start
    conn.close()
    return took


async def probe(port: int, username: str, password: str, source: str, count: int,
                interval: float) -> dict[str, list[Any]]:
    """``count`` legitimate logins, ``interval`` seconds apart."""
    latencies: list[float] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            latencies.append(await login(port, username, password, source=source))
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(interval)
    return {"latencies": latencies, "errors": errors}


if __name__ == "__main__":
    import json
    import os
    import sys

    port, user, source, count, interval = sys.argv[1:6]
    print(json.dumps(asyncio.run(probe(int(port), user, os.environ["LOGIN_PASSWORD"], source,
                                       int(count), float(interval)))))
