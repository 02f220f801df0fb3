"""The asciicast v2 format (https://docs.asciinema.org/manual/asciicast/v2/): a JSON
header line, then one JSON array per event: ``[seconds, code, data]``.

Pure functions, no I/O. Codes: ``o`` output, ``i`` input, ``r`` resize (``"COLSxROWS"``),
``m`` marker (our notes: an incomplete recording, a subsystem's byte counts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

DEFAULT_SIZE = (80, 24)
"""Header size of a session without a terminal (players need one)."""


def header(*, width: int, height: int, timestamp: int, env: Mapping[str, str],
           title: str) -> str:
    """The header line (with its newline)."""
    w, h = (width, height) if width > 0 and height > 0 else DEFAULT_SIZE
    return json.dumps({"version": 2, "width": w, "height": h, "timestamp": timestamp,
                       "env": dict(env), "title": title}, ensure_ascii=False) + "\n"


def event(seconds: float, code: str, data: str) -> str:
    """One event line (with its newline)."""
    return json.dumps([round(seconds, 6), code, data], ensure_ascii=False) + "\n"
