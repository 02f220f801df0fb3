"""Port-forward sessions after the upgrade: one TCP connection per requested port.

Theory of operation
-------------------
:class:`PortForward` announces each port on channels ``2i`` (data) and ``2i+1``
(errors) with its number as 2-byte little-endian, dials ``127.0.0.1:port`` (pods share
the host network) and copies both ways until either side ends. Dial and copy errors go
to the port's error channel as text in the kubelet's wording (errno spelled as Go does,
:func:`go_errno`). The WebSocket closes when every port is done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import trio

from .streamsession import CHUNK, ChannelSession
from .websocket import WebSocket


class PortForward(ChannelSession):
    """One port-forward WebSocket: a TCP connection per listed port."""

    def __init__(self, ports: Sequence[int], pod_uid: str, idle_timeout: float) -> None:
        super().__init__(idle_timeout)
        self.ports, self.uid = list(ports), pod_uid

    async def run(self, ws: WebSocket) -> None:
        idle = self._start(ws)
        with idle.scope, self._scope:
            for i, port in enumerate(self.ports):
                announce = port.to_bytes(2, "little")
                if not (await self._send(2 * i, announce)
                        and await self._send(2 * i + 1, announce)):
                    break
            else:
                inboxes = [trio.open_memory_channel[bytes](0) for _ in self.ports]
                async with trio.open_nursery() as session:
                    session.start_soon(self._read_loop, [send for send, _ in inboxes])
                    async with trio.open_nursery() as forwards:
                        for i, (_, inbox) in enumerate(inboxes):
                            forwards.start_soon(self._forward, i, inbox)
                    session.cancel_scope.cancel()
        await self._close()

    async def _read_loop(self, inboxes: list[trio.MemorySendChannel[bytes]]) -> None:
        try:
            while (msg := await self._receive()) is not None:
                frame = self.codec.decode(msg)
                if frame is None or frame[0] % 2 or frame[0] >= 2 * len(inboxes) or not frame[1]:
                    continue
                # a port that is done drops its data
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await inboxes[frame[0] // 2].send(frame[1])
        finally:
            for inbox in inboxes:
                inbox.close()

    async def _forward(self, i: int, inbox: trio.MemoryReceiveChannel[bytes]) -> None:
        port = self.ports[i]
        with inbox:
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            try:
                await sock.connect(("127.0.0.1", port))
            except OSError as exc:
                sock.close()
                await self._error(i, f"failed to connect to localhost:{port} inside namespace "
                                     f'"{self.uid}": dial tcp4 127.0.0.1:{port}: connect: '
                                     f"{go_errno(exc)}")
                return
            stream = trio.SocketStream(sock)
            problem: str | None = None
            async with stream, trio.open_nursery() as copies:

                async def pod_to_client() -> None:
                    nonlocal problem
                    while True:
                        try:
                            data = await stream.receive_some(CHUNK)
                        except (trio.BrokenResourceError, OSError) as exc:
                            problem = ("error copying from local connection to remote stream: "
                                       f"read: {go_errno(exc)}")
                            break
                        if not data or not await self._send(2 * i, bytes(data)):
                            break
                    copies.cancel_scope.cancel()

                async def client_to_pod() -> None:
                    nonlocal problem
                    async for data in inbox:
                        try:
                            await stream.send_all(data)
                        except (trio.BrokenResourceError, OSError) as exc:
                            problem = ("error copying from remote stream to local connection: "
                                       f"write: {go_errno(exc)}")
                            break
                    copies.cancel_scope.cancel()

                copies.start_soon(pod_to_client)
                copies.start_soon(client_to_pod)
            if problem is not None:
                await self._error(i, problem)

    async def _error(self, i: int, problem: str) -> None:
        port = self.ports[i]
        await self._send(2 * i + 1, (
            f"error forwarding port {port} to pod {self.uid}, uid : failed to execute "
            f'portforward in network namespace "/var/run/netns/cni-{self.uid}": {problem}'
        ).encode())


def go_errno(exc: BaseException) -> str:
    """Go's spelling of an errno (``connection refused``)."""
    cause = exc.__cause__ if not isinstance(exc, OSError) else exc
    code = getattr(cause, "errno", None)
    return os.strerror(code).lower() if code else str(exc) or type(exc).__name__
