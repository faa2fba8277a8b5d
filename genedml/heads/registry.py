"""The heads genedml knows, by name. Adding a head is one module plus one line in `HEADS`.

`head_settings(name, values)` is the one place where flat user values (CLI flags, `--head-option`, TOML,
saved head.json) become a head's typed settings; unknown names fail there, naming the closest valid one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from genedml.errors import ConfigError, ModelDirError
from genedml.heads.base import Head, build_settings, read_head_json, setting_names, unknown_setting
from genedml.heads.bleep import BleepHead
from genedml.heads.gene_dml import GeneDMLHead
from genedml.heads.ridge import RidgeCVHead, RidgeHead
from genedml.heads.triplex import TriplexHead

HEADS: dict[str, type[Head]] = {
    cls.name: cls for cls in (GeneDMLHead, TriplexHead, BleepHead, RidgeHead, RidgeCVHead)
}


def head_class(name: str) -> type[Head]:
    """The head class registered as `name`."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name]


def available_heads() -> list[str]:
    """Names `make_head` accepts, in registry order."""
    return list(HEADS)


def accepted_settings(name: str) -> set[str]:
    """Setting names of head `name`."""
    return set(setting_names(head_class(name).Settings))


def head_settings(name: str, values: Mapping[str, Any] | None = None, *, shared: Mapping[str, Any] | None = None) -> Any:
    """Typed settings of head `name` from `values` (every key must belong to this head).

    `shared` holds values meant for several heads at once (cv's flags, fit's generic flags): keys this head
    does not have are dropped, but a key that no registered head has is an error.
    """
    cls = head_class(name)
    mine = set(setting_names(cls.Settings))
    merged: dict[str, Any] = {}
    every = sorted(set().union(*(setting_names(h.Settings) for h in HEADS.values())))
    for key, value in (shared or {}).items():
        key = str(key).replace("-", "_")
        if key not in every:
            raise unknown_setting(key, every, "any head")
        if key in mine and value is not None:
            merged[key] = value
    merged.update({str(k).replace("-", "_"): v for k, v in (values or {}).items()})
    return build_settings(cls.Settings, merged, f"the {name} head")


def make_head(name: str, settings: Mapping[str, Any] | Any = None) -> Head:
    """A fresh, unfitted head: `make_head("genedml", {"epochs": 5})` or with a settings object."""
    cls = head_class(name)
    if settings is None or isinstance(settings, Mapping):
        settings = head_settings(name, settings)
    return cls(settings)


def load_head(directory: str | Path) -> Head:
    """Load any saved head; its kind is read from head.json."""
    name = read_head_json(directory).get("head")
    if name not in HEADS:
        raise ModelDirError(f"{Path(directory) / 'head.json'} names head {name!r}, not one of {list(HEADS)}")
    return HEADS[name].load(directory)
