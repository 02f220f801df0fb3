"""Process plumbing for the pod sandboxes: ``/proc`` reads and pre-spawn checks.

Theory of operation
-------------------
Small helpers with no state. The ``/proc`` readers (:func:`children`, :func:`descendants`,
:func:`parent_pid`, :func:`process_group`, :func:`readlink`, :func:`scan_proc`) return
an empty/None answer for a process that is gone, since every caller races with exits.
:func:`descendants` walks the process tree from a few roots: its cost grows with the
size of that subtree, where :func:`scan_proc` reads every process of the host (with a
thousand pods, tens of thousands of ``/proc`` reads per call).
:func:`inner_pid` finds the one child that ``unshare``/``nsenter`` forks (the process
that really runs), polling :func:`children` with a short backoff.
:func:`check_exec` resolves the executable and working directory *before* spawning, so
a missing one gets runc's wording (as a real runtime reports it) rather than an exit
code from the helper.
"""

from __future__ import annotations

import os
from typing import Any

import trio


async def inner_pid(outer: trio.Process) -> int | None:
    """The PID of the one child that ``unshare``/``nsenter`` forks (None if it is gone).

    Shielded: it takes a millisecond or so, and giving up half-way would leak the child.
    """
    delay = 0.0002
    with trio.CancelScope(shield=True):
        while True:
            kids = children(outer.pid)
            if kids:
                return kids[0]
            if outer.poll() is not None:
                return None
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)
    return None  # not reached: the shielded loop only ends by returning



def children(pid: int) -> list[int]:
    """PIDs of the children of ``pid`` ([] if it is gone), from every thread's ``children``
    file (a child forked by any thread is listed under that thread)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return kids


def descendants(roots: list[int]) -> list[int]:
    """``roots`` (those still alive) and every process below them."""
    found: list[int] = []
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.add(pid)
        found.append(pid)
        todo.extend(children(pid))
    return found


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    """The parent PID of ``pid`` (None if gone)."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def process_group(pid: int) -> int | None:
    """The process group of ``pid`` (None if gone)."""
    fields = stat_fields(pid)
    return int(fields[2]) if fields else None


def readlink(path: str) -> str | None:
    """``os.readlink(path)``, or None if that fails."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def scan_proc(match: Any) -> list[int]:
    """Every PID in ``/proc`` for which ``match(pid)`` is true."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and match(int(entry)):
            pids.append(int(entry))
    return pids


def check_exec(name: str, path: str, root: str | None, cwd: str) -> str | None:
    """runc's complaint about running ``name`` in ``cwd`` under ``root``, or None if fine."""

    def host(p: str) -> str:
        return os.path.join(root, p.lstrip("/")) if root else p

    if not os.path.isdir(host(cwd)):
        return f'chdir to cwd ("{cwd}") set in config.json failed: no such file or directory'

    def runnable(p: str) -> bool:
        real = host(p if os.path.isabs(p) else os.path.join(cwd, p))
        if os.path.islink(real):
            return True  # may point inside the root: let the helper decide
        return os.path.isfile(real) and os.access(real, os.X_OK)

    if "/" in name:
        return None if runnable(name) else f'exec: "{name}": stat {name}: no such file or directory'
    for directory in path.split(":"):
        if runnable(os.path.join(directory or ".", name)):
            return None
    return f'exec: "{name}": executable file not found in $PATH'
