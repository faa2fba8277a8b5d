"""The one JSON helper: plain JSON values from settings, numpy scalars/arrays and paths, written atomically;
and KEY=VALUE options whose values are JSON where they parse as JSON."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from genedml.errors import ConfigError


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)  # paths, enums


def jsonable(value: Any) -> Any:
    """JSON round-trip: tuples become lists, numpy values Python numbers/lists, anything else its str()."""
    return json.loads(json.dumps(value, default=_default))


def dumps(value: Any, indent: int | None = 2) -> str:
    """`json.dumps` with the same conversions as `jsonable`."""
    return json.dumps(value, indent=indent, default=_default)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path to write `path` through: it replaces `path` when the block ends without error and is
    removed otherwise, so a reader sees the old file or the new one, never a partial write. It is hidden and
    does not end in `path`'s suffix, so a folder scan for `*.h5ad` or `*.h5` never takes it for a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_file`, flushed to disk before the rename."""
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON (converted as by `jsonable`), written atomically."""
    write_text_atomic(path, dumps(value))


def parse_key_values(items: list[str], flag: str = "--head-option") -> dict[str, Any]:
    """`--head-option` KEY=VALUE strings as a dict: values parsed as JSON where they are JSON (numbers,
    booleans, lists), else kept as strings; `head_settings` then checks each against its setting's type."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}.")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out
