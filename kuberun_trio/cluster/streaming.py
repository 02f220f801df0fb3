"""Pod exec, attach and port-forward over WebSocket: the API server + kubelet side.

Theory of operation
-------------------
:func:`handle_exec` (routed for ``GET``/``POST .../pods/{name}/{exec,attach,portforward}``)
first does, synchronously and in the real order, every check that ends in a plain
HTTP answer instead of a ``101`` (notes §1.5): the API server's option parsing,
pod lookup, container resolution and node check, the ``Upgrade request required``
check, then -- on the v4 path -- the kubelet's option check, its running-container
lookup and the WebSocket handshake's subprotocol negotiation (403, empty body).
A request that offers ``v5.channel.k8s.io`` anywhere in its list takes the v5
path, where the API server terminates the WebSocket itself: kubelet-side
failures then arrive after the upgrade as an ``InternalError`` Status on
channel 3. Everything that passes becomes an :class:`~.httptypes.Upgrade`.

After the upgrade a :class:`_RemoteCommand` session runs exec or attach: one empty
"ready" frame on the lowest writable channel, one task per output stream (stdout
→ 1, stderr → 2, in the chunks the pipe yields), and one reader task that feeds
channel 0 to the process's stdin, channel 4 through a streaming JSON decoder
(:class:`ResizeDecoder`) to the pty, and v5 ``[255, ch]`` half-closes. Once the
process has exited *and* its output is drained, the status frame goes out on
channel 3 and the WebSocket closes (1000). A client that goes away ends the
session at once and the exec process is killed. ``Faults.cut_exec`` drops the
TCP connection after N output bytes, without a status.

Port-forward (:class:`_PortForward`) announces each port on channels ``2i`` and
``2i+1`` (2-byte little-endian), dials ``127.0.0.1:port`` (pods share the host
network) and copies both ways until either side ends; dial errors go to the
error channel as text. The WebSocket closes when every port is done.

Every stream is logged as ``exec-open`` / ``exec-close`` in the request log, and
all sessions end after 4 h without traffic, as both real servers do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from ..errors import ClusterError
from . import status
from .faults import Faults
from .httptypes import Reply, Request, Upgrade
from .requestlog import RequestLog
from .websocket import (
    PORTFORWARD_PROTOCOLS,
    REMOTECOMMAND_V4_PROTOCOLS,
    V1,
    V1_BASE64,
    V5,
    ChannelCodec,
    ResizeDecoder,
    WebSocket,
    choose_protocol,
    handshake_problem,
    is_upgrade_request,
    is_websocket_request,
    offered_protocols,
)

IDLE_TIMEOUT = 4 * 3600.0
"""``StreamIdleTimeout`` of the CRI streaming server / the API server's proxy."""
CHUNK = 32 * 1024
"""Output read size: Go's ``io.Copy`` buffer."""
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CLOSE = 255
log = logging.getLogger(__name__)
_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/([^/]+)$")


# -- what the handlers need from the rest of the cluster (structural) ---------
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


class PodGetter(Protocol):
    def get_pod(self, ns: str, name: str) -> dict[str, Any]: ...


class ContainerLookup(Protocol):
    def running_container(self, ns: str, pod: str, container: str) -> RunningContainer:
        """Raises :class:`LookupError` (the kubelet's ``ContainerNotRunning``) if not running."""
        ...


@attrs.frozen
class StreamingContext:
    """What the streaming handlers use of the cluster."""

    store: PodGetter
    kubelet: ContainerLookup
    faults: Faults
    request_log: RequestLog
    idle_timeout: float = IDLE_TIMEOUT
    """Sessions end after this long without a frame in either direction."""


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


def _parse_ports(req: Request) -> list[int] | None:
    """The API server's ``ports`` conversion (repeated and/or comma lists)."""
    if "ports" not in req.query:
        return None
    ports: list[int] = []
    for value in req.query["ports"]:
        for part in value.split(","):
            why = "invalid syntax" if not re.fullmatch(r"[0-9]+", part) else (
                "value out of range" if int(part) > 0xFFFF else None)
            if why:
                raise status.bad_request(
                    f'cannot convert to []int32: strconv.ParseUint: parsing "{part}": {why}')
            ports.append(int(part))
    return ports


