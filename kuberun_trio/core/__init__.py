"""The bottom layer: pure, sans-IO modules that both :mod:`kuberun_trio.gateway` (trio) and
:mod:`kuberun_trio.aio` (asyncio) use.

``config`` loads and validates the ``kubernetes:`` section and ``podtemplate`` turns it
plus one SSH connection into a pod manifest; ``session`` and ``shellwrap`` are the
session-channel state machine and its exec wrapper; ``podstate`` judges pod states;
``auth`` is the authenticator protocol; ``audit`` is one connection's audit record;
``limits`` decides every connection, session and signal limit; ``refusals`` is the one
function every refusal is logged through; ``forwarding`` decides where a forward may
go; ``connsettings`` is the per-connection settings hook's data.

Nothing here imports trio, asyncio, :mod:`kuberun_trio.gateway` or
:mod:`kuberun_trio.aio` (``tests/test_boundary.py`` checks it): these modules make
decisions and hold data; the layers above do the I/O.
"""
