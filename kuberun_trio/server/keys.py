"""SSH keys on disk: load host keys, generate ed25519 keys, fingerprints, known_hosts lines.

Theory of operation
-------------------
Pure functions over bytes and files, built on ``cryptography`` (no asyncio: the server's
CLI checks keys before any event loop exists). Private keys are accepted in the OpenSSH
format (``-----BEGIN OPENSSH PRIVATE KEY-----``) and in PEM (PKCS#1, PKCS#8, SEC1), neither
encrypted. Fingerprints are OpenSSH's: ``SHA256:`` + unpadded base64 of the SHA-256 of the
public key blob, the same string ``ssh-keygen -lf`` and the ``ssh`` client print.

Files are written with :func:`write_private` -- created with mode 0600 from the start (never
chmod-ed after the secret is on disk) and replaced atomically.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

SSHPrivateKey = PrivateKeyTypes


def load_private_key(data: bytes) -> SSHPrivateKey:
    """An OpenSSH or PEM private key; raises ``ValueError`` for anything else."""
    stripped = data.lstrip()
    try:
        if stripped.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            return serialization.load_ssh_private_key(stripped, password=None)
        return serialization.load_pem_private_key(stripped, password=None)
    except (TypeError, ValueError) as exc:  # TypeError: encrypted, no password given
        raise ValueError(str(exc) or type(exc).__name__) from exc
    except Exception as exc:  # cryptography's UnsupportedAlgorithm
        raise ValueError(str(exc) or type(exc).__name__) from exc


def public_key_line(key: SSHPrivateKey, comment: str = "") -> str:
    """The OpenSSH public key line (``ssh-ed25519 AAAA... comment``)."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}" if comment else line


def fingerprint(key: SSHPrivateKey) -> str:
    """OpenSSH's SHA256 fingerprint of the key's public half."""
    blob = base64.b64decode(public_key_line(key).split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def generate_ed25519() -> bytes:
    """A new ed25519 private key in the OpenSSH format."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())


def known_hosts_line(host: str, port: int, key: SSHPrivateKey) -> str:
    """A ``known_hosts`` line for ``key`` at ``host:port`` (``[host]:port`` unless port 22)."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public_key_line(key)}"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_private_key(path: Path) -> tuple[SSHPrivateKey, bool]:
    """The private key at ``path``; a new ed25519 one (mode 0600) if the file does not exist.

    Returns (key, created). An existing file that is not a key raises ``ValueError``.
    """
    if path.exists():
        return load_private_key(path.read_bytes()), False
    data = generate_ed25519()
    write_private(path, data)
    return load_private_key(data), True