def _resolve_container(pod: dict[str, Any], name: str, pod_name: str) -> str:
    spec = pod.get("spec") or {}
    regular = [str(c["name"]) for c in spec.get("containers") or ()]
    init = [str(c["name"]) for c in spec.get("initContainers") or ()]
    ephemeral = [str(c["name"]) for c in spec.get("ephemeralContainers") or ()]
    if name:
        if name not in (*init, *regular, *ephemeral):
            raise status.bad_request(f"container {name} is not valid for pod {pod_name}")
        return name
    if len(regular) == 1:
        return regular[0]
    message = f"a container name must be specified for pod {pod_name}"
    if regular:
        message += f", choose one of: [{' '.join(regular)}]"
        if init:
            message += f" or one of the init containers: [{' '.join(init)}]"
    raise status.bad_request(message)


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


# -- the handler ---------------------------------------------------------------------
async def handle_exec(req: Request, ctx: StreamingContext, kind: str) -> Reply:
    """``exec`` / ``attach`` / ``portforward``: a pre-upgrade error or the Upgrade."""
    m = _PATH.match(req.path)
    if m is None or kind not in ("exec", "attach", "portforward") or m[3] != kind:
        raise status.path_not_found()
    if req.method not in ("GET", "POST"):
        raise status.method_not_allowed()
    ns, name = m[1], m[2]
    ports = _parse_ports(req) if kind == "portforward" else None
    pod = ctx.store.get_pod(ns, name)
    container = "" if kind == "portforward" else _resolve_container(
        pod, req.param("container") or "", name)
    if not (pod.get("spec") or {}).get("nodeName"):
        raise status.bad_request(f"pod {name} does not have a host assigned")
    if not is_upgrade_request(req.headers):
        raise status.bad_request("Upgrade request required")
    offered = offered_protocols(req.headers)
    websocket = is_websocket_request(req.headers)
    streams = _StreamLog(ctx.request_log, ns, name)

    if kind == "portforward":
        if ports is None:
            raise status.plain(400, 'query parameter "port" is required')
        if 0 in ports:
            raise status.plain(400, 'port "0" must be > 0')
        protocol = _handshake(req, websocket, offered, PORTFORWARD_PROTOCOLS)
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        forward = _PortForward(ports, uid, ctx.idle_timeout)
        return Upgrade(run=streams.wrap(protocol, forward.run))

    opts = StreamOptions.from_request(req)
    argv = req.query.get("command", []) if kind == "exec" else []
    cut = functools.partial(ctx.faults.take_exec_cut, name) if kind == "exec" else None
    session = _RemoteCommand(kind, opts, argv, ctx.idle_timeout, cut)
    if websocket and V5 in offered and not ctx.faults.v5_refused:  # the stream translator
        protocol = _handshake(req, websocket, [V5], (V5,))
        try:
            session.target = _kubelet_lookup(ctx, ns, name, container, opts)
        except _KubeletRefusal as exc:
            session.failure = internal_status(f"unable to upgrade connection: {exc.text}")
        return Upgrade(run=streams.wrap(protocol, session.run))
    try:
        session.target = _kubelet_lookup(ctx, ns, name, container, opts)
    except _KubeletRefusal as exc:
        raise status.plain(exc.code, exc.text) from None
    protocol = _handshake(req, websocket, offered, REMOTECOMMAND_V4_PROTOCOLS)
    return Upgrade(run=streams.wrap(protocol, session.run))


handle = handle_exec


