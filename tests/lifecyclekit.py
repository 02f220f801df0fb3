"""Test support for the connection-lifecycle tests: a stalling TCP proxy and leak counters.

:class:`StallProxy` sits between the gateway and a plain-HTTP embedded cluster and can hold
traffic on purpose -- a DELETE that never reaches the server (a hanging API server), a
create whose response never comes back (the pod exists, the gateway does not know its
name), an exec upgrade whose 101 never arrives (mid-handshake). Everything else is copied
through unchanged.

:func:`snapshot` counts what must not outlive a connection: trio tasks, asyncio tasks,
open file descriptors and child processes of this process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import attrs
import psutil
import trio


@attrs.define
class Rule:
    """Hold the direction ``to`` ("server" or "client") of connections whose request
    bytes contain ``needle``, until ``release`` is set."""

    needle: bytes
    to: str
    release: trio.Event = attrs.Factory(trio.Event)
    hits: int = 0
    hit: trio.Event = attrs.Factory(trio.Event)


@attrs.define
class Tracked:
    """One tracked connection: its first request line, and when its client side was
    done (trio time, taken as the proxy read the client's EOF; None while open)."""

    request: bytes
    closed_at: float | None = None


@attrs.define
class Track:
    """The connections whose request bytes contain ``needle``."""

    needle: bytes
    connections: list[Tracked] = attrs.Factory(list)

    def about(self, fragment: str) -> list[Tracked]:
        return [c for c in self.connections if fragment.encode() in c.request]


class StallProxy:
    """A TCP proxy to ``upstream`` (host, port); add :class:`Rule` s to stall traffic."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.tracks: list[Track] = []
        self.port = 0
        self.open_connections = 0
        self.held_open = 0
        """Connections open now on which a rule held traffic."""

    def stall(self, needle: bytes, to: str = "server") -> Rule:
        rule = Rule(needle, to)
        self.rules.append(rule)
        return rule

    def track(self, needle: bytes) -> Track:
        track = Track(needle)
        self.tracks.append(track)
        return track

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.open_connections += 1
        try:
            async with client, await trio.open_tcp_stream(*self.upstream) as server:
                held: list[Rule] = []
                tags: list[Tracked] = []
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, "server", held, tags,
                                           nursery)
                        nursery.start_soon(self._pump, server, client, "client", held, tags,
                                           nursery)
                finally:
                    if held:
                        self.held_open -= 1
        finally:
            self.open_connections -= 1

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, to: str,
                    held: list[Rule], tags: list[Tracked], nursery: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(65536):
                if to == "server":
                    for track in self.tracks:
                        if track.needle in data and not tags:
                            tags.append(Tracked(data.split(b"\r\n", 1)[0]))
                            track.connections.append(tags[-1])
                    for rule in self.rules:
                        if rule.needle in data and not rule.release.is_set():
                            if not held:
                                self.held_open += 1
                            rule.hits += 1
                            rule.hit.set()
                            held.append(rule)
                for rule in held:
                    if rule.to == to:
                        await rule.release.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if to == "server":  # the client side is done (EOF, error, or we were cancelled)
                for tracked in tags:
                    tracked.closed_at = trio.current_time()
        nursery.cancel_scope.cancel()  # one side gone: drop both


@attrs.frozen
class Snapshot:
    trio_tasks: frozenset[str]
    """Every trio task but the API server's per-HTTP-connection handlers."""
    http_handlers: int
    io_tasks: int
    """trio-asyncio's reader/writer tasks (one per fd asyncio watches)."""
    """The API server's per-connection handler tasks (one per open client connection)."""
    asyncio_tasks: int
    fds: int
    """Open file descriptors other than TCP sockets."""
    tcp: frozenset[tuple[tuple[str, int], tuple[str, int] | tuple[()], str]]
    """(local, remote, status) of every TCP socket."""
    children: frozenset[int]

    def keepalive_pairs(self, api_port: int) -> int:
        """Established client→API-server connections whose server end is also ours."""
        ends = {(tuple(local), tuple(remote)) for local, remote, st in self.tcp
                if st == "ESTABLISHED"}
        return sum(1 for local, remote in ends
                   if remote and remote[1] == api_port and (remote, local) in ends)


def _trio_tasks() -> list[trio.lowlevel.Task]:
    found: list[trio.lowlevel.Task] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        found.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


def snapshot() -> Snapshot:
    """What this process holds right now."""
    try:
        aio = len(asyncio.all_tasks())
    except RuntimeError:
        aio = 0
    me = psutil.Process()
    tasks = [f"{t.name}#{id(t)}" for t in _trio_tasks()]
    # The gateway's shared pod watch (gateway/podwatch.py) lives as long as the gateway;
    # on the cluster's side its stream re-spawns helper tasks at every event or bookmark.
    # Count those by name (a leaked per-connection watch still shows as one more).
    churn = "kuberun_trio.cluster.watch.Watch._next_event."
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.startswith(churn):
            name = task.split("#", 1)[0]
            seen[name] = seen.get(name, 0) + 1
            tasks[i] = f"{name}#{seen[name]}"
    handler = "trio._highlevel_serve_listeners._run_handler#"
    io = "trio_asyncio.BaseTrioEventLoop._io_task#"
    proxy = "lifecyclekit."
    conns = me.net_connections(kind="tcp")
    return Snapshot(
        trio_tasks=frozenset(t for t in tasks if not t.startswith((handler, io, proxy))),
        http_handlers=sum(t.startswith(handler) for t in tasks),
        io_tasks=sum(t.startswith(io) for t in tasks),
        asyncio_tasks=aio,
        fds=len(os.listdir("/proc/self/fd")) - len(conns),
        tcp=frozenset((tuple(c.laddr), tuple(c.raddr), c.status) for c in conns),
        children=frozenset(p.pid for p in me.children(recursive=True)),
    )


async def settle(check: Callable[[], Any], within: float = 10.0) -> None:
    """Wait until ``check()`` is truthy (polling), failing after ``within`` seconds."""
    with trio.fail_after(within):
        while not check():
            await trio.sleep(0.05)
