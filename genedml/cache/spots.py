"""Turn cached samples into the in-memory `SpotFeatures` that heads consume."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from genedml.cache.store import FeatureCache
from genedml.extract.geometry import snap_to_grid
from genedml.heads.features import SpotFeatures


def load_spot_features(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> SpotFeatures:
    """All spots of `sample_ids` (whole slides, in cache order) as float32 `SpotFeatures`."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("local", "aug", "nb", "mask", "slide", "grid", "bc")}
    has_aug = has_nb = True
    for i, sample_id in enumerate(sample_ids):
        cached = cache.read(sample_id)
        n = len(cached.barcodes)
        parts["local"].append(cached.local.astype(np.float32))
        aug = cached.arrays.get("local_aug")
        has_aug &= aug is not None and with_aug
        if has_aug:
            parts["aug"].append(aug.astype(np.float32))
        neighbor = cached.neighbor()
        has_nb &= neighbor is not None
        if has_nb:
            parts["nb"].append(neighbor[0].astype(np.float32))
            parts["mask"].append(neighbor[1])
        grid = cached.arrays.get("array_coords")
        parts["grid"].append(grid.astype(np.int64) if grid is not None else snap_to_grid(cached.arrays["centers"]))
        parts["slide"].append(np.full(n, i, dtype=np.int64))
        parts["bc"].append(cached.barcodes)
    cat = np.concatenate
    return SpotFeatures(
        local=cat(parts["local"]),
        slide=cat(parts["slide"]),
        grid=cat(parts["grid"]),
        sample_ids=list(sample_ids),
        barcodes=cat(parts["bc"]),
        local_aug=cat(parts["aug"]) if has_aug and parts["aug"] else None,
        neighbor=cat(parts["nb"]) if has_nb and parts["nb"] else None,
        neighbor_mask=cat(parts["mask"]) if has_nb and parts["mask"] else None,
    )
