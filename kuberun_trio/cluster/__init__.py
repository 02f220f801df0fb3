"""The embedded cluster: a Kubernetes API stand-in whose pods are local process sandboxes.

Theory of operation
-------------------
:func:`open_embedded_cluster` assembles the parts in one nursery: the
:class:`~.store.Store` (objects, resourceVersions, watches), the
:class:`~.kubelet.Kubelet` (drives each pod's lifecycle and runs its
containers in a :mod:`~.sandbox`), and the HTTP(S) :mod:`~.http` server
routing REST requests to :mod:`~.api` and exec/attach/port-forward upgrades to
:mod:`~.streaming`. It writes a kubeconfig (server, CA, bearer token) and
yields an :class:`EmbeddedCluster` with the fault API and the request log.

On exit every pod is killed (shielded, bounded) before the server stops, so
no process outlives the cluster. Pods run on this host -- in their own PID,
mount, UTS and IPC namespaces where the kernel allows -- which makes this a
development stand-in, not an isolation boundary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from .api import ApiContext
from .api import handle as handle_rest
from .certs import make_certificates
from .faults import Faults
from .http import ApiServer, Routes, serve_api, server_ssl_context
from .kubeconfig import write_kubeconfig
from .kubelet import Kubelet
from .requestlog import RequestLog
from .store import Store
from .streaming import StreamingContext, handle_exec

log = logging.getLogger(__name__)

__all__ = ["EmbeddedCluster", "Faults", "RequestLog", "open_embedded_cluster"]


@attrs.define
class EmbeddedCluster:
    """A running embedded cluster."""

    url: str
    """The API server's base URL, e.g. ``https://127.0.0.1:40123``."""
    kubeconfig_path: Path
    """A kubeconfig for it (server, CA, token; context namespace ``default``)."""
    token: str
    """The bearer token every request must carry."""
    ca_file: Path | None
    """The CA certificate (HTTPS only)."""
    faults: Faults
    """Fault injection."""
    request_log: RequestLog
    """Every request and exec stream, in order."""
    store: Store
    kubelet: Kubelet

    def pods(self, namespace: str = "default") -> list[dict[str, Any]]:
        """The pods the API server currently holds in ``namespace``."""
        items: list[dict[str, Any]] = self.store.list_pods(namespace)["items"]
        return items


@contextlib.asynccontextmanager
async def open_embedded_cluster(
    *,
    https: bool = True,
    port: int = 0,
    kubeconfig_path: Path | None = None,
    token: str | None = None,
    authenticate: bool | None = None,
    image_roots: Mapping[str, str] | None = None,
    backoff_base: float = 10.0,
    use_namespaces: bool | None = None,
    node_name: str = "kuberun-node",
    private_tmp: bool = False,
) -> AsyncIterator[EmbeddedCluster]:
    """Run an embedded cluster for the duration of the ``async with`` block. Trio-flavoured.

    ``image_roots`` maps image names to root directories (default: every image
    runs on the host filesystem). ``backoff_base`` is the first crash-loop /
    image-pull back-off in seconds (the kubelet's is 10). ``use_namespaces``
    forces (True) or forbids (False) Linux namespaces; None detects. ``private_tmp``
    gives every pod an empty ``/tmp`` of its own (a tmpfs in the pod's mount namespace),
    so that files written there go away with the pod (the demo turns it on).

    ``authenticate`` (default: True for HTTPS, False for HTTP) requires the
    bearer token on every request (401 Status otherwise). Plain HTTP serves
    like the API server's old insecure port, without authentication, because
    kubectl never sends a bearer token over plain HTTP.
    """
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kuberun-cluster-")))
        token = token or secrets.token_urlsafe(24)
        store, faults, request_log = Store(), Faults(), RequestLog()
        kubelet = Kubelet(store, faults, node_name=node_name, image_roots=dict(image_roots or {}),
                          backoff_base=backoff_base, use_namespaces=use_namespaces,
                          private_tmp=private_tmp)
        faults.bind(expire=store.expire_history, evict=kubelet.evict, kill=kubelet.kill)
        api_ctx = ApiContext(store=store, logs=kubelet.logs, faults=faults)
        stream_ctx = StreamingContext(
            store=store, kubelet=kubelet, faults=faults, request_log=request_log)
        routes = Routes(
            rest=functools.partial(handle_rest, ctx=api_ctx),
            streaming=functools.partial(_streaming, ctx=stream_ctx),
        )
        if authenticate is None:
            authenticate = https
        server = ApiServer(routes=routes, request_log=request_log, faults=faults,
                           token=token if authenticate else None)
        certs = make_certificates(workdir / "pki") if https else None
        ssl_context = (
            server_ssl_context(str(certs.cert_file), str(certs.key_file)) if certs else None
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            host, bound = await nursery.start(functools.partial(
                serve_api, server, port=port, ssl_context=ssl_context))
            url = f"{'https' if https else 'http'}://{host}:{bound}"
            path = write_kubeconfig(kubeconfig_path or workdir / "kubeconfig", url, token,
                                    certs.ca_pem() if certs else None)
            cluster = EmbeddedCluster(
                url=url, kubeconfig_path=path, token=token,
                ca_file=certs.ca_file if certs else None, faults=faults,
                request_log=request_log, store=store, kubelet=kubelet)
            log.debug("embedded cluster serving at %s (kubeconfig %s)", url, path)  # owners say it
            try:
                yield cluster
            finally:
                with trio.move_on_after(30, shield=True):
                    await kubelet.shutdown()
                nursery.cancel_scope.cancel()


async def _streaming(req: Any, sub: str, *, ctx: StreamingContext) -> Any:
    return await handle_exec(req, ctx, sub)
