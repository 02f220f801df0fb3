"""Label and field selectors, parsed and matched like apimachinery does.

Theory of operation
-------------------
**Label selectors** follow ``k8s.io/apimachinery/pkg/labels`` ``Parse``: a
lexer splits the text into identifiers and the operator tokens ``= == != ! ( )
, < >`` plus the keywords ``in``/``notin`` (whitespace separates, and is
otherwise ignored), then a recursive-descent parser builds requirements::

    selector    := requirement ("," requirement)*
    requirement := ["!"] KEY [ ("="|"=="|"!=") VALUE | ("in"|"notin") "(" VALUES ")"
                              | (">"|"<") INTEGER ]

Keys are validated as qualified names and values as label values, with the
validation messages of the real server. Any failure raises a 400 BadRequest
whose message reads like the real one (``unable to parse requirement: ...``).

**Field selectors** follow ``k8s.io/apimachinery/pkg/fields`` ``ParseSelector``:
comma-separated ``field=value``, ``field==value`` or ``field!=value`` terms
(``\\`` escapes ``,``, ``=``, ``!`` and itself). Each resource kind has a
whitelist of selectable fields; anything else is ``field label not supported:
<f>`` (400), as in ``pkg/apis/core/v1/conversion.go``. :func:`pod_fields` and
:func:`event_fields` compute the selectable field values of an object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from . import status
from .namevalidation import is_qualified_name, is_valid_label_value

# -- label selectors --------------------------------------------------------

_SPECIAL = frozenset("=!(),<>")
_WHITESPACE = frozenset(" \t\r\n")
_TOKENS = {
    ")": "CLOSE",
    ",": "COMMA",
    "!": "NOT",
    "==": "DEQ",
    "=": "EQ",
    ">": "GT",
    "in": "IN",
    "<": "LT",
    "!=": "NEQ",
    "notin": "NOTIN",
    "(": "OPEN",
}
_OPERATORS = {
    "IN": "in",
    "EQ": "=",
    "DEQ": "==",
    "GT": "gt",
    "LT": "lt",
    "NOTIN": "notin",
    "NEQ": "!=",
}
_BINARY_OPERATORS = "in, notin, =, ==, !=, gt, lt"


@attrs.frozen
class Requirement:
    """One label requirement."""

    key: str
    operator: str
    """``=``, ``==``, ``!=``, ``in``, ``notin``, ``exists``, ``!``, ``gt``, ``lt``."""
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op, present = self.operator, self.key in labels
        if op in ("in", "=", "=="):
            return present and labels[self.key] in self.values
        if op in ("notin", "!="):
            return not present or labels[self.key] not in self.values
        if op == "exists":
            return present
        if op == "!":
            return not present
        if not present:
            return False
        try:
            have, want = int(labels[self.key]), int(self.values[0])
        except ValueError:
            return False
        return have > want if op == "gt" else have < want


@attrs.frozen
class LabelSelector:
    """A conjunction of :class:`Requirement` (empty = everything)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


class _SelectorSyntaxError(Exception):
    pass


