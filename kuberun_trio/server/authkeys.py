"""OpenSSH ``authorized_keys`` files: parsing, ``from=`` matching, and the key decision.

Theory of operation
-------------------
Everything here is synchronous and pure except :class:`AuthorizedKeysFiles`, which reads
files. A line is ``[options] keytype base64 [comment]`` (sshd(8) "AUTHORIZED_KEYS FILE
FORMAT"): the options are comma-separated, case-insensitive names, some with a
double-quoted value in which ``\\"`` stands for a quote. As in sshd, a line that does not
start with a key type starts with options, which end at the first unquoted blank; an
unknown option or a malformed key makes the whole line invalid (it is reported with its
line number and skipped, never fatal).

The gateway is not a login shell, so each option falls in one of three groups:

* *enforced*: ``from=`` (against the client address; no DNS lookups, as ``UseDNS no``),
  ``environment=`` (becomes session environment), ``expiry-time=``;
* *enforced* too: ``no-agent-forwarding`` (``agent-forwarding`` after it lifts it again),
  when agent forwarding is enabled at all (``security.forwarding.agentForwardingMode``);
* *moot*: port forwarding, X11, user-rc and tunnel options -- the gateway offers none of
  those, so a restriction on them holds and a permission grants nothing;
* *not enforceable*: ``command=``, ``no-pty`` / ``restrict`` (without a later ``pty``),
  ``cert-authority``, ``principals=``, ``verify-required``. A key carrying one is parsed
  but never lets anyone in, and the denial says why: ignoring a restriction would widen
  access.

:func:`decide` scans every line holding the offered key, like sshd: the first one whose
options permit the connection wins; otherwise the reason of the last refusal is kept.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import fnmatch
import ipaddress
import logging
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-ed448", "ssh-rsa", "ssh-dss",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
"""Plain public key types (certificate types add ``-cert-v01@openssh.com``)."""

_CERT_SUFFIX = "-cert-v01@openssh.com"
_FLAGS = frozenset({
    "agent-forwarding", "cert-authority", "no-agent-forwarding", "no-port-forwarding",
    "no-pty", "no-user-rc", "no-x11-forwarding", "port-forwarding", "pty", "restrict",
    "user-rc", "x11-forwarding", "no-touch-required", "verify-required", "touch-required",
})
_VALUED = frozenset({
    "command", "environment", "expiry-time", "from", "permitlisten", "permitopen",
    "principals", "tunnel",
})
_OPTION_NAME = re.compile(r"[A-Za-z0-9-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPIRY = re.compile(r"(\d{8})(\d{4})?(\d{2})?(Z?)")


class KeyLineError(ValueError):
    """A line of an authorized_keys file that cannot be used."""


def _is_key_type(word: str) -> bool:
    if word in KEY_TYPES:
        return True
    base = word.removesuffix(_CERT_SUFFIX)
    return base != word and (base in KEY_TYPES or f"{base}@openssh.com" in KEY_TYPES)


@attrs.frozen
class KeyOptions:
    """The options of one authorized_keys line, as they matter to the gateway."""

    raw: tuple[tuple[str, str | None], ...] = ()
    """Every option in order: (lower-case name, value or None for a flag)."""
    from_patterns: str | None = None
    """``from=``: comma-separated address patterns (``!`` negates; ``*``/``?``; CIDR)."""
    environment: tuple[tuple[str, str], ...] = ()
    """``environment=`` pairs, in order (the first one of a name wins, as in sshd)."""
    expiry: float | None = None
    """``expiry-time=`` as a Unix time; the key stops working then."""
    command: str | None = None
    no_pty: bool = False
    cert_authority: bool = False
    principals: str | None = None
    verify_required: bool = False
    no_agent_forwarding: bool = False
    """``no-agent-forwarding`` (or ``restrict``) without a later ``agent-forwarding``."""

    @property
    def unenforceable(self) -> str | None:
        """Why the gateway cannot honour this line's restrictions, or None if it can."""
        if self.command is not None:
            return "option command= (forced command) is not supported by the gateway"
        if self.no_pty:
            return "option no-pty/restrict is not supported by the gateway"
        if self.cert_authority or self.principals is not None:
            return "certificate authorities (cert-authority, principals=) are not supported"
        if self.verify_required:
            return "option verify-required is not supported by the gateway"
        return None


@attrs.frozen
class AuthorizedKey:
    """One usable line of an authorized_keys file."""

    key_type: str
    blob: bytes
    """The decoded key (SSH wire format); what a client's key is compared by."""
    comment: str = ""
    options: KeyOptions = attrs.Factory(KeyOptions)
    source: str = ""
    """``path:line`` the key came from, for logs."""


