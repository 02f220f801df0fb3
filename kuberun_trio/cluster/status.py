"""Kubernetes ``metav1.Status`` error bodies, byte for byte.

Theory of operation
-------------------
A real kube-apiserver renders every API error as a ``Status`` object whose
JSON keys follow the Go struct order -- ``kind, apiVersion, metadata, status,
message, reason, details, code`` -- with empty fields omitted
(apimachinery ``pkg/api/errors/errors.go``). Handlers raise
:class:`ApiStatusError`, which already carries the encoded body, and the HTTP
server writes it unchanged. The builders here reproduce the constructors of
``errors.go`` (``NewNotFound``, ``NewAlreadyExists``, ``NewInvalid``, ...), so
a client cannot tell our 404 from a real one.

``Invalid`` (422) errors are built from :class:`FieldError` values, the
counterpart of ``field.Error``: a field path, an error type and a body such as
``Required value`` or ``Invalid value: "Foo": <detail>``. The message joins them
the way ``utilerrors.Aggregate`` prints: one error plain, several in brackets.

Everything is encoded compactly (``separators=(",", ":")``), as Go does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import ClusterError

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


def encode_json(obj: Any) -> bytes:
    """Compact JSON, non-ASCII kept as UTF-8 (Go's ``encoding/json`` escaping aside)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class ApiStatusError(ClusterError):
    """An API error reply: HTTP ``code``, encoded ``body`` and its ``content_type``."""

    def __init__(self, code: int, body: bytes, content_type: str = JSON) -> None:
        super().__init__(f"{code}: {body.decode(errors='replace')}")
        self.code = code
        self.body = body
        self.content_type = content_type

    @property
    def status(self) -> dict[str, Any] | None:
        """The decoded Status object, or None for text/plain errors."""
        if not self.content_type.startswith(JSON):
            return None
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


def status_dict(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Failure ``Status`` in Go key order; ``details=None`` omits the key."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def error(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> ApiStatusError:
    """An :class:`ApiStatusError` carrying :func:`status_dict`."""
    return ApiStatusError(code, encode_json(status_dict(code, reason, message, details)))


def _details(name: str | None, kind: str, group: str = "", **extra: Any) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = kind
    details.update(extra)
    return details


def _qualified(resource: str, group: str) -> str:
    """``leases.coordination.k8s.io`` (``pods`` for the core group)."""
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, *, group: str = "") -> ApiStatusError:
    """404 ``pods "p" not found`` (also ``namespaces "foo" not found``,
    ``leases.coordination.k8s.io "l" not found``)."""
    return error(404, "NotFound", f'{_qualified(resource, group)} "{name}" not found',
                 _details(name, resource, group))


def namespace_not_found(name: str) -> ApiStatusError:
    """404 for a request into a namespace that does not exist."""
    return not_found("namespaces", name)


def already_exists(resource: str, name: str, *, group: str = "") -> ApiStatusError:
    """409 ``pods "p" already exists``."""
    return error(
        409, "AlreadyExists", f'{_qualified(resource, group)} "{name}" already exists',
        _details(name, resource, group)
    )


def conflict(resource: str, name: str, detail: str | None = None, *,
             group: str = "") -> ApiStatusError:
    """409 Conflict; the default detail is the optimistic-concurrency message."""
    detail = detail or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return error(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {detail}',
        _details(name, resource, group),
    )


@attrs.frozen
class FieldError:
    """One validation error, like apimachinery's ``field.Error``."""

    field: str
    """Field path, e.g. ``spec.containers[0].name``."""
    type: str
    """Cause type: ``FieldValueRequired``, ``FieldValueInvalid``, ..."""
    body: str
    """``ErrorBody()``: ``Required value``, ``Invalid value: "x": detail``, ..."""

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"


def _go_quote(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def required(field: str, detail: str = "") -> FieldError:
    """``field.Required``."""
    body = "Required value" + (f": {detail}" if detail else "")
    return FieldError(field, "FieldValueRequired", body)


def invalid_value(field: str, value: Any, detail: str = "") -> FieldError:
    """``field.Invalid``."""
    body = f"Invalid value: {_go_quote(value)}" + (f": {detail}" if detail else "")
    return FieldError(field, "FieldValueInvalid", body)


def not_supported(field: str, value: Any, supported: Sequence[str]) -> FieldError:
    """``field.NotSupported``."""
    values = ", ".join(_go_quote(v) for v in supported)
    body = f"Unsupported value: {_go_quote(value)}: supported values: {values}"
    return FieldError(field, "FieldValueNotSupported", body)


def duplicate(field: str, value: Any) -> FieldError:
    """``field.Duplicate``."""
    return FieldError(field, "FieldValueDuplicate", f"Duplicate value: {_go_quote(value)}")


def forbidden_field(field: str, detail: str) -> FieldError:
    """``field.Forbidden``."""
    return FieldError(field, "FieldValueForbidden", f"Forbidden: {detail}")


def aggregate_message(causes: Sequence[FieldError]) -> str:
    """``utilerrors.NewAggregate(errs).Error()``: one plain, several ``[a, b]``, deduplicated."""
    seen: list[str] = []
    for cause in causes:
        text = str(cause)
        if text not in seen:
            seen.append(text)
    if len(seen) == 1:
        return seen[0]
    return "[" + ", ".join(seen) + "]"


def invalid(kind: str, name: str, causes: Sequence[FieldError], *,
            group: str = "") -> ApiStatusError:
    """422 ``Pod "p" is invalid: spec.containers: Required value`` with ``causes``
    (``Lease.coordination.k8s.io "l" is invalid: ...`` for a named group)."""
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [{"reason": c.type, "message": c.body, "field": c.field} for c in causes]
    if not name:
        del details["name"]
    message = f'{_qualified(kind, group)} "{name}" is invalid: {aggregate_message(causes)}'
    return error(422, "Invalid", message, details)


def bad_request(message: str) -> ApiStatusError:
    """400 BadRequest (no details)."""
    return error(400, "BadRequest", message)


def forbidden(
    resource: str,
    name: str | None,
    *,
    user: str,
    verb: str,
    namespace: str | None = None,
    subresource: str = "",
    group: str = "",
) -> ApiStatusError:
    """403 in the authorizer's words (``responsewriters/errors.go``)."""
    what = f"{resource}/{subresource}" if subresource else resource
    subject = f'{resource} "{name}"' if name else resource
    scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{what}" '
        f'in API group "{group}"{scope}'
    )
    return error(403, "Forbidden", message, _details(name, resource))


def unauthorized() -> ApiStatusError:
    """401 ``Unauthorized``."""
    return error(401, "Unauthorized", "Unauthorized")


def method_not_allowed() -> ApiStatusError:
    """405 for a method a known path does not serve."""
    return error(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


def path_not_found() -> ApiStatusError:
    """The generic 404 for paths the server does not serve."""
    return error(404, "NotFound", "the server could not find the requested resource", {})


def internal_error(message: str) -> ApiStatusError:
    """500 ``Internal error occurred: ...``."""
    return error(
        500,
        "InternalError",
        f"Internal error occurred: {message}",
        {"causes": [{"message": message}]},
    )


def gone(message: str) -> ApiStatusError:
    """410 Expired as an HTTP response (expired ``continue`` tokens)."""
    return error(410, "Expired", message)


def expired_status(message: str) -> dict[str, Any]:
    """The 410 ``Expired`` Status object for a watch ERROR event."""
    return status_dict(410, "Expired", message)


def plain(code: int, text: str) -> ApiStatusError:
    """A text/plain error, as the kubelet writes them (``container not found ("c")``)."""
    return ApiStatusError(code, text.encode(), TEXT)
