"""Gateway data-path benchmark: throughput each way and keystroke round trip.

``python -m benchmarks.gateway_datapath [--mib N] [--keys K] [--cluster separate|inprocess]``

Every party runs in its own process, so that no measurement pays for another
party's CPU inside one event loop (and so that the client never imports
trio-asyncio, which patches asyncio process-wide):

* **cluster** -- ``python -m kuberun_trio embedded-cluster`` over HTTPS
  (``--cluster inprocess`` runs it inside the gateway process instead);
* **gateway** -- this module with ``--serve-gateway``: trio + trio-asyncio, the
  real :func:`~kuberun_trio.gateway.serve.open_gateway`;
* **baseline** -- this module with ``--serve-baseline``: asyncssh on plain
  asyncio running the *same commands locally* (``sh -c``, a pty when asked),
  with hand-written pumps -- what a straightforward asyncio SSH server costs;
* **client** -- :mod:`benchmarks.benchclient` ``datapath``: asyncssh on plain
  asyncio, ``aes128-gcm@openssh.com``, callback-level sessions (no stream readers).

The full side-by-side run (sshd, a direct kubernetes-asyncio exec, connection
setup, concurrency, memory, CPU) is :mod:`benchmarks.gateway`, which uses the
two servers defined here. Measured against both servers, in the same run:

* download: ``cat DATA`` (N MiB of random bytes) → client (MiB/s, SHA-256 checked);
* upload: DATA client → ``sha256sum`` in the pod (MiB/s, digest checked);
* keystrokes: ``stty raw -echo; echo READY; exec cat`` on a pty, one byte out, wait for
  its echo, K times (p50/p99 ms).

The ratios printed at the end are gateway / baseline (throughput: higher is
better; latency: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
CIPHER = "aes128-gcm@openssh.com"


# ----------------------------------------------------------------- baseline server (asyncio)


def baseline_main(key_file: str, pub_file: str) -> None:
    import asyncio
    import fcntl
    import struct
    import termios

    import asyncssh

    async def pump_out(reader: asyncio.StreamReader, writer: Any) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def pump_in(reader: Any, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        try:
            while data := await reader.read(65536):
                proc.stdin.write(data)
                await proc.stdin.drain()
        finally:
            proc.stdin.close()

    async def run_pty(process: asyncssh.SSHServerProcess[bytes]) -> None:
        master, slave = os.openpty()
        width, height, _, _ = process.get_terminal_size()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", process.command or "exec sh", stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, env={**os.environ, "TERM": process.get_terminal_type() or ""})
        os.close(slave)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if data and not process.is_closing():
                process.stdout.write(data)
            else:
                loop.remove_reader(master)

        loop.add_reader(master, readable)
        try:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.TerminalSizeChanged:
                    continue
                if not data:
                    break
                os.write(master, data)
            await proc.wait()
        finally:
            loop.remove_reader(master)
            os.close(master)
        process.exit(proc.returncode or 0)

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.get_terminal_type():
            await run_pty(process)
            return
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", process.command or "exec sh", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        feeder = asyncio.ensure_future(pump_in(process.stdin, proc))
        await asyncio.gather(pump_out(proc.stdout, process.stdout),
                             pump_out(proc.stderr, process.stderr))
        code = await proc.wait()
        feeder.cancel()
        process.exit(code)

    async def main() -> None:
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0,
            server_host_keys=[asyncssh.read_private_key(key_file)],
            authorized_client_keys=pub_file, process_factory=handle, encoding=None,
            line_editor=False, encryption_algs=[CIPHER])
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())


# ----------------------------------------------------------------- gateway server (trio)


def gateway_main(key_file: str, pub_file: str, kubeconfig: str | None,
                 kube_config: dict[str, Any] | None = None, metrics: bool = False,
                 record: str | None = None) -> None:
    """Serve the real gateway; print the port; run until stdin closes.

    ``kube_config`` is merged into the ``kubernetes:`` section (e.g. API qps, timeouts).
    With ``metrics`` the metrics endpoint is served too (127.0.0.1, a free port printed
    on a second line); ``record`` turns session recording on, into that directory.
    """
    import trio

    from kuberun_trio.aio.bridge import open_aio_loop
    from kuberun_trio.core.auth import PublicKeyAuthenticator
    from kuberun_trio.core.config import parse_config
    from kuberun_trio.core.forwarding import ForwardingPolicy
    from kuberun_trio.gateway.serve import GatewayOptions, open_gateway
    from kuberun_trio.observe import MetricsEndpoint
    from kuberun_trio.recording import RecordingOptions

    from .procstats import raise_fd_limit
    from .soak import BENCH_LIMITS

    raise_fd_limit()
    public_key, host_key = Path(pub_file).read_text(), Path(key_file).read_bytes()
    extra = dict(kube_config or {})

    async def serve(path: str) -> None:
        section = {**extra, "connection": {**extra.get("connection", {}), "kubeconfig": path}}
        options = GatewayOptions(
            kubernetes=parse_config(section),
            authenticator=PublicKeyAuthenticator([public_key]),
            host_keys=(host_key,), port=0, instance="bench-rec" if record else "bench",
            limits=BENCH_LIMITS, forwarding=ForwardingPolicy(enabled=True),  # ssh -L runs
            metrics_endpoint=MetricsEndpoint("127.0.0.1", 0) if metrics else None,
            recording=RecordingOptions(record, stdin=True) if record else None)
        async with open_gateway(options) as gateway:
            print(gateway.address[1], flush=True)
            if gateway.endpoints.metrics is not None:
                print(gateway.endpoints.metrics[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

    async def main() -> None:
        async with open_aio_loop():
            if kubeconfig is not None:
                await serve(kubeconfig)
                return
            from kuberun_trio.cluster import open_embedded_cluster

            with tempfile.TemporaryDirectory() as tmp:
                async with open_embedded_cluster(kubeconfig_path=Path(tmp) / "kubeconfig") as c:
                    await serve(str(c.kubeconfig_path))

    trio.run(main)


# ----------------------------------------------------------------- orchestration


def _start(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, **kw)


def _measure(server_args: list[str], key: str, data: str, keys: int) -> dict[str, Any]:
    server = _start(["-m", "benchmarks.gateway_datapath", *server_args])
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        params = {"port": port, "key": key, "data": data, "keys": keys}
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.benchclient", "datapath", json.dumps(params)],
            check=True, stdout=subprocess.PIPE, text=True).stdout
        result: dict[str, Any] = json.loads(out.splitlines()[-1])
        return result
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def orchestrate(mib: int, keys: int, cluster_mode: str) -> None:
    import asyncssh  # key generation only; this process runs no event loop

    with tempfile.TemporaryDirectory() as tmp:
        key, host, pub = (str(Path(tmp) / n) for n in ("client", "host", "client.pub"))
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        Path(key).write_bytes(client_key.export_private_key("openssh"))
        Path(pub).write_bytes(client_key.export_public_key("openssh"))
        Path(host).write_bytes(asyncssh.generate_private_key("ssh-ed25519")
                               .export_private_key("openssh"))
        data = str(Path(tmp) / "data")
        Path(data).write_bytes(os.urandom(mib * MiB))
        cluster = None
        kubeconfig: list[str] = []
        if cluster_mode == "separate":
            cfg = str(Path(tmp) / "kubeconfig")
            cluster = _start(["-m", "kuberun_trio", "embedded-cluster", "--kubeconfig-out", cfg])
            assert cluster.stdout is not None
            cluster.stdout.readline()
            kubeconfig = ["--kubeconfig", cfg]
        try:
            baseline = _measure(["--serve-baseline", host, pub], key, data, keys)
            gateway = _measure(["--serve-gateway", host, pub, *kubeconfig], key, data, keys)
        finally:
            if cluster is not None:
                cluster.terminate()
                cluster.wait(60)
    print(f"{mib} MiB each way, {keys} keystrokes, cipher {CIPHER}, cluster {cluster_mode}")
    print(f"{'':18}{'gateway':>10}{'baseline':>10}{'ratio':>8}")
    for name in ("download_mib_s", "upload_mib_s", "key_p50_ms", "key_p99_ms"):
        g, b = gateway[name], baseline[name]
        print(f"{name:18}{g:10.2f}{b:10.2f}{g / b:8.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-baseline"]:
        baseline_main(argv[1], argv[2])
    elif argv[:1] == ["--serve-gateway"]:
        kube = json.loads(argv[argv.index("--kube-config") + 1]) if "--kube-config" in argv \
            else None
        record = argv[argv.index("--record") + 1] if "--record" in argv else None
        gateway_main(argv[1], argv[2], argv[4] if argv[3:4] == ["--kubeconfig"] else None, kube,
                     metrics="--metrics" in argv, record=record)
    else:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_datapath")
        parser.add_argument("--mib", type=int, default=512, help="MiB each way (default 512)")
        parser.add_argument("--keys", type=int, default=500, help="keystrokes (default 500)")
        parser.add_argument("--cluster", choices=("separate", "inprocess"), default="separate",
                            help="run the embedded cluster in its own process (default)")
        args = parser.parse_args(argv)
        orchestrate(args.mib, args.keys, args.cluster)


if __name__ == "__main__":
    main()
