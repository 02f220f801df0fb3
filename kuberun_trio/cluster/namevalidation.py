"""Name and metadata validation, as apimachinery's ``pkg/util/validation`` does it.

Theory of operation
-------------------
The ``is_*`` checks (:func:`is_dns1123_label`, :func:`is_dns1123_subdomain`,
:func:`is_qualified_name`, :func:`is_valid_label_value`) return the list of messages a
real API server would give, word for word (an empty list means valid), so callers can
turn them into 422 causes with real field paths. :func:`validate_labels` and
:func:`validate_object_meta` apply them to ``metadata`` and label maps and return
:class:`~.status.FieldError` causes. Used by pod validation (:mod:`.podspec`), namespace
creation (:mod:`.store`), label selectors (:mod:`.selectors`) and the API (:mod:`.api`).
"""

from __future__ import annotations

import re
from typing import Any

from . import status
from .status import FieldError

_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + ")*"
_QNAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = "(" + _QNAME + ")?"


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    text = msg + " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            text += " or "
        text += f"'{example}', "
    return text + f"regex used for validation is '{fmt}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)
_QNAME_MSG = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
    "or '.', and must start and end with an alphanumeric character"
)


def is_dns1123_label(value: str) -> list[str]:
    """``IsDNS1123Label``: error messages, empty if valid."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not re.fullmatch(_DNS1123_LABEL, value):
        if re.fullmatch(_DNS1123_SUBDOMAIN, value):
            errs.append("must not contain dots")
        else:
            errs.append(_regex_error(_LABEL_MSG, _DNS1123_LABEL, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    """``IsDNS1123Subdomain``."""
    errs = []
    if len(value) > 253:
        errs.append(_max_len(253))
    if not re.fullmatch(_DNS1123_SUBDOMAIN, value):
        errs.append(_regex_error(_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN, "example.com"))
    return errs


def is_qualified_name(value: str) -> list[str]:
    """``IsQualifiedName`` (label and annotation keys)."""
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            "a qualified name "
            + _regex_error(_QNAME_MSG, _QNAME, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part " + _max_len(63))
    if not re.fullmatch(_QNAME, name):
        errs.append("name part " + _regex_error(_QNAME_MSG, _QNAME, "MyName", "my.name", "123-abc"))
    return errs


def is_valid_label_value(value: str) -> list[str]:
    """``IsValidLabelValue``."""
    errs = []
    if len(value) > 63:
        errs.append(_max_len(63))
    if not re.fullmatch(_LABEL_VALUE, value):
        errs.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE, "MyValue", "my_value", "12345"))
    return errs


def mask_trailing_dash(name: str) -> str:
    """generateName prefixes may end in '-': validate them as if it were a letter."""
    return name[:-1] + "a" if len(name) > 1 and name.endswith("-") else name


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    """``ValidateLabels``: keys as qualified names, values as label values."""
    errs: list[FieldError] = []
    for key in sorted(labels or {}):
        errs.extend(status.invalid_value(path, key, m) for m in is_qualified_name(key))
        value = labels[key]
        errs.extend(status.invalid_value(path, value, m) for m in is_valid_label_value(value))
    return errs


def validate_object_meta(
    meta: dict[str, Any], *, namespaced: bool, name_check: Any = is_dns1123_subdomain
) -> list[FieldError]:
    """``ValidateObjectMeta``: name/generateName, labels, annotation keys."""
    errs: list[FieldError] = []
    generate = meta.get("generateName") or ""
    if generate:
        errs.extend(
            status.invalid_value("metadata.generateName", generate, m)
            for m in name_check(mask_trailing_dash(generate))
        )
    name = meta.get("name") or ""
    if not name:
        errs.append(status.required("metadata.name", "name or generateName is required"))
    else:
        errs.extend(status.invalid_value("metadata.name", name, m) for m in name_check(name))
    if namespaced and not meta.get("namespace"):
        errs.append(status.required("metadata.namespace"))
    errs.extend(validate_labels(meta.get("labels"), "metadata.labels"))
    for key in sorted(meta.get("annotations") or {}):
        errs.extend(
            status.invalid_value("metadata.annotations", key, m)
            for m in is_qualified_name(key.lower())
        )
    return errs