def _lex(text: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        if pos >= n:
            items.append(("END", ""))
            return items
        if text[pos] in _SPECIAL:
            buf, last = "", None
            while pos < n and text[pos] in _SPECIAL:
                candidate = buf + text[pos]
                if candidate in _TOKENS:
                    buf, last = candidate, (_TOKENS[candidate], candidate)
                    pos += 1
                elif last is not None:
                    break
                else:
                    buf = candidate
                    pos += 1
            if last is None:
                items.append(("ERROR", f"error expected: keyword found '{buf}'"))
            else:
                items.append(last)
        else:
            start = pos
            while pos < n and text[pos] not in _SPECIAL and text[pos] not in _WHITESPACE:
                pos += 1
            word = text[start:pos]
            items.append((_TOKENS[word], word) if word in ("in", "notin") else ("ID", word))


class _Parser:
    def __init__(self, text: str) -> None:
        self.items = _lex(text)
        self.pos = 0

    def _look(self, values: bool) -> tuple[str, str]:
        tok, lit = self.items[self.pos]
        if values and tok in ("IN", "NOTIN"):
            tok = "ID"
        return tok, lit

    def _take(self, values: bool) -> tuple[str, str]:
        item = self._look(values)
        self.pos += 1
        return item

    def parse(self) -> list[Requirement]:
        reqs: list[Requirement] = []
        while True:
            tok, lit = self._look(True)
            if tok in ("ID", "NOT"):
                try:
                    reqs.append(self._requirement())
                except _SelectorSyntaxError as exc:
                    raise _SelectorSyntaxError(f"unable to parse requirement: {exc}") from None
                tok, lit = self._take(True)
                if tok == "END":
                    return reqs
                if tok != "COMMA":
                    raise _SelectorSyntaxError(f"found '{lit}', expected: ',' or 'end of string'")
                tok2, lit2 = self._look(True)
                if tok2 not in ("ID", "NOT"):
                    raise _SelectorSyntaxError(f"found '{lit2}', expected: identifier after ','")
            elif tok == "END":
                return reqs
            else:
                raise _SelectorSyntaxError(
                    f"found '{lit}', expected: !, identifier, or 'end of string'"
                )

    def _requirement(self) -> Requirement:
        negate = False
        tok, lit = self._take(True)
        if tok == "NOT":
            negate = True
            tok, lit = self._take(True)
        if tok != "ID":
            raise _SelectorSyntaxError(f"found '{lit}', expected: identifier")
        key = lit
        errs = is_qualified_name(key)
        if errs:
            raise _SelectorSyntaxError(f'<nil>: Invalid value: "{key}": {"; ".join(errs)}')
        if negate:
            # Whatever follows ``!key`` must be ',' or the end (checked by the caller).
            return Requirement(key, "!")
        if self._look(True)[0] in ("END", "COMMA"):
            return Requirement(key, "exists")
        tok, lit = self._take(False)
        if tok not in _OPERATORS:
            raise _SelectorSyntaxError(f"found '{lit}', expected: {_BINARY_OPERATORS}")
        op = _OPERATORS[tok]
        values = self._set_values() if op in ("in", "notin") else self._exact_value()
        _validate_values(key, op, values)
        return Requirement(key, op, tuple(sorted(values)))

    def _set_values(self) -> set[str]:
        tok, lit = self._take(True)
        if tok != "OPEN":
            raise _SelectorSyntaxError(f"found '{lit}' expected: '('")
        tok, lit = self._look(True)
        if tok == "CLOSE":
            self._take(True)
            return {""}
        if tok not in ("ID", "COMMA"):
            raise _SelectorSyntaxError(f"found '{lit}', expected: ',', ')' or identifier")
        values: set[str] = set()
        while True:
            tok2, lit2 = self._take(True)
            if tok2 == "ID":
                values.add(lit2)
                tok3, lit3 = self._look(True)
                if tok3 == "COMMA":
                    continue
                if tok3 == "CLOSE":
                    break
                raise _SelectorSyntaxError(f"found '{lit3}', expected: ',' or ')'")
            if tok2 == "COMMA":
                if not values:
                    values.add("")
                tok3, _ = self._look(True)
                if tok3 == "CLOSE":
                    values.add("")
                    break
                if tok3 == "COMMA":
                    self._take(True)
                    values.add("")
                continue
            raise _SelectorSyntaxError(f"found '{lit2}', expected: ',', or identifier")
        if self._take(True)[0] != "CLOSE":
            raise _SelectorSyntaxError(f"found '{lit}', expected: ')'")
        return values

    def _exact_value(self) -> set[str]:
        tok, _ = self._look(True)
        if tok in ("END", "COMMA"):
            return {""}
        tok, lit = self._take(True)
        if tok == "ID":
            return {lit}
        raise _SelectorSyntaxError(f"found '{lit}', expected: identifier")


def _validate_values(key: str, op: str, values: set[str]) -> None:
    if op in ("gt", "lt"):
        for value in values:
            if not re.fullmatch(r"[+-]?[0-9]+", value):
                raise _SelectorSyntaxError(
                    f'values[0]: Invalid value: "{value}": '
                    "for 'Gt', 'Lt' operators, the value must be an integer"
                )
    for i, value in enumerate(sorted(values)):
        errs = is_valid_label_value(value)
        if errs:
            raise _SelectorSyntaxError(
                f'values[{i}][{key}]: Invalid value: "{value}": {"; ".join(errs)}'
            )


def parse_label_selector(text: str) -> LabelSelector:
    """Parse a label selector; 400 BadRequest on syntax or validation errors."""
    try:
        reqs = _Parser(text).parse()
    except _SelectorSyntaxError as exc:
        raise status.bad_request(str(exc)) from None
    return LabelSelector(tuple(sorted(reqs, key=lambda r: r.key)))


# -- field selectors --------------------------------------------------------

POD_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.podIPs",
        "status.nominatedNodeName",
        "spec.host",
    }
)
"""Selectable pod fields (``pkg/apis/core/v1/conversion.go``); ``spec.host`` = ``spec.nodeName``."""

