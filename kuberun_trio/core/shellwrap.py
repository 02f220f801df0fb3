"""The POSIX-sh wrappers that carry env and signals through pods/exec.

Theory of operation
-------------------
The Kubernetes exec API takes an argv and four booleans, nothing else: no
environment, no signals. sshd does both, so every session exec runs a tiny
wrapper script first (:data:`WRAPPER_SCRIPT`, via ``/bin/sh -c``)::

    /bin/sh -c WRAPPER kuberun PIDFILE... -- NAME=VALUE... -- COMMAND ARGV...

The wrapper

1. writes its own PID (``$$``) to the first PID-file candidate it can write
   (``/tmp``, then ``/dev/shm``, then ``/var/tmp`` by default: a pod whose
   ``/tmp`` is read-only usually still has a writable ``/dev/shm``). If no
   candidate is writable it goes on silently; signals for that session then
   find no PID and fail (the signal exec exits 3);
2. ``export``\\ s every ``NAME=VALUE`` argument -- each one is a single argv
   element expanded as ``"$1"``, so quotes, newlines, ``$(...)`` and backticks
   are never parsed by any shell;
3. runs the real command argv and waits for it, then removes the PID file and
   ends the way the command ended (its exit code; a death by signal N is passed on
   by killing itself with N -- without a core dump of its own -- so the runtime
   reports the signal as before). While it waits it catches the SSH signals with
   an empty trap (a caught signal is reset to the default in the command), so a
   signal to the session's process group reaches the command and the wrapper
   survives to clean up. Where the wrapper is not a
   process-group leader (a runtime that does not ``setsid``), or no PID file could
   be written, it ``exec``\\ s the command instead, as before: then the PID in the
   file is the command's own and the file stays.

Signals (RFC 4254 ``signal`` requests) are a second pods/exec into the same
container running :data:`SIGNAL_SCRIPT`::

    /bin/sh -c SIGNAL_SCRIPT kuberun-signal TERM PIDFILE...

It reads the first non-empty PID file with the ``read`` builtin and runs
``kill -s TERM -- -PID`` (the process group, like sshd's ``killpg``), falling
back to ``kill -s TERM PID`` when PID is not a process-group leader. Only names
from :data:`SSH_SIGNALS` are ever passed, and they travel as argv elements too.

Limits of the mechanism, on purpose and documented:

* Both execs must land in the same container (same PID namespace and the same
  ``/tmp``); the session machine always passes the same ``container``.
* The process-group kill relies on the runtime making every exec process a
  session leader (runc/crun call ``setsid`` for every process they start, tty
  or not; the embedded sandbox must do the same). Where it is not a leader,
  only the PID itself is signalled: for SSH ``exec`` requests that is the
  ``/bin/sh -c COMMAND`` process, and dash does not ``exec`` the last command,
  so the command may survive a TERM sent to its shell.
* PID files: removed by the wrapper when the command ends (``rm -f``; an image
  without ``rm`` gets the file truncated, so no stale PID is read). A SIGKILL to
  the whole group (SSH ``KILL``, or the runtime) kills the wrapper too and leaves
  the file; the session machine only signals between "started" and "exited", and
  session ids are unique within a pod's lifetime, so a stale file is never read.
* One ``/bin/sh`` process per session stays resident beside the command. A
  command that itself exits with 128+N (N an SSH signal) is reported as killed
  by N, as a shell reports it.
* The image needs a POSIX ``/bin/sh`` (``printf``, ``export``, ``read``,
  ``kill`` are builtins of dash, bash, busybox ash); no agent binary.
* Shells that make some variables read-only (bash: ``UID``, ``EUID``, ``PPID``,
  ``SHELLOPTS``, ``BASHOPTS``, ``BASH_VERSINFO``) exit on ``export`` of them;
  the session machine refuses those names (:data:`READONLY_SHELL_VARIABLES`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

WRAPPER_SCRIPT: Final = """\
__kuberun_pid=
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
  if [ -z "$__kuberun_pid" ] && { printf '%s\\n' "$$" >"$1"; } 2>/dev/null; then
    __kuberun_pid=$1
  fi
  shift
done
readonly __kuberun_pid
[ "$#" -gt 0 ] || exit 125
shift
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
  export "$1" || exit 125
  shift
done
[ "$#" -gt 1 ] || exit 125
shift
if [ -z "$__kuberun_pid" ] || ! kill -s 0 -- "-$$" 2>/dev/null; then
  exec "$@"