def _split_options(text: str) -> tuple[list[tuple[str, str | None]], str]:
    """Options at the start of ``text`` and the rest of the line after them."""
    options: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while True:
        match = _OPTION_NAME.match(text, i)
        if match is None:
            raise KeyLineError(f"bad option syntax at column {i + 1}")
        name = match.group().lower()
        i = match.end()
        value: str | None = None
        if i < n and text[i] == "=":
            if i + 1 >= n or text[i + 1] != '"':
                raise KeyLineError(f"option {name}= needs a double-quoted value")
            i += 2
            chars: list[str] = []
            while True:
                if i >= n:
                    raise KeyLineError(f"option {name}= has no closing quote")
                if text.startswith('\\"', i):
                    chars.append('"')
                    i += 2
                elif text[i] == '"':
                    i += 1
                    break
                else:
                    chars.append(text[i])
                    i += 1
            value = "".join(chars)
        if name in _VALUED and value is None:
            raise KeyLineError(f"option {name} needs a value")
        if name in _FLAGS and value is not None:
            raise KeyLineError(f"option {name} takes no value")
        if name not in _VALUED and name not in _FLAGS:
            raise KeyLineError(f"unknown option {name}")
        options.append((name, value))
        if i < n and text[i] == ",":
            i += 1
            continue
        if i >= n or text[i] in " \t":
            return options, text[i:].strip()
        raise KeyLineError(f"bad option syntax at column {i + 1}")


def parse_expiry(text: str) -> float:
    """``YYYYMMDD[HHMM[SS]][Z]`` as a Unix time (local time unless ``Z``)."""
    match = _EXPIRY.fullmatch(text)
    if match is None or (match[3] and not match[2]):
        raise KeyLineError(f"invalid expiry-time {text!r}")
    stamp = match[1] + (match[2] or "0000") + (match[3] or "00")
    try:
        parsed = time.strptime(stamp, "%Y%m%d%H%M%S")
    except ValueError as exc:
        raise KeyLineError(f"invalid expiry-time {text!r}") from exc
    return float(calendar.timegm(parsed) if match[4] else time.mktime(parsed))


def _options(raw: list[tuple[str, str | None]]) -> KeyOptions:
    fields: dict[str, Any] = {"raw": tuple(raw)}
    env: list[tuple[str, str]] = []
    no_pty = False
    for name, value in raw:
        if name == "from":
            fields["from_patterns"] = value
        elif name == "environment":
            assert value is not None
            var, eq, content = value.partition("=")
            if not eq or not _ENV_NAME.fullmatch(var):
                raise KeyLineError(f"invalid environment={value!r} (expected NAME=value)")
            if var not in {k for k, _ in env}:
                env.append((var, content))
        elif name == "expiry-time":
            assert value is not None
            fields["expiry"] = parse_expiry(value)
        elif name == "command":
            fields["command"] = value
        elif name in ("no-agent-forwarding", "restrict"):
            fields["no_agent_forwarding"] = True
            no_pty = no_pty or name == "restrict"
        elif name == "agent-forwarding":
            fields["no_agent_forwarding"] = False
        elif name == "no-pty":
            no_pty = True
        elif name == "pty":
            no_pty = False
        elif name == "cert-authority":
            fields["cert_authority"] = True
        elif name == "principals":
            fields["principals"] = value
        elif name == "verify-required":
            fields["verify_required"] = True
    return KeyOptions(environment=tuple(env), no_pty=no_pty, **fields)


def decode_key(key_type: str, data: str) -> bytes:
    """The wire-format blob of ``data`` (base64), checked to be a ``key_type`` key."""
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyLineError("key data is not valid base64") from exc
    if len(blob) < 4:
        raise KeyLineError("key data is truncated")
    (size,) = struct.unpack(">I", blob[:4])
    if blob[4:4 + size] != key_type.encode():
        raise KeyLineError(f"key data does not hold a {key_type} key")
    return blob


