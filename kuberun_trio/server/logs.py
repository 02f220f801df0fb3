"""Structured logs: one line per lifecycle event, as text or JSON.

Theory of operation
-------------------
The library logs through plain :mod:`logging` and puts the facts into ``extra``:
``event`` (``pod-created``, ``auth-decision``, ...), ``connection_id``, and whatever else
belongs to the event (``pod``, ``duration_ms``, ``status``, ``reason``). The two formatters
here turn every non-standard attribute of a :class:`logging.LogRecord` into a field, so a
new field needs no change here:

* ``text``: ``2025-01-02T03:04:05.678Z INFO pod created event=pod-created
  connection_id=5f3a pod=kuberun-x7k duration_ms=812`` -- values with spaces are quoted;
* ``json``: ``{"time": ..., "level": ..., "logger": ..., "message": ..., "event": ...}``.

Both keep each record on one line: an exception becomes ``error`` (type and message) plus,
in JSON, ``traceback``; text shows the traceback (indented) only at ``DEBUG``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, TextIO

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_FIRST = ("event", "connection_id")


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of ``record``: ``event`` and ``connection_id`` first."""
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    ordered = {k: extra.pop(k) for k in _FIRST if k in extra}
    ordered.update(sorted(extra.items()))
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        ordered.setdefault("error", f"{type(exc).__name__}: {exc}")
    return ordered


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message key=value ...`` on one line."""

    def __init__(self, *, tracebacks: bool = False) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", " ")
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in record_fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        line = f"{line} {fields}" if fields else line
        if self.tracebacks and record.exc_info:
            tb = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line += "\n" + "\n".join("    " + t for t in tb.splitlines())
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(record_fields(record))
        if record.exc_info:
            doc["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure_logging(fmt: str = "text", level: str = "INFO",
                      stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (default stderr) in ``fmt``; returns the handler.

    Replaces the root logger's handlers, so calling it twice does not duplicate lines.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json"
                         else TextFormatter(tracebacks=level == "DEBUG"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("asyncssh", "aiohttp", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
