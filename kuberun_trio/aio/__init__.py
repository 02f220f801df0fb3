"""The asyncio boundary.

Everything asyncio-flavoured in kuberun_trio lives in this package and nowhere
else: asyncssh, kubernetes-asyncio and aiohttp are asyncio libraries, and the
rest of the project is trio. :mod:`kuberun_trio.aio.bridge` owns the crossing
(the trio-asyncio loop, calls in both directions, and translation of
third-party exceptions into :mod:`kuberun_trio.errors`). A test
(``tests/test_boundary.py``) fails if any module outside this package imports
``asyncio``, ``trio_asyncio``, ``asyncssh``, ``kubernetes_asyncio`` or ``aiohttp``.
"""
