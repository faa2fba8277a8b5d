"""Spots of cached samples as the heads' `SpotFeatures`: the bridge between the cache and the heads.

Reads each sample through `genedml.cache.schema.decode_sample` and concatenates slides without changing
dtype or expanding the neighbour tiles (see `genedml.heads.features`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from genedml.cache.schema import ARRAYS, LOCAL_AUG, SlideFeatures, decode_sample
from genedml.cache.store import FeatureCache
from genedml.errors import InputError
from genedml.heads.features import SpotFeatures


def read_slides(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> list[SlideFeatures]:
    """The compact in-memory features of each sample, in the order given."""
    slides = []
    for sample_id in sample_ids:
        names = None if with_aug else [name for name in ARRAYS if name != LOCAL_AUG]  # skip the 8x-larger views
        cached = cache.read(sample_id, names=names)
        slides.append(decode_sample(sample_id, cached.arrays, cached.attrs, with_aug=with_aug))
    return slides


def assemble(slides: Sequence[SlideFeatures]) -> SpotFeatures:
    """One `SpotFeatures` over all spots of `slides` (tile indices offset into one shared table)."""
    if not slides:
        raise InputError("no samples to assemble features from")
    has_aug = all(s.local_aug is not None for s in slides)
    has_nb = all(s.tiles is not None for s in slides)
    weights = {None if s.token_weights is None else tuple(s.token_weights.tolist()) for s in slides}
    if len(weights) > 1:
        raise InputError("the samples were cached with different local-token layouts; use one cache per layout")
    index_parts, offset = [], 0
    if has_nb:
        for s in slides:
            index_parts.append(s.neighbor_index + offset)
            offset += len(s.tiles)
    cat = np.concatenate
    token_weights = weights.pop()
    return SpotFeatures(
        local=cat([s.local for s in slides]),
        slide=cat([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(slides)]),
        grid=cat([s.grid for s in slides]),
        sample_ids=[s.sample_id for s in slides],
        barcodes=cat([s.barcodes for s in slides]),
        local_aug=cat([s.local_aug for s in slides]) if has_aug else None,
        tiles=cat([s.tiles for s in slides]) if has_nb else None,
        neighbor_index=cat(index_parts) if has_nb else None,
        neighbor_mask=cat([s.neighbor_mask for s in slides]) if has_nb else None,
        token_weights=None if token_weights is None else np.asarray(token_weights, dtype=np.float32),
    )


def load_spot_features(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> SpotFeatures:
    """All spots of `sample_ids` (whole slides, in cache order) as compact `SpotFeatures`."""
    return assemble(read_slides(cache, sample_ids, with_aug=with_aug))
