"""Heads trained on cached features: Gene-DML (dual-pathway), and the ridge, BLEEP and TRIPLEX baselines.

`make_head(name, settings)` builds any registered head and `load_head(dir)` reads a saved one (both in
`genedml.heads.registry`, imported lazily here so that importing `genedml.heads` does not import torch).
"""

from typing import Any

from genedml.heads.features import SpotFeatures

_REGISTRY_NAMES = {"HEADS", "accepted_settings", "available_heads", "head_settings", "load_head", "make_head"}
__all__ = ["SpotFeatures", *sorted(_REGISTRY_NAMES)]


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from genedml.heads import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'genedml.heads' has no attribute {name!r}")