fi
trap : HUP INT QUIT PIPE ALRM TERM USR1 USR2
"$@"
__kuberun_status=$?
{ rm -f -- "$__kuberun_pid" || : >"$__kuberun_pid"; } 2>/dev/null
case $__kuberun_status in 129|130|131|132|134|136|137|139|138|140|141|142|143)
  trap - HUP INT QUIT PIPE ALRM TERM USR1 USR2
  ulimit -c 0 2>/dev/null
  kill -s "$(kill -l "$__kuberun_status")" "$$"
esac
exit "$__kuberun_status"
"""
"""Records ``$$``, exports ``NAME=VALUE`` arguments, runs the command and removes the
PID file when it ends (a process-group leader; otherwise it ``exec``\\ s the command).
Exits 125 on malformed arguments; a command that cannot be run gives the shell's usual
126/127; a command killed by signal N kills the wrapper with N."""

SIGNAL_SCRIPT: Final = """\
s=$1
shift
for f do
  p=
  { read -r p <"$f"; } 2>/dev/null
  case $p in ''|0*|*[!0-9]*) continue ;; esac
  kill -s "$s" -- "-$p" 2>/dev/null || kill -s "$s" "$p"
  exit
done
echo "kuberun: no process to signal" >&2
exit 3
"""
"""Signals the process group recorded in the first usable PID file. Exits 0
when delivered, 1 when ``kill`` failed, 3 when no PID file was found."""

WRAPPER_ARGV0: Final = "kuberun"
SIGNAL_ARGV0: Final = "kuberun-signal"

SSH_SIGNALS: Final[dict[str, int]] = {
    "HUP": 1,
    "INT": 2,
    "QUIT": 3,
    "ILL": 4,
    "ABRT": 6,
    "FPE": 8,
    "KILL": 9,
    "USR1": 10,
    "SEGV": 11,
    "USR2": 12,
    "PIPE": 13,
    "ALRM": 14,
    "TERM": 15,
}
"""The RFC 4254 §6.10 signal names, with their Linux numbers (a container's
exit code for a death by signal N is 128 + N)."""

SIGNAL_BY_NUMBER: Final[dict[int, str]] = {n: name for name, n in SSH_SIGNALS.items()}

READONLY_SHELL_VARIABLES: Final = frozenset(
    {"BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID", "__kuberun_pid"}
)
"""Names that some ``/bin/sh`` implementations (bash) refuse to ``export``, and the
wrapper's own read-only ``__kuberun_pid``."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SEPARATOR: Final = "--"


def valid_env_name(name: str) -> bool:
    """True if ``name`` is a portable environment variable name."""
    return _ENV_NAME.fullmatch(name) is not None


def argv_safe(text: str) -> bool:
    """True if ``text`` can be one argv element: no NUL, encodable as UTF-8."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape)
        return False
    return True


def wrap_argv(
    pid_files: Sequence[str],
    env: Iterable[tuple[str, str]],
    command: Sequence[str],
    *,
    shell: str = "/bin/sh",
) -> tuple[str, ...]:
    """The pods/exec argv that records the PID, exports ``env`` and runs ``command``.

    Raises :class:`ValueError` for arguments the wrapper cannot carry (the
    session machine refuses such requests before it gets here).
    """
    if not command:
        raise ValueError("empty command")
    for path in pid_files:
        if not path.startswith("/") or not argv_safe(path):
            raise ValueError(f"pid file must be an absolute path: {path!r}")
    assignments = []
    for name, value in env:
        if not valid_env_name(name) or not argv_safe(value):
            raise ValueError(f"invalid environment variable {name!r}")
        assignments.append(f"{name}={value}")
    for arg in command:
        if not argv_safe(arg):
            raise ValueError(f"invalid command argument {arg!r}")
    return (
        shell,
        "-c",
        WRAPPER_SCRIPT,
        WRAPPER_ARGV0,
        *pid_files,
        _SEPARATOR,
        *assignments,
        _SEPARATOR,
        *command,
    )


def signal_argv(
    signal: str, pid_files: Sequence[str], *, shell: str = "/bin/sh"
) -> tuple[str, ...]:
    """The pods/exec argv that delivers SSH signal ``signal`` (e.g. ``"TERM"``)."""
    if signal not in SSH_SIGNALS:
        raise ValueError(f"not an SSH signal name: {signal!r}")
    if not pid_files:
        raise ValueError("no pid files")
    return (shell, "-c", SIGNAL_SCRIPT, SIGNAL_ARGV0, signal, *pid_files)


def pid_file_candidates(directories: Sequence[str], session_id: str) -> tuple[str, ...]:
    """PID-file paths for one session, one per directory, in order of preference."""
    return tuple(f"{d.rstrip('/')}/.kuberun-{session_id}.pid" for d in directories)
