"""Spots of cached samples as the heads' `SpotFeatures`: the bridge between the cache and the heads.

Every sample is decoded by `genedml.cache.schema.decode_sample` and copied into arrays allocated once for
all samples, in the cache's dtype and without expanding the neighbour tiles (see `genedml.heads.features`):
memory peaks at the assembled features plus one sample, not twice the features. With dihedral views,
`local` is a view of view 0 of `local_aug` (the cache stores both; only the views are read).

`stream_spot_features` describes the same spots without reading their features (`StreamedSpots`): the heads
read them a slide group at a time, so a training set larger than memory (`genedml fit --max-memory`) fits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from genedml.cache.schema import (
    ARRAYS, BARCODES, LATTICE, LOCAL, LOCAL_AUG, NEIGHBOR, NEIGHBOR_INDEX, NEIGHBOR_TILES, SlideFeatures,
    as_strings, decode_sample,
)
from genedml.cache.store import FeatureCache
from genedml.errors import InputError
from genedml.heads.features import SpotFeatures, StreamedSpots


def read_slide(cache: FeatureCache, sample_id: str, *, with_aug: bool = True) -> SlideFeatures:
    """The compact in-memory features of one sample."""
    skip = {LOCAL} if with_aug else {LOCAL_AUG}  # with views, `local` is view 0 of them
    cached = cache.read(sample_id, names=[name for name in ARRAYS if name not in skip])
    arrays = dict(cached.arrays)
    if with_aug and LOCAL_AUG in arrays:
        arrays[LOCAL] = arrays[LOCAL_AUG][:, 0]
    elif LOCAL not in arrays:  # asked for views, but the sample has none
        arrays = dict(cache.read(sample_id, names=[name for name in ARRAYS if name != LOCAL_AUG]).arrays)
    return decode_sample(sample_id, arrays, cached.attrs, with_aug=with_aug)


def load_spot_features(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> SpotFeatures:
    """All spots of `sample_ids` (whole slides, in the order given) as compact `SpotFeatures`."""
    if not sample_ids:
        raise InputError("no samples to assemble features from")
    shapes = {s: cache.array_shapes(s) for s in sample_ids}
    n_spots = [shapes[s][LOCAL][0][0] for s in sample_ids]
    n_tiles = [_tiles_in(shapes[s]) for s in sample_ids]
    first = shapes[sample_ids[0]]
    has_aug = with_aug and all(LOCAL_AUG in shapes[s] for s in sample_ids)
    has_nb = all(t is not None for t in n_tiles)
    total, (_, tokens, dim) = sum(n_spots), first[LOCAL][0]
    dtype = first[LOCAL][1]
    out = {
        "local_aug": np.empty((total, 8, tokens, dim), dtype) if has_aug else None,
        "tiles": np.empty((sum(n_tiles), dim), dtype) if has_nb else None,
        "neighbor_index": np.empty((total, NEIGHBOR_TILES), np.int32) if has_nb else None,
        "neighbor_mask": np.empty((total, NEIGHBOR_TILES), bool) if has_nb else None,
    }
    local = out["local_aug"][:, 0] if has_aug else np.empty((total, tokens, dim), dtype)
    grid = np.empty((total, 2), np.int64)
    barcodes, weights = [], set()
    row = tile = 0
    for sample_id, n, m in zip(sample_ids, n_spots, n_tiles):
        slide = read_slide(cache, sample_id, with_aug=has_aug)
        if slide.local.shape[1:] != (tokens, dim):
            raise InputError(f"sample {sample_id!r} has local tokens {slide.local.shape[1:]}, the first sample "
                             f"{(tokens, dim)}: use one cache per local-token layout")
        rows = slice(row, row + n)
        if has_aug:
            out["local_aug"][rows] = slide.local_aug
        else:
            local[rows] = slide.local
        if has_nb:
            out["tiles"][tile : tile + m] = slide.tiles
            out["neighbor_index"][rows] = slide.neighbor_index + tile
            out["neighbor_mask"][rows] = slide.neighbor_mask
        grid[rows] = slide.grid
        barcodes.append(slide.barcodes)
        weights.add(None if slide.token_weights is None else tuple(slide.token_weights.tolist()))
        row, tile = row + n, tile + (m or 0)
    if len(weights) > 1:
        raise InputError("the samples were cached with different local-token layouts; use one cache per layout")
    token_weights = weights.pop()
    return SpotFeatures(
        local=local,
        slide=np.repeat(np.arange(len(sample_ids), dtype=np.int64), n_spots),
        grid=grid,
        sample_ids=list(sample_ids),
        barcodes=np.concatenate(barcodes),
        token_weights=None if token_weights is None else np.asarray(token_weights, dtype=np.float32),
        **out,
    )


def feature_bytes(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> int:
    """Bytes that `load_spot_features` allocates for these samples (what a fit holds in memory)."""
    total = 0
    for sample_id in sample_ids:
        shapes = cache.array_shapes(sample_id)
        (n, tokens, dim), dtype = shapes[LOCAL]
        itemsize = np.dtype(dtype).itemsize
        views = 8 if with_aug and LOCAL_AUG in shapes else 1
        tiles = _tiles_in(shapes)
        total += n * views * tokens * dim * itemsize + 16 * n  # features, grid
        if tiles is not None:
            total += tiles * dim * itemsize + n * NEIGHBOR_TILES * 5  # tiles, int32 index, bool mask
    return total


def stream_spot_features(cache: FeatureCache, sample_ids: Sequence[str], *, with_aug: bool = True) -> StreamedSpots:
    """The spots of `sample_ids` (rows as `load_spot_features` orders them), features left in the cache.

    Only the barcodes are read now; `StreamedSpots.read` loads whole slides when a batch needs them.
    """
    if not sample_ids:
        raise InputError("no samples to assemble features from")
    ids = list(sample_ids)
    barcodes = [as_strings(cache.read(s, names=[BARCODES]).arrays[BARCODES]) for s in ids]
    dims = {cache.array_shapes(s)[LOCAL][0][2] for s in ids}
    if len(dims) > 1:
        raise InputError(f"the samples have features of different widths {sorted(dims)}; use one cache per backbone")

    def read(slides: Sequence[int]) -> SpotFeatures:
        return load_spot_features(cache, [ids[s] for s in slides], with_aug=with_aug)

    return StreamedSpots(
        slide=np.repeat(np.arange(len(ids), dtype=np.int64), [len(b) for b in barcodes]),
        sample_ids=ids,
        barcodes=np.concatenate(barcodes),
        dim=int(dims.pop()),
        read=read,
    )


def _tiles_in(shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int | None:
    """Rows of the tile table a sample contributes (None without the neighbour scale)."""
    if NEIGHBOR in shapes:
        return shapes[NEIGHBOR][0][0] * NEIGHBOR_TILES
    if LATTICE in shapes and NEIGHBOR_INDEX in shapes:
        return shapes[LATTICE][0][0]
    return None