def parse_line(line: str, source: str = "") -> AuthorizedKey | None:
    """One line: None for blank lines and comments; raises :class:`KeyLineError`."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    raw: list[tuple[str, str | None]] = []
    if not _is_key_type(text.split(None, 1)[0]):
        raw, text = _split_options(text)
    parts = text.split(None, 2)
    if not parts or not _is_key_type(parts[0]):
        found = parts[0][:40] if parts else "nothing"
        raise KeyLineError(f"expected a key type (e.g. ssh-ed25519), found {found!r}")
    if len(parts) < 2:
        raise KeyLineError(f"{parts[0]} key without key data")
    blob = decode_key(parts[0], parts[1])
    comment = parts[2] if len(parts) > 2 else ""
    return AuthorizedKey(parts[0], blob, comment, _options(raw), source)


def parse_authorized_keys(text: str, source: str = "") -> tuple[
        list[AuthorizedKey], list[tuple[int, str]]]:
    """Every usable key of a file's ``text``, and (line number, problem) for the others."""
    keys: list[AuthorizedKey] = []
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            key = parse_line(line, f"{source}:{number}")
        except KeyLineError as exc:
            problems.append((number, str(exc)))
            continue
        if key is not None:
            keys.append(key)
    return keys, problems


# == from= ===============================================================================

def client_ip(remote_address: str) -> str:
    """The IP of ``host:port`` / ``[v6]:port`` / a bare address; IPv4-mapped v6 → v4."""
    host = remote_address
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def match_from(patterns: str, address: str) -> bool:
    """sshd's ``from=`` rule for a client at IP ``address`` (no reverse DNS).

    Each comma-separated entry is a CIDR network or an address, else a ``*``/``?``
    wildcard pattern; ``!`` negates. A matching negated entry refuses, otherwise one
    positive match is needed. A network with host bits set (``10.0.0.1/8``) is an error
    and refuses, as in sshd.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    positive = False
    for entry in patterns.split(","):
        negated = entry.startswith("!")
        pattern = entry[1:] if negated else entry
        if not pattern:
            return False
        matched: bool
        try:
            network = ipaddress.ip_network(pattern, strict=True)
        except ValueError:
            if "/" in pattern:
                return False  # a malformed or inconsistent network: sshd refuses
            matched = fnmatch.fnmatchcase(address.lower(), _glob(pattern.lower()))
        else:
            matched = ip is not None and ip.version == network.version and ip in network
        if matched and negated:
            return False
        positive = positive or matched
    return positive


def _glob(pattern: str) -> str:
    """An sshd pattern (only ``*`` and ``?`` are special) as an fnmatch pattern."""
    return pattern.replace("[", "[[]")


# == the decision ========================================================================

@attrs.frozen
class KeyDecision:
    """What the authorized keys say about one offered key."""

    key: AuthorizedKey | None
    """The line that lets the client in (None: refused)."""
    reason: str


def offered_key(key_line: str) -> tuple[str, bytes]:
    """(type, blob) of an OpenSSH public key line (options and comment ignored)."""
    parts = key_line.split()
    for i, word in enumerate(parts[:-1]):
        if _is_key_type(word):
            return word, decode_key(word, parts[i + 1])
    raise KeyLineError(f"not an OpenSSH public key: {key_line[:40]!r}")


def decide(keys: Sequence[AuthorizedKey], key_line: str, remote_address: str,
           now: float) -> KeyDecision:
    """Whether ``key_line``, offered from ``remote_address`` at ``now``, is authorized."""
    try:
        key_type, blob = offered_key(key_line)
    except KeyLineError as exc:
        return KeyDecision(None, str(exc))
    reason = "key not in any authorized_keys file"
    ip = client_ip(remote_address)
    for key in keys:
        if key.blob != blob or key.key_type != key_type:
            continue
        opts = key.options
        if opts.unenforceable is not None:
            reason = f"{key.source}: {opts.unenforceable}"
        elif opts.expiry is not None and now >= opts.expiry:
            reason = f"{key.source}: key expired (expiry-time)"
        elif opts.from_patterns is not None and not match_from(opts.from_patterns, ip):
            reason = f"{key.source}: client address {ip} not allowed by from={opts.from_patterns!r}"
        else:
            return KeyDecision(key, f"{key.source}: authorized key")
    return KeyDecision(None, reason)


_TOKEN = re.compile(r"%(.?)")
TOKENS = {"%": "a literal %", "u": "the username", "h": "the user's home (auth.homeDirectory)"}
DEFAULT_HOME = "/home/%u"
"""``%h``: gateway users are not host users, so their home is this template, not passwd."""


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a valid keys-file path (unknown token), or None."""
    for match in _TOKEN.finditer(template):
        if match[1] not in TOKENS:
            return f"unknown token %{match[1]} in {template!r} (use %%, %u or %h)"
    return None


def is_template(path: str) -> bool:
    return "%" in path


def username_problem(username: str) -> str | None:
    """Why ``username`` cannot be put into a path (it could leave its directory), or None."""
    if username in ("", ".", "..") or "/" in username or "\0" in username:
        return f"username {username!r} cannot name a keys file"
    return None


