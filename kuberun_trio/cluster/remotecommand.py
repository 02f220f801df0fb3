"""Exec and attach sessions after the upgrade: the remotecommand channels 0-4.

Theory of operation
-------------------
:class:`RemoteCommand` runs one exec or attach on an upgraded WebSocket: one empty
"ready" frame on the lowest writable channel (:meth:`StreamOptions.ready_channel`), one
task per output stream (stdout → 1, stderr → 2, in the chunks the pipe yields), and one
reader task that feeds channel 0 to the process's stdin, channel 4 through a streaming
JSON decoder (:class:`~.websocket.ResizeDecoder`) to the pty, and v5 ``[255, ch]``
half-closes. Once the process has exited *and* its output is drained, the status frame
(:func:`success_status`, :func:`exit_status`, :func:`internal_status`, encoded for the
protocol by :func:`encode_status`) goes out on channel 3 and the WebSocket closes (1000).
A client that goes away ends the session at once and the exec process is killed.
``Faults.cut_exec`` drops the TCP connection after N output bytes, without a status.

What the session needs of the cluster is structural (:class:`RunningContainer`,
:class:`Process`, :class:`Attachable`, ...), so the sandbox and kubelet modules stay
independent of this one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from ..errors import ClusterError
from .httptypes import Request
from .streamsession import (
    CHUNK,
    ERROR,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    STREAM_CLOSE,
    ChannelSession,
    close_quietly,
)
from .websocket import V1, V1_BASE64, V5, ResizeDecoder, WebSocket


# -- what the sessions need from the rest of the cluster (structural) ------------
class Process(Protocol):
    """An exec'd process (:class:`~.sandbox.ExecProcess`)."""

    @property
    def stdin(self) -> trio.abc.SendStream | None: ...
    @property
    def stdout(self) -> trio.abc.ReceiveStream | None: ...
    @property
    def stderr(self) -> trio.abc.ReceiveStream | None: ...
    def resize(self, width: int, height: int) -> None: ...
    async def wait(self) -> int: ...
    async def aclose(self) -> None: ...


class Sandbox(Protocol):
    """The pod sandbox (:class:`~.sandbox.PodSandbox`)."""

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> Process: ...


class RunningContainer(Protocol):
    """A running container as the kubelet reports it."""

    @property
    def sandbox(self) -> Sandbox: ...
    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def working_dir(self) -> str | None: ...


class Attachment(Protocol):
    """One attacher's view of a container's main process (from :class:`Attachable`)."""

    @property
    def stdin(self) -> trio.abc.SendStream | None:
        """The container's stdin (None unless the spec has ``stdin: true``);
        ``aclose()`` is this attacher's EOF (the kubelet honours ``stdinOnce``)."""
    @property
    def output(self) -> trio.abc.ReceiveChannel[tuple[int, bytes]]:
        """``(1 | 2, data)`` from now on; ends when the main process exits."""
    def resize(self, width: int, height: int) -> None: ...
    async def aclose(self) -> None:
        """Detach."""


@runtime_checkable
class Attachable(Protocol):
    """A :class:`RunningContainer` that supports attach."""

    async def attach(self) -> Attachment: ...


# -- query parsing --------------------------------------------------------------
def query_bool(req: Request, name: str) -> bool:
    """Kubernetes bool parameter: absent, ``0`` or any-case ``false`` is False, else True."""
    values = req.query.get(name)
    if not values:
        return False
    return not (values[0] == "0" or values[0].lower() == "false")


@attrs.frozen
class StreamOptions:
    """The stdio options of an exec/attach request."""

    stdin: bool
    stdout: bool
    stderr: bool
    """As requested (the v5 ready frame goes by it)."""
    tty: bool

    @classmethod
    def from_request(cls, req: Request) -> StreamOptions:
        return cls(*(query_bool(req, n) for n in ("stdin", "stdout", "stderr", "tty")))

    @property
    def process_stderr(self) -> bool:
        """The kubelet drops stderr when a tty is requested."""
        return self.stderr and not self.tty

    def ready_channel(self, *, v5: bool) -> int:
        """The lowest writable channel: where the single empty frame goes."""
        if self.stdout:
            return STDOUT
        return STDERR if (self.stderr if v5 else self.process_stderr) else ERROR


