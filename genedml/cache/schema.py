"""What a cached sample holds: every array and attribute name, and the one decoder of a cached group.

A sample group (see `genedml.cache.store` for the store around it) holds, per spot, the local scale and
optionally its 8 dihedral views, and the neighbour scale as a table of encoded tiles plus each spot's
5 × 5 index into it and a validity mask:

    local            (N, T, D) float   token 0 = pooled/CLS vector, tokens 1.. = pooled patch-token grid
    local_aug        (N, 8, T, D)      the 8 dihedral views (view 0 = identity); optional
    lattice          (M, D)            neighbour tiles shared between spots (neighbor_mode "lattice")
    lattice_boxes    (M, 4) int        level-0 box (x, y, w, h) of each lattice tile
    neighbor         (N, 25, D)        25 tiles per spot (neighbor_mode "exact")
    neighbor_index   (N, 25) int       row of `lattice` for each of a spot's 25 tiles (lattice mode)
    neighbor_mask    (N, 25) bool      True = the tile lies on the image
    barcodes         (N,) str
    centers          (N, 2) float      level-0 pixels, x = column, y = row
    array_coords     (N, 2) int        grid position (column, row); written by every extraction since 0.2

`decode_sample` turns these into `SlideFeatures`, the compact in-memory form (the cache's dtype, tiles
kept once) that `genedml.spots` assembles for the heads. Nothing else reads the arrays by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from genedml.data.spots import snap_to_grid
from genedml.errors import InputError

LOCAL = "local"
LOCAL_AUG = "local_aug"
LATTICE = "lattice"
LATTICE_BOXES = "lattice_boxes"
NEIGHBOR = "neighbor"
NEIGHBOR_INDEX = "neighbor_index"
NEIGHBOR_MASK = "neighbor_mask"
BARCODES = "barcodes"
CENTERS = "centers"
ARRAY_COORDS = "array_coords"
ARRAYS = (LOCAL, LOCAL_AUG, LATTICE, LATTICE_BOXES, NEIGHBOR, NEIGHBOR_INDEX, NEIGHBOR_MASK, BARCODES, CENTERS, ARRAY_COORDS)
FEATURE_ARRAYS = (LOCAL, LOCAL_AUG, LATTICE, NEIGHBOR, NEIGHBOR_INDEX, NEIGHBOR_MASK, BARCODES, CENTERS, ARRAY_COORDS)

# Sample attributes written at extraction (store.py adds "complete" and "completed" at commit).
ATTRS = ("sample_id", "patient_id", "patient_known", "source", "image", "image_size", "mpp", "fov_px", "fov_um",
         "neighbor_fov_um", "n_spots", "tiles_encoded", "seconds", "local_token_weights")
NEIGHBOR_TILES = 25  # 5 x 5 grid, row-major, centre tile at index 12


@dataclass
class SlideFeatures:
    """One cached sample in memory, compact: the cache's dtype, neighbour tiles stored once.

    tiles (M, D) with neighbor_index (N, 25) into it and neighbor_mask (N, 25); all three None without
    the neighbour scale. An exact-mode cache becomes M = 25 N tiles with index = arange.
    """

    sample_id: str
    local: np.ndarray
    barcodes: np.ndarray
    centers: np.ndarray
    grid: np.ndarray
    local_aug: np.ndarray | None = None
    tiles: np.ndarray | None = None
    neighbor_index: np.ndarray | None = None
    neighbor_mask: np.ndarray | None = None
    token_weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.barcodes)


def as_strings(values: np.ndarray) -> np.ndarray:
    """Barcodes as a plain numpy str array (zarr returns numpy's StringDType)."""
    return np.array(np.asarray(values).tolist(), dtype=str)


def decode_sample(sample_id: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], *, with_aug: bool = True) -> SlideFeatures:
    """The in-memory features of one cached sample group (arrays as read, attributes as stored)."""
    if LOCAL not in arrays or BARCODES not in arrays:
        raise InputError(f"cached sample {sample_id!r} has no {LOCAL!r}/{BARCODES!r} arrays; re-extract it")
    local = arrays[LOCAL]
    n = len(local)
    tiles = index = mask = None
    if NEIGHBOR in arrays:
        exact = arrays[NEIGHBOR]
        tiles = exact.reshape(n * NEIGHBOR_TILES, exact.shape[-1])
        index = np.arange(n * NEIGHBOR_TILES, dtype=np.int64).reshape(n, NEIGHBOR_TILES)
        mask = arrays[NEIGHBOR_MASK].astype(bool)
    elif LATTICE in arrays:
        tiles = arrays[LATTICE]
        mask = arrays[NEIGHBOR_MASK].astype(bool)
        index = np.where(mask, arrays[NEIGHBOR_INDEX], 0).astype(np.int64)  # masked slots point at row 0
    centers = np.asarray(arrays[CENTERS], dtype=np.float64)
    grid = arrays.get(ARRAY_COORDS)
    # Caches written before 0.2 lack array_coords when the input had none: derive them as extraction now does.
    grid = snap_to_grid(centers) if grid is None else np.asarray(grid, dtype=np.int64)
    weights = attrs.get("local_token_weights")
    return SlideFeatures(
        sample_id=sample_id,
        local=local,
        barcodes=as_strings(arrays[BARCODES]),
        centers=centers,
        grid=grid,
        local_aug=arrays.get(LOCAL_AUG) if with_aug else None,
        tiles=tiles,
        neighbor_index=index,
        neighbor_mask=mask,
        token_weights=None if weights is None else np.asarray(weights, dtype=np.float32),
    )