class _KubeletRefusal(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


def _kubelet_lookup(
    ctx: StreamingContext, ns: str, name: str, container: str, opts: StreamOptions
) -> RunningContainer:
    if not (opts.stdin or opts.stdout or opts.process_stderr):
        raise _KubeletRefusal(400, "you must specify at least 1 of stdin, stdout, stderr")
    try:
        return ctx.kubelet.running_container(ns, name, container)
    except LookupError:
        raise _KubeletRefusal(500, f'container not found ("{container}")') from None


def _handshake(
    req: Request, websocket: bool, offered: list[str], supported: Sequence[str]
) -> str:
    if not websocket:  # an SPDY upgrade: not spoken here
        raise status.plain(400, "unable to upgrade: only WebSocket streams are supported")
    problem = handshake_problem(req.method, req.headers)
    if problem is not None:
        raise status.ApiStatusError(problem, b"", "text/plain; charset=utf-8")
    protocol = choose_protocol(offered, supported)
    if protocol is None:
        raise status.ApiStatusError(403, b"", "text/plain; charset=utf-8")
    return protocol


SessionRun = Callable[[WebSocket], Awaitable[None]]


@attrs.frozen
class _StreamLog:
    log: RequestLog
    ns: str
    name: str

    def wrap(
        self, protocol: str, session: SessionRun
    ) -> Callable[[trio.abc.Stream, Request], Awaitable[None]]:
        async def run(stream: trio.abc.Stream, req: Request) -> None:
            try:
                ws = await WebSocket.accept(stream, req.headers, protocol)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(stream)
                return
            self.log.add("exec-open", req.method, req.path, 101, namespace=self.ns, pod=self.name)
            logged = False

            def closed() -> None:
                # Logged when the client's Close (or EOF) arrives, before we answer it,
                # or when we end the stream ourselves -- whichever comes first.
                nonlocal logged
                if not logged:
                    logged = True
                    self.log.add("exec-close", req.method, req.path, 101,
                                 namespace=self.ns, pod=self.name)

            ws.on_peer_gone = closed
            try:
                await session(ws)
            except Exception:  # one broken stream must not take the server down
                log.exception("%s stream of pod %s/%s failed", protocol, self.ns, self.name)
            finally:
                if not ws.closed:
                    with trio.CancelScope(shield=True):
                        await ws.abort()
                closed()

        return run


class _Idle:
    """A cancel scope that expires ``timeout`` seconds after the last :meth:`touch`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = trio.CancelScope(deadline=trio.current_time() + timeout)

    def touch(self) -> None:
        self.scope.deadline = trio.current_time() + self.timeout


# -- sessions ------------------------------------------------------------------------
class _Session:
    """What exec/attach and port-forward sessions share: framing, idle timer, end reason."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.ws: WebSocket | None = None
        self.codec = ChannelCodec(base64=False)
        self.ended: str | None = None
        """Why the session stopped early: ``gone``, ``break``, ``cut`` (None: normally)."""
        self._scope = trio.CancelScope()
        self._idle: _Idle | None = None

    def _start(self, ws: WebSocket) -> _Idle:
        self.ws, self.codec = ws, ChannelCodec.for_protocol(ws.protocol)
        self._idle = _Idle(self.idle_timeout)
        return self._idle

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self._scope.cancel()

    async def _send(self, channel: int, payload: bytes) -> bool:
        """Send one frame; False (and the session ends) if the client is gone."""
        assert self.ws is not None and self._idle is not None
        try:
            await self.ws.send_message(self.codec.encode(channel, payload), text=self.codec.base64)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end("gone")
            return False
        self._idle.touch()
        return True

    async def _receive(self) -> bytes | None:
        assert self.ws is not None and self._idle is not None
        msg = await self.ws.receive()
        if msg is None:
            self._end("gone")
        else:
            self._idle.touch()
        return msg

    async def _close(self) -> None:
        """Close 1000 after a normal end; drop TCP after a cut, a timeout or a vanished peer."""
        assert self.ws is not None
        if self.ended in ("gone", "cut") or self.ws.closed or (
                self._idle is not None and self._idle.scope.cancelled_caught):
            await self.ws.abort()
        else:
            await self.ws.close(1000)


class _RemoteCommand(_Session):
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
                    await _close_quietly(stdin)
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


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.aclose()


class _PortForward(_Session):
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
                                     f"{_go_errno(exc)}")
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
                                       f"read: {_go_errno(exc)}")
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
                                       f"write: {_go_errno(exc)}")
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


def _go_errno(exc: BaseException) -> str:
    """Go's spelling of an errno (``connection refused``)."""
    cause = exc.__cause__ if not isinstance(exc, OSError) else exc
    code = getattr(cause, "errno", None)
    return os.strerror(code).lower() if code else str(exc) or type(exc).__name__
