"""Heads trained on cached features: Gene-DML (dual-pathway), and the ridge, BLEEP and TRIPLEX baselines.

`make_head(name, **settings)` builds any registered head; `load_head(dir)` reads a saved one.
"""

from genedml.heads.base import HEADS, Head, accepted_settings, available_heads, load_head, make_head
from genedml.heads.features import SpotFeatures

__all__ = ["HEADS", "Head", "accepted_settings", "available_heads", "SpotFeatures", "load_head", "make_head"]
