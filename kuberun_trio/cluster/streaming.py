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
:class:`~.remotecommand.RemoteCommand`, port-forward in :class:`~.portforward.PortForward`
(both on the shared framing and idle timer of :mod:`.streamsession`).

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
        if ports is None:
            raise status.plain(400, 'query parameter "port" is required')
        if 0 in ports:
            raise status.plain(400, 'port "0" must be > 0')
        protocol = _handshake(req, websocket, offered, PORTFORWARD_PROTOCOLS)
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        forward = PortForward(ports, uid, ctx.idle_timeout)
        return Upgrade(run=streams.wrap(protocol, forward.run))

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
