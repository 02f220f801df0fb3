"""Generic machinery for strict, all-problems-at-once YAML configuration loading.

A configuration section is an attrs class; :func:`make_converter` builds a strict cattrs
converter for such classes: keys are the camelCase form of the attribute names (or
``metadata={"key": ...}``), unknown keys are errors with a "did you mean" hint
(:func:`unknown_key_problem`), and nothing is coerced -- ``"5"`` is not a number and
``"false"`` is not a boolean. Fields made with :func:`duration` take Go syntax (``"1m30s"``)
or a number of seconds (:func:`parse_duration`).

Problems are never raised one by one: structure hooks raise :class:`InvalidValue` (problems
relative to the value), :func:`structure_section` turns a cattrs error tree into
:class:`~kuberun_trio.errors.ConfigError` entries under dotted key paths (:func:`key_path`)
collected in a :class:`ConfigProblems`, and the caller raises them all at the end with
:meth:`ConfigProblems.raise_if_any`. :func:`read_yaml_mapping` reads the top-level mapping of
a YAML file, rejecting duplicate keys.

Used by the ``kubernetes:`` section (:mod:`kuberun_trio.core.config`) and the rest of the
server configuration (:mod:`kuberun_trio.server.config`).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import cattrs
import yaml
from cattrs.gen import make_dict_structure_fn, override

from .errors import ConfigError, ConfigErrors

T = TypeVar("T")

_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def key_path(parent: str, key: object) -> str:
    """``parent`` extended by ``key``: ``a.b``, ``a[0]``, ``a["app.kubernetes.io/x"]``."""
    if not isinstance(key, str):
        return f"{parent}[{key!r}]"
    if _SIMPLE_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


def kind_of(value: object) -> str:
    """The YAML name of ``value``'s type, for messages."""
    for types, name in (
        (type(None), "null"),
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (Mapping, "mapping"),
        (list, "list"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


class ConfigProblems:
    """Collects configuration errors so that one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        """The problems found so far, in discovery order."""

    def add(self, path: str, problem: str) -> None:
        self.errors.append(ConfigError(path, problem))

    def __len__(self) -> int:
        return len(self.errors)

    def raise_if_any(self) -> None:
        """Raise the one error, or :class:`ConfigErrors` for several; return if none."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


SubProblem = tuple[tuple[object, ...], str]
"""A problem below some value: (keys leading to it, problem)."""


class InvalidValue(ValueError):
    """Raised by structure hooks; ``problems`` are (keys below the value, problem) pairs."""

    def __init__(self, problem: str) -> None:
        self.problems: Sequence[SubProblem] = [((), problem)]
        super().__init__(problem)

    @classmethod
    def at(cls, problems: Sequence[SubProblem]) -> InvalidValue:
        """Several problems at sub-keys (``problems`` must not be empty)."""
        error = cls(problems[0][1])
        error.problems = problems
        return error


def config_key(attribute: attrs.Attribute[Any]) -> str:
    """The YAML key of an attrs attribute: ``metadata={"key": ...}`` or its camelCase name."""
    key = attribute.metadata.get("key")
    if isinstance(key, str):
        return key
    head, *rest = attribute.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def duration(default: float, key: str | None = None) -> Any:
    """An attrs field holding float seconds, read with :func:`parse_duration`."""
    metadata: dict[str, object] = {"duration": True}
    if key is not None:
        metadata["key"] = key
    return attrs.field(default=default, metadata=metadata)


def duration_or_off(default: float = 0.0, key: str | None = None) -> Any:
    """Like :func:`duration`, but 0 (``0``, ``"0s"``) or null is allowed: 0.0, "off"."""
    metadata: dict[str, object] = {"duration": "or-off"}
    if key is not None:
        metadata["key"] = key
    return attrs.field(default=default, metadata=metadata)


def unknown_key_problem(key: object, known: Iterable[str], hints: Mapping[str, str]) -> str:
    """``unknown key``, plus a hint for known foreign keys or a close known key."""
    if isinstance(key, str) and key in hints:
        return f"unknown key: {hints[key]}"
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def check_keys(
    data: Mapping[Any, Any],
    known: Iterable[str],
    path: str,
    problems: ConfigProblems,
    hints: Mapping[str, str] | None = None,
) -> None:
    """Report every key of ``data`` not in ``known``."""
    known = list(known)
    for key in data:
        if key not in known:
            problems.add(key_path(path, key), unknown_key_problem(key, known, hints or {}))


_Hook = Callable[[Any, Any], Any]


def _strict(kind: type[Any] | tuple[type[Any], ...], name: str, convert: _Hook | None) -> _Hook:
    def hook(value: Any, _type: Any) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise InvalidValue(f"expected {name}, got {kind_of(value)}")
        return convert(value, _type) if convert else value

    return hook


def _structure_strings(value: Any, _type: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidValue(f"expected a list of strings, got {kind_of(value)}")
    bad: list[SubProblem] = [
        ((i,), f"expected a string, got {kind_of(v)}")
        for i, v in enumerate(value)
        if not isinstance(v, str)
    ]
    if bad:
        raise InvalidValue.at(bad)
    return tuple(value)


def as_mapping(value: Any) -> Mapping[Any, Any]:
    """``value`` as a mapping (``None`` is ``{}``); anything else raises :class:`InvalidValue`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidValue(f"expected a mapping, got {kind_of(value)}")
    return value


def _non_string_keys(value: Mapping[Any, Any]) -> list[SubProblem]:
    return [((k,), "keys must be strings") for k in value if not isinstance(k, str)]


def _structure_str_map(value: Any, _type: Any) -> dict[str, str]:
    value = as_mapping(value)
    bad = _non_string_keys(value)
    bad += [
        ((k,), f"expected a string, got {kind_of(v)}")
        for k, v in value.items()
        if not isinstance(v, str)
    ]
    if bad:
        raise InvalidValue.at(bad)
    return dict(value)


def _structure_object(value: Any, _type: Any) -> dict[str, Any]:
    value = as_mapping(value)
    bad = _non_string_keys(value)
    if bad:
        raise InvalidValue.at(bad)
    return copy.deepcopy(dict(value))


def parse_duration(value: object) -> float:
    """Seconds from a Go duration (``"1m30s"``, ``"500ms"``) or a number; must be > 0.

    Raises :class:`InvalidValue` (a ``ValueError``) with a one-line problem.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidValue(
            f'expected a duration like "60s" or a number of seconds, got {kind_of(value)}'
        )
    seconds = _parse_go_duration(value) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidValue(f"must be a positive duration, got {value!r}")
    return seconds


_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _parse_go_duration(text: str) -> float:
    body = text[1:] if text[:1] in "+-" else text
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    while body and pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if not match:
            break
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if not body or pos < len(body):
        hint = ' (missing unit, e.g. "60s")' if re.fullmatch(r"[0-9.]+", body) else ""
        raise InvalidValue(f"invalid duration {json.dumps(text, ensure_ascii=False)}{hint}")
    return sign * total


def _structure_duration(value: Any, _type: Any) -> float:
    return parse_duration(value)


def _structure_duration_or_off(value: Any, _type: Any) -> float:
    if value is None or (not isinstance(value, bool) and value in (0, "0", "0s")):
        return 0.0
    return parse_duration(value)


def make_converter() -> cattrs.Converter:
    """A strict cattrs converter for attrs config classes.

    camelCase keys (override with field ``metadata={"key": ...}``), unknown keys forbidden,
    no coercion between str/int/float/bool, ``None`` for a section means "all defaults",
    ``duration(...)`` fields parsed by :func:`parse_duration`, and typed hooks for
    ``tuple[str, ...]``, ``Mapping[str, str]`` and ``Mapping[str, Any]`` (deep-copied).
    """
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string", None))
    conv.register_structure_hook(bool, _strict(bool, "a boolean", None))
    conv.register_structure_hook(int, _strict(int, "an integer", None))
    conv.register_structure_hook(float, _strict((int, float), "a number", lambda v, _: float(v)))
    for hook_type, hook in (
        (tuple[str, ...], _structure_strings),
        (Mapping[str, str], _structure_str_map),
        (Mapping[str, Any], _structure_object),
    ):
        conv.register_structure_hook_func(_is_type(hook_type), hook)

    def section_hook(cls: type[Any]) -> _Hook:
        overrides = {
            a.name: override(
                rename=config_key(a),
                struct_hook=(_structure_duration_or_off if a.metadata.get("duration") == "or-off"
                             else _structure_duration if a.metadata.get("duration") else None),
            )
            for a in attrs.fields(cls)
        }
        inner = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, **cast(dict[str, Any], overrides)
        )

        def hook(value: Any, _type: Any) -> Any:
            return inner(as_mapping(value), _type)

        return hook

    conv.register_structure_hook_factory(attrs.has, section_hook)
    return conv


def _is_type(expected: object) -> Callable[[Any], bool]:
    return lambda t: bool(t == expected)


def structure_section(
    converter: cattrs.Converter,
    data: object,
    cls: type[T],
    path: str,
    problems: ConfigProblems,
    hints: Mapping[str, str] | None = None,
) -> T | None:
    """``data`` structured as ``cls``, or None with every problem added under ``path``."""
    try:
        return converter.structure(data, cls)
    except (InvalidValue, cattrs.BaseValidationError) as exc:
        _report(exc, path, problems, hints or {})
        return None


def _report(
    exc: BaseException, path: str, problems: ConfigProblems, hints: Mapping[str, str]
) -> None:
    """Add the problems of a cattrs error tree, each under its key path."""
    if isinstance(exc, InvalidValue):
        for keys_below, problem in exc.problems:
            where = path
            for key in keys_below:
                where = key_path(where, key)
            problems.add(where, problem)
    elif isinstance(exc, cattrs.ClassValidationError):
        keys = {a.name: config_key(a) for a in attrs.fields(exc.cl)}
        with_notes, without_notes = exc.group_exceptions()
        for inner, note in with_notes:
            _report(inner, key_path(path, keys.get(note.name, note.name)), problems, hints)
        for inner in without_notes:
            _report(inner, path, problems, hints)
    elif isinstance(exc, cattrs.ForbiddenExtraKeysError):
        known = [config_key(a) for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields, key=str):
            problems.add(key_path(path, key), unknown_key_problem(key, known, hints))
    elif isinstance(exc, KeyError):
        problems.add(path, "required")
    elif isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            _report(member, path, problems, hints)
    else:
        problems.add(path, f"invalid value: {exc}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a repeated key is an error, not "last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The top-level mapping of a YAML file; unreadable, invalid or non-mapping is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read configuration file {os.fspath(path)}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{os.fspath(path)}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problem = f"{os.fspath(path)}: expected a mapping at the top level, got {kind_of(data)}"
        raise ConfigError("", problem)
    return data
