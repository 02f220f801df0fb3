"""Port-forward sessions after the upgrade: one TCP connection per requested port.

Theory of operation
-------------------
:class:`PortForward` serves the WebSocket (``v4.channel.k8s.io``) protocol: it announces
each port on channels ``2i`` (data) and ``2i+1`` (errors) with its number as 2-byte
little-endian, dials the pod's port (:func:`dial_pod`) and copies both ways until either
side ends. Dial and copy errors go to the port's error channel as text in the kubelet's
wording (:func:`forward_error`, errno spelled as Go does, :func:`go_errno`). The
WebSocket closes when every port is done. When the pod's sandbox stops (the pod
finished, was evicted or deleted) every forward ends, as the pod network goes away.

The SPDY protocol (kubectl's) lives in :mod:`.spdyforward` and shares the dialing and
the error texts.

Dialing is containerd's (``pkg/cri/server/sandbox_portforward_linux.go``): ``localhost``
over tcp4, then tcp6; when both fail the error names both. Pods share the host's
network here, so the port is dialled on the host's loopback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from .streamsession import CHUNK, ChannelSession
from .websocket import WebSocket


class PortForward(ChannelSession):
    """One port-forward WebSocket: a TCP connection per listed port."""

    def __init__(self, ports: Sequence[int], pod_uid: str, idle_timeout: float,
                 sandbox_stopped: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(idle_timeout)
        self.ports, self.uid = list(ports), pod_uid
        self.sandbox_stopped = sandbox_stopped
        """Returns once the pod's sandbox stops: every forward then ends."""

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
                        if self.sandbox_stopped is not None:
                            session.start_soon(_cancel_after, self.sandbox_stopped,
                                               forwards.cancel_scope)
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
            stream, dial_problem = await dial_pod(port, self.uid)
            if stream is None:
                await self._error(i, dial_problem)
                return
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
        await self._send(2 * i + 1, forward_error(self.ports[i], self.uid, problem).encode())


async def _cancel_after(event: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await event()
    scope.cancel()


def netns_path(uid: str) -> str:
    """The network namespace path containerd names in its errors."""
    return f"/var/run/netns/cni-{uid}"


def forward_error(port: int, sandbox: str, problem: str, *, in_netns: bool = True) -> str:
    """The kubelet's error-stream text: ``error forwarding port P to pod ID, uid : ...``.

    ``in_netns``: the problem arose inside containerd's ``netNSDo`` (dial and copy
    errors), which wraps it as ``failed to execute portforward in network namespace``.
    The CRI streaming server passes the sandbox id as the pod and no uid, hence ``uid :``.
    """
    if in_netns:
        problem = f'failed to execute portforward in network namespace "{netns_path(sandbox)}": ' \
                  + problem
    return f"error forwarding port {port} to pod {sandbox}, uid : {problem}"


async def dial_pod(port: int, sandbox: str) -> tuple[trio.SocketStream | None, str]:
    """Connect to the pod's ``localhost:port`` as containerd does: tcp4, then tcp6.

    Returns the stream, or None and containerd's text naming both failures.
    """
    errors: list[str] = []
    for family, addr, label in ((trio.socket.AF_INET, "127.0.0.1", "tcp4 127.0.0.1"),
                                (trio.socket.AF_INET6, "::1", "tcp6 [::1]")):
        try:
            sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        except OSError:
            errors.append("dial tcp6: address localhost: no suitable address found")
            continue
        try:
            await sock.connect((addr, port))
        except OSError as exc:
            sock.close()
            errors.append(f"dial {label}:{port}: connect: {go_errno(exc)}")
            continue
        return trio.SocketStream(sock), ""
    return None, (f'failed to connect to localhost:{port} inside namespace "{sandbox}", '
                  f"IPv4: {errors[0]} IPv6 {errors[1]} ")


def go_errno(exc: BaseException) -> str:
    """Go's spelling of an errno (``connection refused``)."""
    cause = exc.__cause__ if not isinstance(exc, OSError) else exc
    code = getattr(cause, "errno", None)
    return os.strerror(code).lower() if code else str(exc) or type(exc).__name__
