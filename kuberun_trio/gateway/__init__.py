"""The SSH gateway as a library (trio-flavoured; asyncio lives in :mod:`kuberun_trio.aio`).

``serve`` runs it (``serve_gateway`` / ``open_gateway``); ``config`` loads and
validates the ``kubernetes:`` section; ``podtemplate`` turns it plus one SSH
connection into a pod manifest; ``pod`` owns a connection's pod (create, wait,
delete); ``connection`` is the connection nursery with its session tasks;
``session`` and ``shellwrap`` are the sans-IO session machine and its exec
wrapper; ``podstate`` judges pod states; ``podwatch`` shares one pod watch per
namespace; ``auth`` is the authenticator protocol; ``throttle`` (the sans-IO login
limiter), ``login`` (the gate every login attempt passes) and ``refusals`` (the one
function every refusal is logged through) limit logins; ``connsettings`` is the
per-connection settings hook (``GatewayOptions.configure``). The module map with more
detail is in ``docs/architecture.md``.
"""
