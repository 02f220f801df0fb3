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


async def test_request_log_shows_execs_closed_before_delete(tmp_path: Path) -> None:
    """The contract read from the embedded cluster's request log alone."""
    async with open_rig(tmp_path) as rig:
        conn = await rig.connect()

        async def start_two() -> list[object]:
            # Two idle streams and one pushing output nobody reads: the gateway completes
            # each WebSocket close handshake before it deletes the pod, so the cluster has
            # logged every exec-close by the time the DELETE arrives.
            procs = [await conn.create_process("sleep 30") for _ in range(2)]
            procs.append(await conn.create_process("cat /dev/zero"))
            return procs

        await trio_asyncio.aio_as_trio(start_two)()
        pod = rig.pods()[0]["metadata"]["name"]
        with trio.fail_after(10):
            while sum(e.kind == "exec-open"
                      for e in rig.cluster.request_log.for_pod("default", pod)) < 3:
                await trio.sleep(0.02)
        conn.close()
        with trio.fail_after(15):
            while rig.pods():
                await trio.sleep(0.05)
        entries = rig.cluster.request_log.for_pod("default", pod)
        closes = [e for e in entries if e.kind == "exec-close"]
        deletes = [e for e in entries if e.kind == "http" and e.method == "DELETE"]
        assert len(closes) == 3 and len(deletes) == 1
        text = "\n".join(f"{e.seq} {e.kind} {e.method} {e.path.rsplit('/', 1)[-1][:40]} "
                         f"received={e.received:.4f} time={e.time:.4f}" for e in entries)
        assert max(e.time for e in closes) < deletes[0].received, text