def _base(template: str) -> str:
    """The directory part of ``template`` before its first token: expansions stay below."""
    head = template.split("%", 1)[0]
    return os.path.normpath(os.path.dirname(head) if "/" in head else ".")


def expand(template: str, username: str, home: str = DEFAULT_HOME) -> str:
    """``template`` with OpenSSH's ``%%``, ``%u`` and ``%h`` replaced (sshd_config(5)).

    ``%h`` is ``home`` (itself a template of ``%u`` and ``%%``). Raises
    :class:`ValueError` for a username that would leave the directory that the
    template (with ``%h`` written out) fixes before its first token: ``../x``, ``a/b``.
    """
    if (problem := username_problem(username)) is not None:
        raise ValueError(problem)
    whole = _TOKEN.sub(lambda m: home if m[1] == "h" else m[0], template)
    path = _TOKEN.sub(lambda m: username if m[1] == "u" else m[1] if m[1] == "%" else m[0],
                      whole)
    base = os.path.abspath(_base(whole))
    if os.path.commonpath([base, os.path.abspath(path)]) != base:
        raise ValueError(f"username {username!r} would leave {base}")
    return path


class AuthorizedKeysFiles:
    """The keys of several files, re-read by :meth:`reload` (e.g. on SIGHUP).

    A file that cannot be read logs an error and contributes no key (its users are
    refused) until a later reload reads it; bad lines are logged and skipped.

    A path with OpenSSH ``AuthorizedKeysFile`` tokens (``%u`` the username, ``%h`` the
    user's home -- the ``home`` template, ``/home/%u`` by default, never the host's
    passwd -- and ``%%``) is a per-user file, read at each decision for that username;
    a missing one means "no keys". A username that would take the path out of the
    directory before its first token (``..``, ``a/b``) is refused and logged.
    """

    def __init__(self, paths: Iterable[str], logger: logging.Logger | logging.LoggerAdapter[Any],
                 home: str = DEFAULT_HOME) -> None:
        self.paths = tuple(paths)
        self.home = home
        self._log = logger
        self.keys: tuple[AuthorizedKey, ...] = ()
        self.reload()

    def __repr__(self) -> str:
        return f"<AuthorizedKeysFiles files={len(self.paths)} keys={len(self.keys)}>"

    def reload(self) -> None:
        """Read every file again; the new set replaces the old one at once."""
        keys: list[AuthorizedKey] = []
        for path in self.paths:
            if not is_template(path):
                keys += self._read(path, missing_ok=False)
        self.keys = tuple(keys)

    def _read(self, path: str, *, missing_ok: bool) -> list[AuthorizedKey]:
        try:
            with open(os.path.expanduser(path), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            if missing_ok and isinstance(exc, FileNotFoundError):
                return []  # a user without a keys file has no keys
            self._log.error("cannot read authorized keys file %s: %s (its keys are refused)",
                            path, exc.strerror or exc,
                            extra={"event": "auth-config", "path": path})
            return []
        found, problems = parse_authorized_keys(text, path)
        for number, problem in problems:
            self._log.error("%s:%d: %s (line skipped)", path, number, problem,
                            extra={"event": "auth-config", "path": path})
        for key in found:
            if key.options.unenforceable is not None:
                self._log.warning("%s: %s; this key will be refused", key.source,
                                  key.options.unenforceable,
                                  extra={"event": "auth-config", "path": path})
        return found

    def user_keys(self, username: str) -> tuple[list[AuthorizedKey], str | None]:
        """The keys of the per-user (templated) files for ``username``; the refusal, if any."""
        keys: list[AuthorizedKey] = []
        for template in self.paths:
            if not is_template(template):
                continue
            try:
                path = expand(template, username, self.home)
            except ValueError as exc:
                self._log.warning("%s: refused for %s", exc, template,
                                  extra={"event": "auth-config", "path": template})
                return [], f"{exc} ({template})"
            keys += self._read(path, missing_ok=True)
        return keys, None

    def decide(self, key_line: str, remote_address: str, now: float | None = None,
               username: str | None = None) -> KeyDecision:
        keys: Sequence[AuthorizedKey] = self.keys
        if username is not None and any(is_template(p) for p in self.paths):
            mine, refusal = self.user_keys(username)
            if refusal is not None:
                return KeyDecision(None, refusal)
            keys = [*self.keys, *mine]
        return decide(keys, key_line, remote_address, time.time() if now is None else now)
