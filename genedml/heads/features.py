"""What every head consumes: cached features of a set of spots, in memory, never images.

Features stay compact until a batch is made: the cache's dtype (float16 by default) and the neighbour scale
as one table of tiles plus each spot's 25 indices into it (a lattice tile is shared by ≈ 7 spots), so
memory grows with the cache, not with 25 × D floats per spot. `BatchMaker` gathers a batch's tiles.

`StreamedSpots` is the same set of spots with the features left in the cache: slides are read when a batch
needs them (`genedml fit --max-memory`). Heads take either; `slide_parts` walks both a slide at a time.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from genedml.cache.schema import NEIGHBOR_TILES

__all__ = ["NEIGHBOR_TILES", "SpotFeatures", "StreamedSpots", "slide_parts"]


@dataclass
class SpotFeatures:
    """Features of N spots drawn from one or more slides.

    local:          (N, T, D); token 0 is the pooled/CLS vector, tokens 1.. the pooled patch grid.
    local_aug:      (N, 8, T, D) or None; the 8 dihedral views of the local patch (view 0 = identity).
    tiles:          (M, D) or None; encoded neighbour tiles, shared between spots.
    neighbor_index: (N, 25) int or None; row of `tiles` for each tile of the spot's 5 x 5 grid (row-major).
    neighbor_mask:  (N, 25) bool or None; True = tile on the image (valid).
    slide:          (N,) int; index into ``sample_ids`` of each spot's slide.
    grid:           (N, 2) int; grid position (x = column, y = row) of each spot on its slide (global PEG).
    sample_ids:     slide names, indexed by ``slide``.
    barcodes:       (N,) str.
    token_weights:  (T,) float or None; how many backbone tokens each local token stands for.
    slide_tokens / slide_grid: per slide index, the pooled vectors (M_s, D) and grid (M_s, 2) of *all* spots
                    of that slide (the global scale sees the whole slide even when N holds only some of its
                    spots), plus ``slide_pos``: (N,) the row of each spot inside its slide's arrays.
    neighbor:       init-only convenience: (N, 25, D) per-spot tiles, stored as tiles + arange index.
    """

    local: np.ndarray
    slide: np.ndarray
    grid: np.ndarray
    sample_ids: list[str]
    barcodes: np.ndarray
    local_aug: np.ndarray | None = None
    tiles: np.ndarray | None = None
    neighbor_index: np.ndarray | None = None
    neighbor_mask: np.ndarray | None = None
    token_weights: np.ndarray | None = None
    slide_tokens: dict[int, np.ndarray] = field(default_factory=dict)
    slide_grid: dict[int, np.ndarray] = field(default_factory=dict)
    slide_pos: np.ndarray | None = None
    neighbor: InitVar[np.ndarray | None] = None

    def __post_init__(self, neighbor: np.ndarray | None) -> None:
        if neighbor is not None:
            n = len(neighbor)
            self.tiles = neighbor.reshape(n * neighbor.shape[1], neighbor.shape[-1])
            self.neighbor_index = np.arange(len(self.tiles), dtype=np.int64).reshape(n, neighbor.shape[1])
            if self.neighbor_mask is None:
                self.neighbor_mask = np.ones(self.neighbor_index.shape, dtype=bool)
        if self.slide_pos is None:
            # Default: the N spots are exactly the slides' spots, in slide order.
            self.slide_pos = np.zeros(len(self.slide), dtype=np.int64)
            for s in np.unique(self.slide):
                idx = np.flatnonzero(self.slide == s)
                self.slide_pos[idx] = np.arange(len(idx))
                self.slide_tokens.setdefault(int(s), self.local[idx, 0, :])
                self.slide_grid.setdefault(int(s), self.grid[idx])

    def __len__(self) -> int:
        return len(self.barcodes)

    @property
    def dim(self) -> int:
        return int(self.local.shape[-1])

    @property
    def has_neighbor(self) -> bool:
        return self.tiles is not None and self.neighbor_index is not None

    def neighbors_of(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(len(index), 25, D) tiles in the stored dtype, zero where masked, and the (len(index), 25) mask."""
        if not self.has_neighbor:
            raise ValueError("these features have no neighbour scale")
        rows = self.neighbor_index[index]
        mask = (np.ones(rows.shape, dtype=bool) if self.neighbor_mask is None
                else np.asarray(self.neighbor_mask[index], dtype=bool))
        out = self.tiles[np.where(mask, rows, 0)]
        out[~mask] = 0
        return out, mask

    def take(self, index: np.ndarray) -> "SpotFeatures":
        """Rows `index` of every per-spot array; tiles and slide-level arrays are shared (global scale unchanged)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return SpotFeatures(
            local=self.local[index],
            slide=self.slide[index],
            grid=self.grid[index],
            sample_ids=self.sample_ids,
            barcodes=self.barcodes[index],
            local_aug=pick(self.local_aug),
            tiles=self.tiles,
            neighbor_index=pick(self.neighbor_index),
            neighbor_mask=pick(self.neighbor_mask),
            token_weights=self.token_weights,
            slide_tokens=self.slide_tokens,
            slide_grid=self.slide_grid,
            slide_pos=self.slide_pos[index],
        )


@dataclass
class StreamedSpots:
    """All spots of whole slides, with their features read from the cache only when needed.

    Rows are the slides' spots concatenated in `sample_ids` order, exactly as `genedml.spots.load_spot_features`
    lays them out, so targets and predictions line up with an in-memory `SpotFeatures` of the same slides.
    `read(slides)` returns the in-memory features of those slide indices (ascending), whole.
    """

    slide: np.ndarray
    sample_ids: list[str]
    barcodes: np.ndarray
    dim: int
    read: Callable[[Sequence[int]], SpotFeatures]

    def __len__(self) -> int:
        return len(self.barcodes)

    @property
    def offsets(self) -> np.ndarray:
        """(S + 1,) first row of each slide, then N."""
        counts = np.bincount(self.slide, minlength=len(self.sample_ids))
        return np.concatenate([[0], np.cumsum(counts)])

    def load(self, slides: Sequence[int]) -> tuple[SpotFeatures, np.ndarray]:
        """The features of `slides` and an (N,) map from rows of the whole set to rows of those features
        (−1 for rows of other slides)."""
        slides = sorted(int(s) for s in slides)
        part = self.read(slides)
        offsets, to_part, row = self.offsets, np.full(len(self), -1, np.int64), 0
        for s in slides:
            n = offsets[s + 1] - offsets[s]
            to_part[offsets[s] : offsets[s + 1]] = np.arange(row, row + n)
            row += n
        if row != len(part):
            raise ValueError(f"slides {slides} hold {row} spots in the index but {len(part)} in the cache")
        return part, to_part


def slide_parts(feats: SpotFeatures | StreamedSpots) -> Iterator[tuple[np.ndarray, SpotFeatures]]:
    """(rows, features) of one slide at a time, in row order; rows index the whole set."""
    for s in np.unique(feats.slide):
        rows = np.flatnonzero(feats.slide == s)
        if isinstance(feats, StreamedSpots):
            part, _ = feats.load([int(s)])
        else:
            part = feats.take(rows)
        yield rows, part
