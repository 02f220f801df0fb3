"""The SSH gateway as a library (trio-flavoured; asyncio lives in :mod:`kuberun_trio.aio`).

``serve`` runs it (``serve_gateway`` / ``open_gateway``); ``pod`` owns a
connection's pod (create, wait, delete), ``persistent`` a user's pod; ``connection``
is the connection nursery with its session, forward and agent tasks; ``podwatch``
shares one pod watch per namespace; ``throttle`` (the sans-IO login limiter) and
``login`` (the gate every login attempt passes) limit logins; ``lease``, ``reaper``
and ``timelimits`` are the instance's Lease, the orphan sweeps and the session time
limits. The pure modules it shares with :mod:`kuberun_trio.aio` -- configuration,
session machine, pod judgement, audit, limits, forwarding decision, per-connection
settings -- live in :mod:`kuberun_trio.core`. The module map with more detail is in
``docs/architecture.md``.
"""