# -- status frames ----------------------------------------------------------------
def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def success_status() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exit_status(code: int, argv: Sequence[str], *, v5: bool) -> dict[str, Any]:
    """The NonZeroExitCode Status: containerd's text on v4, the API server's on v5."""
    inner = (f"command terminated with exit code {code}" if v5
             else f"error executing command [{' '.join(argv)}], exit code {code}")
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {inner}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_status(message: str) -> dict[str, Any]:
    """``apierrors.NewInternalError`` as the kubelet/API server write it (no kind)."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(st: dict[str, Any], protocol: str) -> bytes | None:
    """Channel-3 payload: JSON on v4/v5; v1 protocols send the message on failure only."""
    if protocol in (V1, V1_BASE64, ""):
        return None if st["status"] == "Success" else str(st["message"]).encode()
    return _json(st)


# -- the session ---------------------------------------------------------------------
class RemoteCommand(ChannelSession):
    """One exec or attach session (channels 0-4, v5 half-close)."""

    def __init__(
        self,
        kind: str,
        opts: StreamOptions,
        argv: Sequence[str],
        idle_timeout: float,
        take_cut: Callable[[], int | None] | None,
    ) -> None:
        super().__init__(idle_timeout)
        self.kind, self.opts, self.argv = kind, opts, list(argv)
        self.target: RunningContainer | None = None
        self.failure: dict[str, Any] | None = None
        """A kubelet refusal on the v5 path: sent as the status right after the ready frame."""
        self._take_cut = take_cut
        self._cut_after: int | None = None
        self._output_bytes = 0
        self._v5 = False

    async def run(self, ws: WebSocket) -> None:
        idle = self._start(ws)
        self._v5 = ws.protocol == V5
        self._cut_after = self._take_cut() if self._take_cut else None
        with idle.scope:
            if not await self._send(self.opts.ready_channel(v5=self._v5), b""):
                return await self._close()
            if self.failure is not None:
                final: dict[str, Any] | None = self.failure
            elif self.kind == "exec":
                final = await self._exec()
            else:
                final = await self._attach()
            if final is not None and self.ended is None:
                if self._cut_after is not None:
                    self.ended = "cut"  # the cut comes before the status, whatever the output
                elif (payload := encode_status(final, ws.protocol)) is not None:
                    await self._send(ERROR, payload)
        await self._close()

    # -- exec ----------------------------------------------------------------------
    async def _exec(self) -> dict[str, Any] | None:
        assert self.target is not None
        try:
            proc = await self.target.sandbox.exec(
                self.argv, env=self.target.env, cwd=self.target.working_dir, tty=self.opts.tty,
                stdin=self.opts.stdin, stdout=self.opts.stdout, stderr=self.opts.process_stderr)
        except (ClusterError, OSError) as exc:
            st = internal_status(f"error executing command in container: "
                                 f"{getattr(exc, 'message', None) or exc}")
            # v5: client-go's SPDY decoder turns the kubelet's Status into a plain error,
            # which the API server wraps once more.
            return internal_status(st["message"]) if self._v5 else st
        try:
            code = await self._run_io(proc.stdin, proc.stdout, proc.stderr, proc.resize,
                                      proc.wait)
        finally:
            with trio.CancelScope(shield=True):
                await proc.aclose()
        if code is None:
            return None
        return success_status() if code == 0 else exit_status(code, self.argv, v5=self._v5)

    async def _run_io(
        self,
        stdin: trio.abc.SendStream | None,
        stdout: trio.abc.ReceiveStream | None,
        stderr: trio.abc.ReceiveStream | None,
        resize: Callable[[int, int], None],
        wait: Callable[[], Awaitable[int]],
    ) -> int | None:
        """Bridge the WebSocket and the process; its exit code once output is drained."""
        code: int | None = None
        with self._scope:
            async with trio.open_nursery() as session:
                session.start_soon(self._read_loop, stdin if self.opts.stdin else None, resize)
                async with trio.open_nursery() as outputs:
                    if stdout is not None:
                        outputs.start_soon(self._copy_out, stdout,
                                           STDOUT if self.opts.stdout else None)
                    if stderr is not None:
                        outputs.start_soon(self._copy_out, stderr, STDERR)
                    code = await wait()
                session.cancel_scope.cancel()
        return code if self.ended is None else None

    async def _copy_out(self, stream: trio.abc.ReceiveStream, channel: int | None) -> None:
        while True:
            try:
                data = await stream.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            if channel is not None:
                await self._output(channel, bytes(data))

    async def _output(self, channel: int, data: bytes) -> None:
        if self._cut_after is not None:
            room = self._cut_after - self._output_bytes
            if len(data) >= room:
                if room > 0:
                    await self._send(channel, data[:room])
                self._output_bytes += max(room, 0)
                self._end("cut")
                return
        if await self._send(channel, data):
            self._output_bytes += len(data)

    async def _read_loop(
        self, stdin: trio.abc.SendStream | None, resize: Callable[[int, int], None]
    ) -> None:
        decoder = ResizeDecoder()
        while (msg := await self._receive()) is not None:
            if not msg:
                continue
            if self._v5 and msg[0] == STREAM_CLOSE:
                if len(msg) != 2 or msg[1] > RESIZE:
                    self._end("break")  # wsstream ends the read loop: no status
                    return
                if msg[1] == STDIN and stdin is not None:
                    await close_quietly(stdin)
                    stdin = None
                elif msg[1] == RESIZE:
                    decoder.failed = True
                continue
            frame = self.codec.decode(msg)
            if frame is None:
                continue
            channel, payload = frame
            if channel == STDIN and stdin is not None and payload:
                try:
                    await stdin.send_all(payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    stdin = None  # the process is gone or closed its stdin: drop the rest
            elif channel == RESIZE:
                for width, height in decoder.feed(payload):
                    if self.opts.tty:
                        resize(width, height)

    # -- attach --------------------------------------------------------------------
    async def _attach(self) -> dict[str, Any] | None:
        target = self.target
        if not isinstance(target, Attachable):
            return internal_status("error attaching to container: "
                                   "the container runtime does not support attach")
        attachment = await target.attach()
        try:
            ended = await self._run_attach(attachment)
        finally:
            with trio.CancelScope(shield=True):
                await attachment.aclose()
        return success_status() if ended else None

    async def _run_attach(self, attachment: Attachment) -> bool:
        wanted = {STDOUT: self.opts.stdout, STDERR: self.opts.process_stderr}
        with self._scope:
            async with trio.open_nursery() as session:
                session.start_soon(self._read_loop,
                                   attachment.stdin if self.opts.stdin else None,
                                   attachment.resize)
                async for channel, data in attachment.output:
                    if wanted.get(channel) and data:
                        await self._output(channel, data)
                session.cancel_scope.cancel()
        return self.ended is None
