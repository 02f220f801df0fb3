"""Abuse benchmark, limits part: how much can one connection and one user get?

``python -m benchmarks.abuse_limits [--channels 1000] [--connections 200] [--json FILE]``
starts an embedded cluster and an in-process gateway with the default
:class:`~kuberun_trio.core.limits.Limits` (except the pre-auth limits, which
would drop a burst of connections from one address before the per-user limit is
reached), then, as asyncssh attacker "mallory":

* opens ``--channels`` session channels at once on one connection and counts those
  that run (goal: ``security.maxSessions`` exactly);
* opens ``--connections`` connections at once and counts those that can run a
  command (goal: ``security.maxConnectionsPerUser`` exactly).

:func:`measure` returns the numbers; the integrator's ``benchmarks.abuse`` calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
import trio
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import open_embedded_cluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.limits import Limits, MaxStartups
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway


async def _channels(port: int, key: asyncssh.SSHKey, channels: int) -> int:
    """Asyncio-flavoured: session channels that opened on one connection."""
    async with asyncssh.connect("127.0.0.1", port, username="mallory", client_keys=[key],
                                known_hosts=None) as conn:
        results = await asyncio.gather(
            *(conn.create_process("exec sleep 60") for _ in range(channels)),
            return_exceptions=True)
        opened = [r for r in results if isinstance(r, asyncssh.SSHClientProcess)]
        for proc in opened:
            proc.close()
        return len(opened)


async def _connections(port: int, key: asyncssh.SSHKey, connections: int) -> int:
    """Asyncio-flavoured: connections of one user that can run a command, opened at once."""
    async def one() -> asyncssh.SSHClientConnection | None:
        try:
            return await asyncssh.connect("127.0.0.1", port, username="mallory",
                                          client_keys=[key], known_hosts=None)
        except (asyncssh.Error, OSError):
            return None

    conns = [c for c in await asyncio.gather(*(one() for _ in range(connections))) if c]

    async def works(conn: asyncssh.SSHClientConnection) -> bool:
        try:
            result = await asyncio.wait_for(conn.run("true"), 60)
            return result.exit_status == 0
        except (asyncssh.Error, OSError, TimeoutError):
            return False

    alive = sum(await asyncio.gather(*(works(c) for c in conns)))
    for conn in conns:
        conn.close()
    return int(alive)


async def measure(channels: int = 1000, connections: int = 200,
                  limits: Limits | None = None) -> dict[str, Any]:
    """Trio-flavoured: channels per connection and connections per user achieved."""
    limits = limits or Limits(max_startups=MaxStartups.parse(str(connections * 2)),
                              max_startups_per_address=connections * 2)
    key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    with tempfile.TemporaryDirectory() as tmp:
        async with open_aio_loop(), open_embedded_cluster(
                https=True, kubeconfig_path=Path(tmp) / "kubeconfig") as cluster:
            options = GatewayOptions(
                kubernetes=parse_config({
                    "connection": {"kubeconfig": str(cluster.kubeconfig_path)},
                    "timeouts": {"podStart": "120s", "podStop": "20s"}}),
                authenticator=PublicKeyAuthenticator(
                    [key.export_public_key("openssh").decode()]),
                host_keys=(host_key.export_private_key("openssh"),), port=0,
                instance="abuse-limits", limits=limits)
            async with open_gateway(options) as gateway:
                port = gateway.address[1]
                started = time.monotonic()
                got_channels = await trio_asyncio.aio_as_trio(_channels)(port, key, channels)
                channels_s = time.monotonic() - started
                started = time.monotonic()
                got_connections = await trio_asyncio.aio_as_trio(_connections)(
                    port, key, connections)
                connections_s = time.monotonic() - started
    return {
        "channels_tried": channels, "channels_per_connection": got_channels,
        "max_sessions": limits.max_sessions, "channels_seconds": round(channels_s, 2),
        "connections_tried": connections, "connections_per_user": got_connections,
        "max_connections_per_user": limits.max_connections_per_user,
        "connections_seconds": round(connections_s, 2),
        "exact": got_channels == limits.max_sessions
        and got_connections == limits.max_connections_per_user,
    }


def report(result: dict[str, Any]) -> str:
    """The human-readable lines of :func:`measure`'s result."""
    return "\n".join([
        f"channels per connection: {result['channels_per_connection']} of "
        f"{result['channels_tried']} tried (security.maxSessions {result['max_sessions']}; "
        f"{result['channels_seconds']} s)",
        f"connections per user:    {result['connections_per_user']} of "
        f"{result['connections_tried']} tried (security.maxConnectionsPerUser "
        f"{result['max_connections_per_user']}; {result['connections_seconds']} s)",
        f"limits held exactly: {'yes' if result['exact'] else 'NO'}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse_limits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # one refusal line each would drown the result
    result = trio.run(measure, args.channels, args.connections)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    raise SystemExit(0 if result["exact"] else 1)


if __name__ == "__main__":
    main()
