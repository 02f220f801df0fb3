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

The log is the audit record, and its messages and values carry client input (usernames,
commands, env names, webhook replies). No input may forge a line: in text, every control
character (C0, DEL, C1), every Unicode line or paragraph separator (U+2028, U+2029; U+0085
is C1) and every bidirectional override (U+202A-U+202E, U+2066-U+2069) is written as a JSON
escape (``\\r``, ``\\u2028``), and so is the backslash itself, so the escaped text is
unambiguous; a value that needed any escape, or holds whitespace, ``"`` or ``=``, is
written as a quoted JSON string, and so is a message that holds ``=`` or ``"`` (so that
client text quoted in a message cannot pass for a ``key=value`` field, nor open a quote
that swallows the real ones). JSON output escapes the same characters inside its
strings, which stays lossless (``json.loads`` gives back the original text) while no
line splitter -- ``str.splitlines`` included -- sees a break inside a record.
"""

from __future__ import annotations

import json
import logging
import re
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


_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
"""What text output escapes: backslash, C0, DEL, C1, line/paragraph separators, bidi overrides
(and lone surrogates, which no UTF-8 stream can write)."""
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
"""What ``json.dumps(ensure_ascii=False)`` leaves raw but a line reader might split or hide."""
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or f"\\u{ord(char):04x}"


def escape_text(text: str) -> str:
    """``text`` with every character :data:`_UNSAFE` written as a JSON escape."""
    return _UNSAFE.sub(_escape_char, text)


def _json_line(doc: dict[str, Any]) -> str:
    return _JSON_UNSAFE.sub(_escape_char, json.dumps(doc, ensure_ascii=False, default=str))


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    escaped = escape_text(text)
    if escaped != text or not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + escaped.replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message key=value ...`` on one line."""

    def __init__(self, *, tracebacks: bool = False) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        message = escape_text(record.getMessage())
        if "=" in message or '"' in message:  # no fake key=value, no quote that hides fields
            message = '"' + message.replace('"', '\\"') + '"'
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in record_fields(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        line = f"{line} {fields}" if fields else line
        if self.tracebacks and record.exc_info:
            tb = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line += "\n" + "\n".join("    " + escape_text(t) for t in tb.split("\n"))
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
        return _json_line(doc)


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