EVENT_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)
"""Selectable core/v1 Event fields."""

NAMESPACE_FIELDS = frozenset({"metadata.name", "metadata.namespace", "status.phase"})
"""Selectable namespace fields."""

META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
"""Selectable fields of kinds with no fields of their own (Leases)."""

_FIELD_ALIASES = {"spec.host": "spec.nodeName"}


@attrs.frozen
class FieldRequirement:
    """``field op value`` with ``op`` one of ``=`` / ``!=`` (``==`` is stored as ``=``)."""

    field: str
    operator: str
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        have = fields.get(self.field, "")
        return have == self.value if self.operator == "=" else have != self.value


@attrs.frozen
class FieldSelector:
    """A conjunction of :class:`FieldRequirement` (empty = everything)."""

    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(r.matches(fields) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, buf, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _find_operator(term: str) -> tuple[int, str] | None:
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return i, op
        i += 1
    return None


def parse_field_selector(text: str, allowed: frozenset[str]) -> FieldSelector:
    """Parse a field selector against a whitelist; 400 for syntax errors or unknown fields."""
    reqs: list[FieldRequirement] = []
    if not text.strip():
        return FieldSelector()
    for term in _split_unescaped(text, ","):
        if not term:
            continue
        found = _find_operator(term)
        if found is None:
            raise status.bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        index, op = found
        field, value = term[:index], _unescape(term[index + len(op) :])
        if field not in allowed:
            raise status.bad_request(f"field label not supported: {field}")
        field = _FIELD_ALIASES.get(field, field)
        reqs.append(FieldRequirement(field, "!=" if op == "!=" else "=", value))
    return FieldSelector(tuple(reqs))


def _meta_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {
        "metadata.name": str(meta.get("name", "")),
        "metadata.namespace": str(meta.get("namespace", "")),
    }


def pod_fields(pod: Mapping[str, Any]) -> dict[str, str]:
    """The selectable fields of a pod (``ToSelectableFields`` in the pod registry)."""
    spec = pod.get("spec") or {}
    st = pod.get("status") or {}
    ips = [str(ip.get("ip", "")) for ip in st.get("podIPs") or []]
    pod_ip = ips[0] if ips else str(st.get("podIP", ""))
    fields = _meta_fields(pod)
    fields.update(
        {
            "spec.nodeName": str(spec.get("nodeName", "")),
            "spec.restartPolicy": str(spec.get("restartPolicy", "")),
            "spec.schedulerName": str(spec.get("schedulerName", "")),
            "spec.serviceAccountName": str(spec.get("serviceAccountName", "")),
            "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
            "status.phase": str(st.get("phase", "")),
            "status.podIP": pod_ip,
            "status.podIPs": ",".join(ips) if ips else pod_ip,
            "status.nominatedNodeName": str(st.get("nominatedNodeName", "")),
        }
    )
    return fields


def event_fields(event: Mapping[str, Any]) -> dict[str, str]:
    """The selectable fields of a core/v1 Event."""
    involved = event.get("involvedObject") or {}
    source = event.get("source") or {}
    fields = _meta_fields(event)
    for key in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"):
        fields[f"involvedObject.{key}"] = str(involved.get(key, ""))
    fields.update(
        {
            "reason": str(event.get("reason", "")),
            "reportingComponent": str(event.get("reportingComponent", "")),
            "source": str(source.get("component", "")),
            "type": str(event.get("type", "")),
        }
    )
    return fields


def meta_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    """``metadata.name`` and ``metadata.namespace`` (``DefaultClusterScopedAttr`` & co)."""
    return _meta_fields(obj)


def namespace_fields(namespace: Mapping[str, Any]) -> dict[str, str]:
    """The selectable fields of a Namespace."""
    fields = _meta_fields(namespace)
    fields["status.phase"] = str((namespace.get("status") or {}).get("phase", ""))
    return fields
