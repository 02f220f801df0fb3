"""Request parsing and JSON replies shared by the REST handlers.

Theory of operation
-------------------
The apiserver's parameter codec is lenient in its own way: a boolean query
parameter is false only when absent, ``0`` or any case of ``false``
(:func:`param_bool`); integers fail with Go's ``strconv.ParseInt`` message
(:func:`param_int`). Bodies that are not JSON are a 400 naming the kind
(:func:`body_json`). Content negotiation reads the ``Accept`` header in client
order: :func:`wants` finds an ``as=<Kind>;g=<group>`` entry (aggregated
discovery, Tables) only if it comes before plain JSON, as the real server's
negotiator does. Replies are compact JSON (:func:`json_response`).
"""

from __future__ import annotations

import json
from typing import Any

from . import status
from .httptypes import Request, Response
from .status import encode_json


def json_response(
    obj: Any, status_code: int = 200, content_type: str = "application/json"
) -> Response:
    return Response(status_code, encode_json(obj), content_type=content_type)


def param_bool(req: Request, name: str) -> bool:
    """Kubernetes bool parsing: absent, ``0`` and any case of ``false`` are false."""
    value = req.param(name)
    return value is not None and value != "0" and value.lower() != "false"


def param_int(req: Request, name: str) -> int | None:
    value = req.param(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise status.bad_request(f'strconv.ParseInt: parsing "{value}": invalid syntax') from None


def body_json(req: Request, kind: str) -> Any:
    try:
        return json.loads(req.body or b"null")
    except ValueError as exc:
        raise status.bad_request(
            f'{kind} in version "v1" cannot be handled as a {kind}: {exc}'
        ) from None


def accepts(req: Request) -> list[dict[str, str]]:
    """The Accept header as a list of ``{"type": ..., param: value}`` in client order."""
    result = []
    for part in req.headers.get("accept", "").split(","):
        pieces = [p.strip() for p in part.split(";") if p.strip()]
        if not pieces:
            continue
        entry = {"type": pieces[0].lower()}
        for piece in pieces[1:]:
            key, _, value = piece.partition("=")
            entry[key.strip().lower()] = value.strip()
        result.append(entry)
    return result


def wants(req: Request, as_: str, group: str) -> dict[str, str] | None:
    """The first Accept entry asking for ``as=<as_>;g=<group>``, if one comes first."""
    for entry in accepts(req):
        if entry.get("as") == as_ and entry.get("g") == group:
            return entry
        if entry["type"] in ("application/json", "*/*", "application/*") and "as" not in entry:
            return None
    return None
