"""List paging: ``limit`` and the opaque ``continue`` token.

Theory of operation
-------------------
A paged list remembers the resourceVersion of its first page and the key
(``namespace/name``) of the last item it returned, in the same token format
as the apiserver's etcd3 store: base64 of ``{"v": "meta.k8s.io/v1", "rv": ...,
"start": "ns/name\\x00"}``. Every later page is served at the current state
but from after that key. A token whose RV was compacted away is 410 ``Gone``
with the apiserver's exact message; an undecodable one is a 400.
"""

from __future__ import annotations

import base64
import binascii
import json

from . import status


def encode_continue(rv: int, key: tuple[str, str]) -> str:
    """The token for a page that ended with the object at ``key``, listed at ``rv``."""
    start = f"{key[0]}/{key[1]}\x00"
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode()


def decode_continue(token: str, compacted: int) -> tuple[int, tuple[str, str]]:
    """``(rv, (ns, name))`` of a token; raises 400 (garbage) or 410 (compacted)."""
    try:
        data = json.loads(base64.b64decode(token, validate=False))
        rv, start = int(data["rv"]), str(data["start"])
        ns, _, name = start.rstrip("\x00").partition("/")
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise status.bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion "
            "(version meta.k8s.io/v1)"
        ) from None
    if rv < compacted:
        raise status.gone(
            "The provided continue parameter is too old to display a consistent list "
            "result. You can start a new list without the continue parameter, or use the "
            "continue token in this response to retrieve the remainder of the results. "
            "Continuing with the provided token results in an inconsistent list - objects "
            "that were created, modified, or deleted between the time the first chunk was "
            "returned and now may show up in the list."
        )
    return rv, (ns, name)
