"""The password file: ``user:hash`` lines with argon2 or bcrypt hashes.

Theory of operation
-------------------
The file is read by :meth:`PasswordFile.reload` (at start and on SIGHUP): blank lines and
``#`` comments are skipped, every other line is ``username:hash`` where the hash is an
argon2 PHC string (``$argon2id$v=19$m=65536,t=3,p=4$...``, also ``argon2i``/``argon2d``)
or a bcrypt hash (``$2b$12$...``, also ``$2a$``/``$2y$``). A bad line is logged and skipped;
a file that cannot be read logs an error and lets nobody in until it can.

Verifying a hash is deliberately slow (tens to hundreds of milliseconds, and 64 MiB for
argon2's defaults), so :meth:`PasswordFile.verify` runs it in a worker thread, at most
:data:`MAX_PARALLEL_HASHES` at a time, and never blocks the trio loop. A username that is
not in the file is verified against a *dummy* hash with the same cost as the file's
first entry and then refused, so a client cannot tell unknown users from wrong
passwords by the time the answer takes. The dummy holds a random salt and digest, so
no password matches it, and making it costs no hashing.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
from typing import Any

import argon2
import attrs
import bcrypt

from .hashing import HashQueue

MAX_PARALLEL_HASHES = 2
"""Worker threads verifying hashes at once (each argon2 default uses 64 MiB)."""

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
BCRYPT_MAX_BYTES = 72
"""bcrypt uses the first 72 bytes of a password (bcrypt 5 refuses longer ones; we truncate)."""


def hash_scheme(hashed: str) -> str:
    """``argon2`` or ``bcrypt``; raises ValueError for anything else."""
    if hashed.startswith(("$argon2id$", "$argon2i$", "$argon2d$")):
        try:
            argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError as exc:
            raise ValueError("malformed argon2 hash") from exc
        return "argon2"
    if hashed.startswith("$2"):
        if _BCRYPT.fullmatch(hashed) is None or not 4 <= int(hashed[4:6]) <= 31:
            raise ValueError("malformed bcrypt hash")
        return "bcrypt"
    raise ValueError("unsupported hash (expected $argon2id$... or $2b$...)")


def dummy_hash_like(hashed: str | None) -> str:
    """A hash nobody's password matches, costing as much to verify as ``hashed``."""
    if hashed is not None and hash_scheme(hashed) == "bcrypt":
        salt = bcrypt.gensalt(rounds=int(hashed[4:6])).decode()
        return salt + "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
    params = (argon2.extract_parameters(hashed) if hashed is not None
              else argon2.profiles.get_default_parameters())
    prefix = {argon2.Type.ID: "argon2id", argon2.Type.I: "argon2i", argon2.Type.D: "argon2d"}

    def b64(n: int) -> str:
        return base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")

    return (f"${prefix[params.type]}$v={params.version}$m={params.memory_cost},"
            f"t={params.time_cost},p={params.parallelism}$"
            f"{b64(params.salt_len)}${b64(params.hash_len)}")


def cost_class(hashed: str | None) -> tuple[Any, ...]:
    """What a hash's verification time depends on: scheme and cost parameters.

    ``None`` stands for the default argon2 parameters (the dummy of an empty file).
    """
    if hashed is not None and hash_scheme(hashed) == "bcrypt":
        return ("bcrypt", int(hashed[4:6]))
    params = (argon2.extract_parameters(hashed) if hashed is not None
              else argon2.profiles.get_default_parameters())
    return ("argon2", params.type, params.version, params.time_cost, params.memory_cost,
            params.parallelism, params.hash_len)


def check_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches ``hashed`` (argon2 or bcrypt). Slow; blocking."""
    secret = password.encode("utf-8")
    if hashed.startswith("$2"):
        try:
            return bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], hashed.encode())
        except ValueError:
            return False
    try:
        return argon2.PasswordHasher().verify(hashed, secret)
    except argon2.exceptions.VerificationError:  # includes VerifyMismatchError
        return False
    except argon2.exceptions.InvalidHashError:
        return False


def parse_password_file(text: str) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """``{username: hash}`` of a file's ``text`` and (line number, problem) for bad lines."""
    users: dict[str, str] = {}
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, colon, hashed = stripped.partition(":")
        if not colon or not user:
            problems.append((number, "expected username:hash"))
            continue
        try:
            hash_scheme(hashed)
        except ValueError as exc:
            problems.append((number, f"user {user!r}: {exc}"))
            continue
        if user in users:
            problems.append((number, f"user {user!r} appears again (the first line counts)"))
            continue
        users[user] = hashed
    return users, problems


@attrs.frozen
class PasswordCheck:
    """The outcome of one password check."""

    ok: bool
    reason: str


class PasswordFile:
    """A password file, re-read by :meth:`reload`; :meth:`verify` is trio-flavoured."""

    def __init__(self, path: str, logger: logging.Logger | logging.LoggerAdapter[Any], *,
                 hashing: HashQueue | None = None) -> None:
        self.path = path
        self._log = logger
        self._users: dict[str, str] = {}
        self._classes: dict[tuple[Any, ...], str] = {}
        self.hashing = hashing or HashQueue(MAX_PARALLEL_HASHES)
        self.readable = False
        self.reload()

    def __repr__(self) -> str:
        return f"<PasswordFile {self.path} users={len(self._users)} classes={len(self._classes)}>"

    def reload(self) -> None:
        """Read the file again; on failure nobody gets in until a reload succeeds."""
        try:
            with open(os.path.expanduser(self.path), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            self._log.error("cannot read password file %s: %s (password logins refused)",
                            self.path, getattr(exc, "strerror", None) or exc,
                            extra={"event": "auth-config", "path": self.path})
            self._users, self.readable = {}, False
            self._classes = {cost_class(None): dummy_hash_like(None)}
            return
        users, problems = parse_password_file(text)
        for number, problem in problems:
            self._log.error("%s:%d: %s (line skipped)", self.path, number, problem,
                            extra={"event": "auth-config", "path": self.path})
        classes: dict[tuple[Any, ...], str] = {}
        for hashed in users.values():
            classes.setdefault(cost_class(hashed), dummy_hash_like(hashed))
        self._users, self.readable = users, True
        self._classes = classes or {cost_class(None): dummy_hash_like(None)}
        if len(classes) > 1:
            self._log.info("password file %s: %d hash cost classes; every check verifies "
                           "one hash of each (so timing does not reveal users)",
                           self.path, len(classes), extra={"event": "auth-config"})

    def plan(self, username: str) -> tuple[str, ...]:
        """The hashes a check for ``username`` verifies: one per cost class, in order."""
        hashed = self._users.get(username)
        own = cost_class(hashed) if hashed is not None else None
        return tuple(hashed if klass == own and hashed is not None else dummy
                     for klass, dummy in self._classes.items())

    async def verify(self, username: str, password: str, *, source: str = "") -> PasswordCheck:
        """Check ``password`` in a worker thread; every user costs the same.

        ``source`` is the client's address key (one check per source at a time); raises
        :class:`~.hashing.HashQueueFull` when the check is refused at once.
        """
        hashed, readable = self._users.get(username), self.readable
        plan = self.plan(username)
        results = await self.hashing.run(source, _check_all, plan, password)
        if hashed is None:
            why = "password file unreadable" if not readable else "unknown user"
            return PasswordCheck(False, why)
        ok = any(ok for target, ok in zip(plan, results, strict=True) if target == hashed)
        return PasswordCheck(ok, "password matches" if ok else "wrong password")


def _check_all(targets: tuple[str, ...], password: str) -> list[bool]:
    return [check_password(target, password) for target in targets]
