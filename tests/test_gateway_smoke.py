"""First light: an asyncssh client runs a command in its connection's pod."""

from __future__ import annotations

from pathlib import Path

import trio
import trio_asyncio
from gatewaykit import open_rig


async def test_exec_hello(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def run() -> tuple[str, str, int | None]:
            r = await conn.run("echo hello; echo err >&2; hostname; exit 3")
            return str(r.stdout), str(r.stderr), r.exit_status

        out, err, status = await trio_asyncio.aio_as_trio(run)()
        pods = rig.pods()
        assert len(pods) == 1
        assert out == f"hello\n{pods[0]['metadata']['name']}\n"
        assert err == "err\n" and status == 3
        conn.close()
        await trio_asyncio.aio_as_trio(conn.wait_closed)()
        with trio.fail_after(10):
            while rig.pods():
                await trio.sleep(0.05)
