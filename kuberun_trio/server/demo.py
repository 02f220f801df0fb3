"""The state directory: the keys the server generates once and reuses, and the demo banner.

Theory of operation
-------------------
``--state-dir`` (default ``$XDG_STATE_HOME/kuberun-trio``, else
``~/.local/state/kuberun-trio``; mode 0700) holds what must survive restarts::

    host_ed25519          host key, generated when no host key is configured (0600)
    client_ed25519(.pub)  demo mode: the client key the printed ssh command uses (0600)
    authorized_keys       demo mode: authorizes client_ed25519.pub
    known_hosts           demo mode: the host key at the listening address, so that
                          ssh's StrictHostKeyChecking works without a prompt
    embedded-kubeconfig   demo mode: the kubeconfig of the in-process embedded cluster
    lock                  demo mode: held (``flock``) by the running demo, holds its PID

Keys are generated only when their file is missing, so the printed ``ssh`` command stays
valid across restarts. A demo takes the ``lock`` before it touches anything else there
(:meth:`StateDir.lock`), so a second demo on the same directory stops at once -- before it
could rewrite the first one's ``embedded-kubeconfig`` -- and says which PID holds it. The
kernel drops an ``flock`` with its process, so a killed demo leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from ..errors import KuberunError
from .keys import SSHPrivateKey, ensure_private_key, known_hosts_line, public_key_line


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/kuberun-trio``, or ``~/.local/state/kuberun-trio``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return Path(base) / "kuberun-trio"


@attrs.frozen
class StateDir:
    """The files of one state directory."""

    path: Path

    @property
    def host_key(self) -> Path:
        return self.path / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.path / "client_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.path / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    @property
    def kubeconfig(self) -> Path:
        return self.path / "embedded-kubeconfig"

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    def lock(self) -> int:
        """Take the directory's lock for this process; returns its fd (close it to release).

        Raises :class:`KuberunError` naming the holder's PID if another process has it.
        """
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KuberunError(
                f"a demo is already running (pid {holder}) with the state directory "
                f"{self.path}; use --state-dir and --listen for another") from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def create(self) -> None:
        """Make the directory (mode 0700) if it does not exist."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def ensure_host_key(self) -> tuple[SSHPrivateKey, bool]:
        """The generated host key; (key, True) if it was made just now."""
        self.create()
        return ensure_private_key(self.host_key)

    def ensure_client_key(self) -> SSHPrivateKey:
        """The demo client key; writes its ``.pub`` and authorizes it in ``authorized_keys``."""
        self.create()
        key, _ = ensure_private_key(self.client_key)
        line = public_key_line(key, "kuberun-trio-demo")
        self.client_key.with_name(self.client_key.name + ".pub").write_text(line + "\n")
        existing = (self.authorized_keys.read_text().splitlines()
                    if self.authorized_keys.exists() else [])
        identity = line.split()[:2]
        if not any(entry.split()[:2] == identity for entry in existing):
            with self.authorized_keys.open("a") as f:
                f.write(line + "\n")
        return key

    def write_known_hosts(self, host: str, port: int, keys: Iterable[SSHPrivateKey]) -> None:
        """Replace ``known_hosts`` with the host keys at ``host:port``."""
        self.create()
        lines = [known_hosts_line(host, port, key) for key in keys]
        self.known_hosts.write_text("".join(line + "\n" for line in lines))


def connect_host(listen_host: str) -> str:
    """The address a local client dials for a listener bound to ``listen_host``."""
    if listen_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if listen_host == "::" else listen_host


def ssh_command(state: StateDir, host: str, port: int, user: str = "user") -> str:
    """The exact ``ssh`` command that connects with the demo client key."""
    words = ["ssh", "-i", str(state.client_key), "-p", str(port),
             "-o", f"UserKnownHostsFile={state.known_hosts}", f"{user}@{host}"]
    return shlex.join(words)
