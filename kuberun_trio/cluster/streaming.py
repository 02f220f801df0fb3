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

After the upgrade the session runs in its own module: exec and attach in
:class:`~.remotecommand.RemoteCommand`, WebSocket port-forward in
:class:`~.portforward.PortForward` (both on the shared framing and idle timer of
:mod:`.streamsession`), and kubectl's SPDY port-forward in
:class:`~.spdyforward.SpdyPortForward`.

Port-forward takes one of three paths (:func:`_portforward`): a WebSocket offering a
``SPDY/3.1+`` subprotocol is the API server's tunnel (``streamtunnel.go``, kubectl
≥ 1.31); an ``Upgrade: SPDY/3.1`` request is the plain SPDY upgrade (kubectl ≤ 1.30,
and kubectl's fallback); any other WebSocket is the ``v4.channel.k8s.io`` protocol,
the only one that needs ``?ports=``. All three first pass the kubelet's sandbox
check (``GetPortForward``): a pod whose sandbox is not ready gets the runtime's 500.

Every stream is logged as ``exec-open`` / ``exec-close`` in the request log, and
all sessions end after 4 h without traffic, as both real servers do.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from . import status
from .faults import Faults
from .httptypes import Reply, Request, Upgrade
from .portforward import PortForward
from .remotecommand import Attachable as Attachable
from .remotecommand import Attachment as Attachment
from .remotecommand import Process as Process
from .remotecommand import RemoteCommand
from .remotecommand import RunningContainer as RunningContainer
from .remotecommand import Sandbox as Sandbox
from .remotecommand import StreamOptions as StreamOptions
from .remotecommand import encode_status as encode_status
from .remotecommand import exit_status as exit_status
from .remotecommand import internal_status as internal_status
from .remotecommand import query_bool as query_bool
from .remotecommand import success_status as success_status
from .requestlog import RequestLog
from .spdyforward import PodSandboxView, RawTransport, SpdyPortForward, TunnelTransport
from .websocket import (
    PORTFORWARD_PROTOCOLS,
    REMOTECOMMAND_V4_PROTOCOLS,
    V5,
    WebSocket,
    choose_protocol,
    handshake_problem,
    is_upgrade_request,
    is_websocket_request,
    offered_protocols,
)

IDLE_TIMEOUT = 4 * 3600.0
"""``StreamIdleTimeout`` of the CRI streaming server / the API server's proxy."""
log = logging.getLogger(__name__)
_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/([^/]+)$")


# -- what the handler needs from the rest of the cluster (structural) ---------
class PodGetter(Protocol):
    def get_pod(self, ns: str, name: str) -> dict[str, Any]: ...


class ContainerLookup(Protocol):
    def running_container(self, ns: str, pod: str, container: str) -> RunningContainer:
        """Raises :class:`LookupError` (the kubelet's ``ContainerNotRunning``) if not running."""
        ...

    def sandbox_state(self, ns: str, pod: str, uid: str) -> str:
        """``ready``, ``stopped`` or ``missing``: the pod sandbox as the CRI sees it."""
        ...

    async def wait_sandbox_stopped(self, ns: str, pod: str, uid: str) -> None:
        """Return once the sandbox is no longer ready."""
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


SPDY_REFUSAL = ("unable to upgrade connection: this API server speaks WebSocket streaming "
                "only; use kubectl ≥ 1.30")
"""The Status message for an SPDY exec/attach upgrade (kubectl 1.29 and older)."""


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
        return _portforward(req, ctx, pod, ports, streams)

    if not websocket:  # kubectl <= 1.29 speaks SPDY: say why, as a Status it can show
        raise status.bad_request(SPDY_REFUSAL)
    opts = StreamOptions.from_request(req)
    argv = req.query.get("command", []) if kind == "exec" else []
    cut = functools.partial(ctx.faults.take_exec_cut, name) if kind == "exec" else None
    session = RemoteCommand(kind, opts, argv, ctx.idle_timeout, cut)
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


def _portforward(req: Request, ctx: StreamingContext, pod: dict[str, Any],
                 ports: list[int] | None, streams: _StreamLog) -> Upgrade:
    offered = offered_protocols(req.headers)
    websocket = is_websocket_request(req.headers)
    meta = pod.get("metadata") or {}
    ns, name, uid = str(meta.get("namespace", "")), str(meta.get("name", "")), str(
        meta.get("uid", ""))
    tunnel = websocket and any(p.startswith(SPDY_TUNNEL_PREFIX) for p in offered)
    if tunnel or not websocket:  # kubectl: SPDY, tunnelled (>= 1.31) or plain (<= 1.30)
        if tunnel:
            spdy_protocols = [p[len(SPDY_TUNNEL_PREFIX):] for p in offered
                              if p.startswith(SPDY_TUNNEL_PREFIX) and p.endswith(".k8s.io")]
            if not spdy_protocols:
                raise status.plain(400, "unable to upgrade: no tunneling spdy protocols provided")
        elif "spdy/3.1" not in req.headers.get("upgrade", "").lower():
            raise status.plain(400, "unable to upgrade: missing upgrade headers in request")
        else:
            spdy_protocols = [p.strip() for p in req.headers.get(
                "x-stream-protocol-version", "").split(",") if p.strip()]
        _sandbox_check(ctx, ns, name, uid)
        if not spdy_protocols:
            raise status.plain(400, "unable to upgrade: X-Stream-Protocol-Version is required")
        if PORTFORWARD_SPDY not in spdy_protocols:
            raise status.plain(403, (
                "unable to upgrade: unable to negotiate protocol: client supports "
                f"[{' '.join(spdy_protocols)}], server accepts [{PORTFORWARD_SPDY}]"))
        view = PodSandboxView(
            uid, functools.partial(ctx.kubelet.sandbox_state, ns, name, uid),
            functools.partial(ctx.kubelet.wait_sandbox_stopped, ns, name, uid))
        if tunnel:
            protocol = _handshake(req, True, [SPDY_TUNNEL_PREFIX + PORTFORWARD_SPDY],
                                  (SPDY_TUNNEL_PREFIX + PORTFORWARD_SPDY,))

            async def tunnelled(ws: WebSocket) -> None:
                await SpdyPortForward(TunnelTransport(ws), view, ctx.idle_timeout).run()

            return Upgrade(run=streams.wrap(protocol, tunnelled))

        async def plain(stream: trio.abc.Stream) -> None:
            await SpdyPortForward(RawTransport(stream), view, ctx.idle_timeout).run()

        return Upgrade(run=streams.wrap_raw(SPDY_UPGRADE_RESPONSE, plain))
    if ports is None:
        raise status.plain(400, 'query parameter "port" is required')
    if 0 in ports:
        raise status.plain(400, 'port "0" must be > 0')
    _sandbox_check(ctx, ns, name, uid)
    protocol = _handshake(req, websocket, offered, PORTFORWARD_PROTOCOLS)
    forward = PortForward(ports, uid, ctx.idle_timeout,
                          functools.partial(ctx.kubelet.wait_sandbox_stopped, ns, name, uid))
    return Upgrade(run=streams.wrap(protocol, forward.run))


def _sandbox_check(ctx: StreamingContext, ns: str, name: str, uid: str) -> None:
    """The kubelet's ``GetPortForward``: the runtime needs a ready sandbox (500 otherwise)."""
    state = ctx.kubelet.sandbox_state(ns, name, uid)
    if state == "missing":
        raise status.plain(500, f"failed to find sandboxID for pod {name}_{ns}({uid})")
    if state != "ready":  # containerd's PortForward, through gRPC
        raise status.plain(500, "rpc error: code = Unknown desc = sandbox container is not "
                                "running")


SPDY_TUNNEL_PREFIX = "SPDY/3.1+"
"""apimachinery ``pkg/util/portforward`` ``WebsocketsSPDYTunnelingPrefix``."""
PORTFORWARD_SPDY = "portforward.k8s.io"
"""The kubelet's only port-forward SPDY protocol (``ProtocolV1Name``)."""
SPDY_UPGRADE_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
"""``spdy.UpgradeResponse`` after ``httpstream.Handshake`` chose ``portforward.k8s.io``."""


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

    def wrap_raw(
        self, head: bytes, session: Callable[[trio.abc.Stream], Awaitable[None]]
    ) -> Callable[[trio.abc.Stream, Request], Awaitable[None]]:
        """An upgrade that is not a WebSocket: write ``head``, then hand the stream over."""
        async def run(stream: trio.abc.Stream, req: Request) -> None:
            try:
                await stream.send_all(head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(stream)
                return
            self.log.add("exec-open", req.method, req.path, 101, namespace=self.ns, pod=self.name)
            try:
                await session(stream)
            except Exception:  # one broken stream must not take the server down
                log.exception("SPDY stream of pod %s/%s failed", self.ns, self.name)
            finally:
                await trio.aclose_forcefully(stream)
                self.log.add("exec-close", req.method, req.path, 101,
                             namespace=self.ns, pod=self.name)

        return run
