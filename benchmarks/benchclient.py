"""Benchmark clients on plain asyncio: asyncssh and kubernetes-asyncio.

``python -m benchmarks.benchclient MODE JSON``

Theory of operation
-------------------
Every client runs in its own process and never imports trio or trio_asyncio
(importing trio_asyncio patches asyncio process-wide), so a client pays for
nothing but itself and the server it measures runs alone in its process. The
single argument is a JSON object of parameters; results are JSON lines on
stdout. All timestamps are ``time.monotonic()`` -- CLOCK_MONOTONIC, the same
clock in every process of the machine -- so the orchestrator can line them up
with the embedded cluster's request log.

Modes:

* ``datapath`` -- one connection: keystroke round trips on a pty (``stty raw
  -echo; exec cat``), download (``cat DATA`` to the client, SHA-256 checked),
  upload (DATA to ``sha256sum`` in the pod/host, digest checked);
* ``setup`` -- ``count`` connections one after another, each running
  ``hostname`` (in a pod this is the pod's name): connect start, auth
  complete, first byte, close time;
* ``fleet`` -- ``count`` connections at once, each with one idle shell that
  answered ``hostname``; prints a ``ready`` line, waits for a line on stdin,
  closes them all (recording each close time) and prints a ``closed`` line;
* ``kube`` -- the no-SSH baseline: kubernetes-asyncio straight to the API
  server: pod create → Ready → exec first byte, then the datapath measurements
  over one pods/exec WebSocket each.
* ``forward`` -- ``ssh -L`` throughput: a data server (``tcpdata``, its own process;
  the embedded cluster's pods share this host's network, so it is "in the pod")
  sends DATA (``D``) or takes DATA and answers its SHA-256 (``U``); measured through
  the gateway's direct-tcpip channel (asyncssh ``open_connection("localhost", PORT)``)
  and through a pods/portforward WebSocket opened straight with kubernetes-asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from typing import Any

import asyncssh

from .procstats import percentile, raise_fd_limit

MiB = 1024 * 1024
CIPHER = "aes128-gcm@openssh.com"
CHUNK = 256 * 1024
KEYS_CMD = "stty raw -echo; echo READY; exec cat"


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def ssh_connect(p: dict[str, Any]) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", p["port"], username=p.get("user", "bench"),
        client_keys=[asyncssh.read_private_key(p["key"])], known_hosts=None,
        encryption_algs=[CIPHER])


# ----------------------------------------------------------------- datapath over SSH


class _Sink(asyncssh.SSHClientSession[bytes]):
    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.output = bytearray()
        self.keep = False
        self.done = asyncio.get_running_loop().create_future()
        self.status: int | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.received += len(data)
        if self.keep:
            self.output += data
        else:
            self.digest.update(data)

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


async def ssh_download(conn: asyncssh.SSHClientConnection, data_file: str, data: bytes,
                       want: str) -> float:
    start = time.perf_counter()
    _, session = await conn.create_session(_Sink, f"cat {data_file}", encoding=None)
    await session.done
    elapsed = time.perf_counter() - start
    if session.received != len(data) or session.digest.hexdigest() != want:
        raise SystemExit(f"download corrupt: {session.received} bytes, status {session.status}")
    return len(data) / MiB / elapsed


async def ssh_upload(conn: asyncssh.SSHClientConnection, data: bytes, want: str) -> float:
    start = time.perf_counter()
    chan, session = await conn.create_session(_Sink, "sha256sum", encoding=None)
    session.keep = True
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK):
        await session.writable.wait()
        chan.write(bytes(view[offset:offset + CHUNK]))
    chan.write_eof()
    await session.done
    elapsed = time.perf_counter() - start
    if not bytes(session.output).startswith(want.encode()):
        raise SystemExit(f"upload corrupt: {bytes(session.output)!r}")
    return len(data) / MiB / elapsed


async def ssh_keystrokes(conn: asyncssh.SSHClientConnection, keys: int) -> list[float]:
    process = await conn.create_process(KEYS_CMD, term_type="xterm", encoding=None)
    await process.stdout.readuntil(b"READY\n")
    times = []
    for i in range(keys):
        byte = bytes([97 + i % 26])
        start = time.perf_counter()
        process.stdin.write(byte)
        got = await process.stdout.read(1)
        times.append(time.perf_counter() - start)
        if got != byte:
            raise SystemExit(f"keystroke echo {got!r} != {byte!r}")
    process.stdin.write(b"\x04")
    process.close()
    return times


async def datapath(p: dict[str, Any]) -> dict[str, Any]:
    data = open(p["data"], "rb").read()  # noqa: ASYNC230, SIM115 -- before any timing
    want = hashlib.sha256(data).hexdigest()
    async with await ssh_connect(p) as conn:
        await (await conn.create_process("true")).wait()  # warm up (and wait for the pod)
        times = await ssh_keystrokes(conn, p["keys"])
        emit_mark("download")
        down = await ssh_download(conn, p["data"], data, want)
        up = await ssh_upload(conn, data, want)
        return {"download_mib_s": down, "upload_mib_s": up,
                "key_p50_ms": 1000 * percentile(times, 0.5),
                "key_p99_ms": 1000 * percentile(times, 0.99)}


def emit_mark(name: str) -> None:
    """Tell the orchestrator a phase starts (it samples the server's CPU time on this line)."""
    emit({"mark": name, "t": time.monotonic()})


# ----------------------------------------------------------------- connection setup


async def one_setup(p: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    conn = await ssh_connect(p)
    t_auth = time.monotonic()
    process = await conn.create_process("hostname", encoding=None)
    first = await process.stdout.read(1)
    t_first = time.monotonic()
    rest = await process.stdout.read()
    await process.wait()
    t_close = time.monotonic()
    conn.close()
    await conn.wait_closed()
    return {"t0": t0, "t_auth": t_auth, "t_first": t_first, "t_close": t_close,
            "host": (first + rest).decode().strip()}


async def setup(p: dict[str, Any]) -> dict[str, Any]:
    results = []
    for _ in range(p["count"]):
        results.append(await one_setup(p))
        await asyncio.sleep(p.get("pause", 0.2))
    return {"connections": results}


# ----------------------------------------------------------------- concurrent idle shells


async def fleet(p: dict[str, Any]) -> None:
    raise_fd_limit()
    conns: list[asyncssh.SSHClientConnection | None] = [None] * p["count"]

    async def one(i: int) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(p.get("timeout", 600)):
                conn = await ssh_connect(p)
                conns[i] = conn
                t_auth = time.monotonic()
                process = await conn.create_process(encoding=None)  # a shell, no pty
                process.stdin.write(b"hostname\n")
                line = await process.stdout.readline()
                return {"t0": t0, "t_auth": t_auth, "t_first": time.monotonic(),
                        "host": line.decode().strip(), "error": "" if line else "no output"}
        except Exception as exc:  # counted, reported, never fatal for the fleet
            return {"t0": t0, "error": f"{type(exc).__name__}: {exc}"[:200]}

    results = await asyncio.gather(*(one(i) for i in range(p["count"])))
    emit({"ready": results})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    closes: list[float | None] = []
    for conn in conns:
        closes.append(time.monotonic() if conn is not None else None)
        if conn is not None:
            conn.close()
    await asyncio.gather(*(c.wait_closed() for c in conns if c is not None),
                         return_exceptions=True)
    emit({"closed": closes})


# ----------------------------------------------------------------- kubernetes-asyncio direct


async def kube(p: dict[str, Any]) -> dict[str, Any]:
    from kubernetes_asyncio import client, config, watch
    from kubernetes_asyncio.stream import WsApiClient

    cfg = client.Configuration()
    await config.load_kube_config(config_file=p["kubeconfig"], client_configuration=cfg)
    proto = {"sec-websocket-protocol": "v5.channel.k8s.io"}
    spec = {"containers": [{"name": "shell", "image": "busybox", "command": [
        "/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]}]}

    async with client.ApiClient(cfg) as api, WsApiClient(cfg) as ws_api:
        v1, ws_v1 = client.CoreV1Api(api), client.CoreV1Api(ws_api)

        async def exec_ws(pod: str, command: list[str], **kw: Any) -> Any:
            return await ws_v1.connect_get_namespaced_pod_exec(
                pod, "default", command=command, stdout=True, _preload_content=False,
                _headers=proto, **kw)

        async def start_pod() -> tuple[str, dict[str, float]]:
            t0 = time.monotonic()
            created = await v1.create_namespaced_pod(
                "default", {"metadata": {"generateName": "kbench-"}, "spec": spec})
            name = created.metadata.name
            async with watch.Watch() as w:
                async for event in w.stream(
                        v1.list_namespaced_pod, "default",
                        field_selector=f"metadata.name={name}",
                        resource_version=created.metadata.resource_version, timeout_seconds=60):
                    conds = event["object"].status.conditions or []
                    if any(c.type == "Ready" and c.status == "True" for c in conds):
                        w.stop()
            t_ready = time.monotonic()
            async with await exec_ws(name, ["hostname"]) as ws:
                async for msg in ws:
                    if msg.data[0] == 1 and len(msg.data) > 1:  # not the empty ready frame
                        break
                t_first = time.monotonic()
            # The orchestrator joins these with the cluster's request log (when the exec
            # request arrived) to measure the same intervals as on the gateway's side.
            return name, {"pod": name, "t0": t0, "t_ready": t_ready, "t_first": t_first,
                          "create_to_ready_ms": 1000 * (t_ready - t0),
                          "ready_to_first_byte_ms": 1000 * (t_first - t_ready)}

        setups = []
        for _ in range(p["count"]):
            name, timing = await start_pod()
            setups.append(timing)
            await v1.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        name, _ = await start_pod()
        data = open(p["data"], "rb").read()  # noqa: ASYNC230, SIM115 -- before any timing
        want = hashlib.sha256(data).hexdigest()

        # keystrokes on a tty
        times = []
        async with await exec_ws(name, ["sh", "-c", KEYS_CMD], stdin=True, tty=True) as ws:
            out = b""
            while b"READY" not in out:
                msg = await ws.receive()
                out += msg.data[1:] if msg.data[0] == 1 else b""
            await asyncio.sleep(0.05)
            for i in range(p["keys"]):
                byte = bytes([97 + i % 26])
                start = time.perf_counter()
                await ws.send_bytes(b"\x00" + byte)
                got = b""
                while not got:
                    msg = await ws.receive()
                    if msg.data[0] == 1:
                        got = msg.data[1:]
                times.append(time.perf_counter() - start)
                if not got.endswith(byte):
                    raise SystemExit(f"kube keystroke echo {got!r}")
            await ws.send_bytes(b"\x00\x04")

        # download
        digest, got_bytes = hashlib.sha256(), 0
        start = time.perf_counter()
        async with await exec_ws(name, ["cat", p["data"]]) as ws:
            async for msg in ws:
                if msg.data[0] == 1:
                    digest.update(msg.data[1:])
                    got_bytes += len(msg.data) - 1
        down = len(data) / MiB / (time.perf_counter() - start)
        if got_bytes != len(data) or digest.hexdigest() != want:
            raise SystemExit(f"kube download corrupt ({got_bytes} bytes)")

        # upload
        view = memoryview(data)
        start = time.perf_counter()
        async with await exec_ws(name, ["sha256sum"], stdin=True) as ws:
            for offset in range(0, len(data), CHUNK):
                await ws.send_bytes(b"\x00" + view[offset:offset + CHUNK])
            await ws.send_bytes(b"\xff\x00")
            out = b""
            async for msg in ws:
                if msg.data[0] == 1:
                    out += msg.data[1:]
        up = len(data) / MiB / (time.perf_counter() - start)
        if not out.startswith(want.encode()):
            raise SystemExit(f"kube upload corrupt: {out!r}")
        await v1.delete_namespaced_pod(name, "default", grace_period_seconds=0)
    return {"download_mib_s": down, "upload_mib_s": up,
            "key_p50_ms": 1000 * percentile(times, 0.5),
            "key_p99_ms": 1000 * percentile(times, 0.99),
            "setups": setups}


# ----------------------------------------------------------------- ssh -L throughput


async def tcpdata(p: dict[str, Any]) -> None:
    """The data server: ``D`` → DATA then close; ``U`` → read len(DATA), answer its digest."""
    data = open(p["data"], "rb").read()  # noqa: ASYNC230, SIM115 -- before any timing

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            what = await reader.readexactly(1)
            if what == b"D":
                view = memoryview(data)
                for offset in range(0, len(data), CHUNK):
                    writer.write(view[offset:offset + CHUNK])
                    await writer.drain()
            else:
                digest, left = hashlib.sha256(), len(data)
                while left:
                    chunk = await reader.read(min(left, CHUNK))
                    if not chunk:
                        return
                    digest.update(chunk)
                    left -= len(chunk)
                writer.write(digest.hexdigest().encode())
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    emit(server.sockets[0].getsockname()[1])
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


async def forward(p: dict[str, Any]) -> dict[str, Any]:
    from kubernetes_asyncio import client, config, watch
    from kubernetes_asyncio.stream import WsApiClient

    data = open(p["data"], "rb").read()  # noqa: ASYNC230, SIM115 -- before any timing
    want = hashlib.sha256(data).hexdigest()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.benchclient", "tcpdata", json.dumps(p),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert server.stdout is not None and server.stdin is not None
    port = int(await server.stdout.readline())
    results: dict[str, Any] = {}
    try:
        async with await ssh_connect(p) as conn:
            await (await conn.create_process("true")).wait()  # warm up (and wait for the pod)
            start = time.perf_counter()
            reader, writer = await conn.open_connection("localhost", port)
            writer.write(b"D")
            digest, got = hashlib.sha256(), 0
            while got < len(data):
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            down = len(data) / MiB / (time.perf_counter() - start)
            if got != len(data) or digest.hexdigest() != want:
                raise SystemExit(f"-L download corrupt ({got} bytes)")
            writer.close()
            start = time.perf_counter()
            reader, writer = await conn.open_connection("localhost", port)
            writer.write(b"U")
            view = memoryview(data)
            for offset in range(0, len(data), CHUNK):
                writer.write(bytes(view[offset:offset + CHUNK]))
                await writer.drain()
            answer = await reader.readexactly(64)
            up = len(data) / MiB / (time.perf_counter() - start)
            if answer.decode() != want:
                raise SystemExit(f"-L upload corrupt: {answer!r}")
            writer.close()
            results["gateway"] = {"download_mib_s": down, "upload_mib_s": up}

        cfg = client.Configuration()
        await config.load_kube_config(config_file=p["kubeconfig"], client_configuration=cfg)
        spec = {"containers": [{"name": "shell", "image": "busybox", "command": [
            "/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]}]}
        async with client.ApiClient(cfg) as api, WsApiClient(cfg) as ws_api:
            v1, ws_v1 = client.CoreV1Api(api), client.CoreV1Api(ws_api)
            created = await v1.create_namespaced_pod(
                "default", {"metadata": {"generateName": "kfwd-"}, "spec": spec})
            name = created.metadata.name
            async with watch.Watch() as w:
                async for event in w.stream(
                        v1.list_namespaced_pod, "default", field_selector=f"metadata.name={name}",
                        resource_version=created.metadata.resource_version, timeout_seconds=60):
                    conds = event["object"].status.conditions or []
                    if any(c.type == "Ready" and c.status == "True" for c in conds):
                        w.stop()

            async def portforward() -> Any:
                ws = await ws_v1.connect_get_namespaced_pod_portforward(
                    name, "default", ports=str(port), _preload_content=False)
                ws = await ws.__aenter__()
                for _ in range(2):  # the two port frames
                    await ws.receive()
                return ws

            start = time.perf_counter()
            ws = await portforward()
            await ws.send_bytes(b"\x00D")
            digest, got = hashlib.sha256(), 0
            while got < len(data):
                msg = await ws.receive()
                if msg.type is not aiohttp_binary():
                    break
                if msg.data[0] == 0:
                    digest.update(msg.data[1:])
                    got += len(msg.data) - 1
            down = len(data) / MiB / (time.perf_counter() - start)
            await ws.close()
            if got != len(data) or digest.hexdigest() != want:
                raise SystemExit(f"kube port-forward download corrupt ({got} bytes)")
            start = time.perf_counter()
            ws = await portforward()
            await ws.send_bytes(b"\x00U")
            view = memoryview(data)
            for offset in range(0, len(data), CHUNK):
                await ws.send_bytes(b"\x00" + view[offset:offset + CHUNK])
            answer = b""
            while len(answer) < 64:
                msg = await ws.receive()
                if msg.type is not aiohttp_binary():
                    break
                if msg.data[0] == 0:
                    answer += msg.data[1:]
            up = len(data) / MiB / (time.perf_counter() - start)
            await ws.close()
            if answer.decode() != want:
                raise SystemExit(f"kube port-forward upload corrupt: {answer!r}")
            await v1.delete_namespaced_pod(name, "default", grace_period_seconds=0)
            results["kube"] = {"download_mib_s": down, "upload_mib_s": up}
    finally:
        server.stdin.close()
        await server.wait()
    return results


def aiohttp_binary() -> Any:
    import aiohttp

    return aiohttp.WSMsgType.BINARY


def main() -> None:
    mode, params = sys.argv[1], json.loads(sys.argv[2])
    if mode == "fleet":
        asyncio.run(fleet(params))
        return
    if mode == "tcpdata":
        asyncio.run(tcpdata(params))
        return
    run = {"datapath": datapath, "setup": setup, "kube": kube, "forward": forward}[mode]
    emit(asyncio.run(run(params)))


if __name__ == "__main__":
    main()
