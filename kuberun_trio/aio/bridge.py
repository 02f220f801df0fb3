"""The trio/asyncio crossing: the one place that knows how the two meet.

Theory of operation
-------------------
kuberun_trio runs under ``trio.run``. asyncio libraries run inside a
trio-asyncio loop opened with :func:`open_aio_loop`, which installs a
*log-only* exception handler: trio-asyncio's default handler re-raises errors
from asyncio callbacks into trio, so one broken asyncssh transport could take
the whole server down (see ``shared/PITFALLS.md``).

* trio → asyncio: :func:`run_aio` awaits an asyncio coroutine function from a
  trio task (``trio_asyncio.aio_as_trio``). Cancellation of the trio task
  cancels the asyncio task.
* asyncio → trio: :func:`run_trio` awaits a trio function from an asyncio task
  (``trio_asyncio.trio_as_aio``).
* :func:`translate_errors` maps aiohttp, kubernetes-asyncio and asyncssh
  exceptions onto :mod:`kuberun_trio.errors`, chaining the original.

Crossing costs time (PITFALLS: ~0.5 ms per keystroke round trip when every
chunk crosses), so data paths do not call these per chunk: they use
callback-level protocols that hand bytes to trio memory channels instead.

Memory: asyncio gives every TLS connection a 256 KiB read buffer, a
``bytearray`` whose zero-fill makes all of it resident at once -- with one exec
WebSocket per SSH connection that was most of the gateway's memory per idle
connection. A loop opened here swaps that buffer for an anonymous ``mmap`` of
the same size (:func:`_lazy_tls_read_buffers`): reads still take up to 256 KiB
at a time, but a page costs memory only once data has been read into it. This
leans on asyncio internals (``SSLProtocol._ssl_buffer``), so it checks for them
and otherwise leaves the loop as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import aiohttp
import trio_asyncio

from ..errors import ExecError, KubernetesError, KuberunError, NotFoundError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _log_only_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.warning("asyncio: %s", context.get("message", "unhandled error"), exc_info=exc)


@contextlib.asynccontextmanager
async def open_aio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Open a trio-asyncio loop whose exception handler only logs. Trio-flavoured."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_only_handler)
        _lazy_tls_read_buffers(loop)
        yield loop


def _lazy_tls_read_buffers(loop: asyncio.AbstractEventLoop) -> None:
    """Back each new TLS connection's read buffer with a lazily paged ``mmap``."""
    make = getattr(loop, "_make_ssl_transport", None)
    if make is None:
        return

    def make_ssl_transport(*args: Any, **kwargs: Any) -> Any:
        transport = make(*args, **kwargs)
        proto = getattr(transport, "_ssl_protocol", None)
        buffer = getattr(proto, "_ssl_buffer", None)
        if isinstance(buffer, bytearray) and hasattr(proto, "_ssl_buffer_view"):
            lazy = mmap.mmap(-1, len(buffer))
            proto._ssl_buffer, proto._ssl_buffer_view = lazy, memoryview(lazy)  # type: ignore[union-attr]
        return transport

    loop._make_ssl_transport = make_ssl_transport  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def ensure_aio_loop() -> AsyncIterator[None]:
    """Use the caller's trio-asyncio loop if one runs, else open one. Trio-flavoured."""
    if trio_asyncio.current_loop.get() is not None:
        yield
    else:
        async with open_aio_loop():
            yield


async def run_aio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await asyncio-flavoured ``fn(*args, **kwargs)`` from trio, translating errors."""
    with translate_errors():
        result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
        return result


async def run_trio(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await trio-flavoured ``fn(*args, **kwargs)`` from an asyncio task."""
    result: T = await trio_asyncio.trio_as_aio(fn)(*args, **kwargs)
    return result


def translate(exc: BaseException) -> KuberunError | None:
    """The project error for a third-party ``exc``, or None if it is not one we know."""
    from kubernetes_asyncio.client.exceptions import ApiException

    if isinstance(exc, KuberunError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        reason, message = str(exc.reason or ""), ""
        try:
            import json

            body = json.loads(exc.body or "{}")
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        except (ValueError, AttributeError):
            message = str(exc.body or "")
        cls = NotFoundError if status == 404 else KubernetesError
        return cls(status, reason, message)
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return ExecError(f"exec handshake refused with HTTP {exc.status}")
    if isinstance(exc, aiohttp.ClientError):
        return KubernetesError(0, type(exc).__name__, str(exc))
    return None


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise known third-party errors as :class:`KuberunError`, chained."""
    try:
        yield
    except KuberunError:
        raise
    except Exception as exc:
        ours = translate(exc)
        if ours is None:
            raise
        raise ours from exc


async def loop_roundtrip() -> None:
    """One round trip through the trio-asyncio loop (the liveness check). Trio-flavoured."""
    await trio_asyncio.aio_as_trio(asyncio.sleep)(0)
