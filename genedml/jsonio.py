"""The one JSON helper: plain JSON values from settings, numpy scalars/arrays and paths."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


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
