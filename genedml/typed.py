"""Values checked against their annotated types: the settings dataclasses' one type check (and the one
check that an id list names nothing twice).

Exact on purpose. `group="no"` is a non-empty string, so truthy, and `dim=1.5` a float: either would run as
another model than the one asked for. Numbers widen (an int where a float is annotated), lists become tuples;
nothing else is converted. Annotations this module does not know (paths, dicts, lists) pass unchecked.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

from genedml.errors import ConfigError

_NO_MATCH = object()
_PLURALS = {int: "integers", float: "numbers", str: "strings"}
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _typed(value: Any, annotation: Any) -> Any:
    """`value` as `annotation`, or `_NO_MATCH`."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            typed = _typed(value, option)
            if typed is not _NO_MATCH:
                return typed
        return _NO_MATCH
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in get_args(annotation)) else _NO_MATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        items = [_typed(v, get_args(annotation)[0]) for v in value]
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else tuple(items)
    if annotation is type(None):
        return None if value is None else _NO_MATCH
    if annotation is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if isinstance(value, bool) and annotation in (int, float, str):  # bool is an int subclass: `dim=true` is not 1
        return _NO_MATCH
    if annotation is int:
        return int(value) if isinstance(value, numbers.Integral) else _NO_MATCH
    if annotation is float:
        return float(value) if isinstance(value, numbers.Real) else _NO_MATCH
    if annotation is str:
        return value if isinstance(value, str) else _NO_MATCH
    return value


def describe(annotation: Any) -> str:
    """`annotation` in words: "an integer", "true or false", "a list of strings", ..."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is tuple:
        item = get_args(annotation)[0]
        return "a list of " + _PLURALS.get(item, f"({describe(item)})") + ' (e.g. ["a", "b"] in JSON)' * (item is str)
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def typed_value(value: Any, annotation: Any, what: str) -> Any:
    """`value` as `annotation`; a ConfigError "WHAT takes <type>, got <value>" when it is not one."""
    typed = _typed(value, annotation)
    if typed is _NO_MATCH:
        raise ConfigError(f"{what} takes {describe(annotation)}, got {value!r}.")
    return typed


def flag_of(field_name: str) -> str:
    """The command-line flag of a settings field, for messages (`val_fraction` → `--val-fraction`)."""
    return {"models": "--model", "ablations": "--ablation", "k": "--retrieve-k"}.get(field_name, "--" + field_name.replace("_", "-"))


def check_fields(settings: Any, name_of: Any = None) -> None:
    """Check (and widen) every field of a frozen settings dataclass in place; call from `__post_init__`.
    `name_of(field)` names a field in messages (default: the field name)."""
    hints = get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        typed = typed_value(value, hints[f.name], name_of(f.name) if name_of else f.name)
        if typed is not value:
            object.__setattr__(settings, f.name, typed)


def check_unique(flag: str, ids: Sequence[str] | None) -> None:
    """Refuse an id list that names an id twice (a sample would be trained on, scored or written twice)."""
    twice = sorted({i for i in ids or [] if list(ids or []).count(i) > 1})
    if twice:
        raise ConfigError(f"{flag} lists {', '.join(twice)} more than once")
