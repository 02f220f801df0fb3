"""A tiny asyncssh client for the soak harness's "signal" scenario.

Runs in its own process (plain asyncio, never imports trio_asyncio):
``python -m benchmarks.soakclient PORT KEYFILE [USER]`` starts ``sleep 30`` in the
pod, sends TERM once it runs, and exits 0 if the client saw exit-signal TERM.
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh


async def main(port: int, key: str, user: str = "soak") -> int:
    async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key],
                                known_hosts=None) as conn:
        proc = await conn.create_process("echo started; exec sleep 30")
        await proc.stdout.readline()
        proc.send_signal("TERM")
        await asyncio.wait_for(proc.wait(), 20)
        return 0 if proc.exit_signal and proc.exit_signal[0] == "TERM" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]), *sys.argv[2:4])))
