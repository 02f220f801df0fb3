"""Process measurements shared by the benchmark processes (no event loop, no imports of note).

PSS comes from ``/proc/PID/smaps_rollup`` (proportional set size: shared pages
split between the processes that map them), CPU from ``/proc/PID/stat``
(``utime + stime`` of the process, all threads, children not included).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable

TICK = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root may raise the hard limit); returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (200_000, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            continue
    return hard


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (via /proc/*/stat ppid)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def total_pss_kib(pids: Iterable[int]) -> int:
    return sum(pss_kib(p) for p in pids)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
