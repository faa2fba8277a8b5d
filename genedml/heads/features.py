"""What every head consumes: cached features of a set of spots, in memory, never images."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEIGHBOR_TILES = 25  # 5 x 5 grid, row-major, centre tile at index 12


@dataclass
class SpotFeatures:
    """Features of N spots drawn from one or more slides.

    local:         (N, T, D) float32; token 0 is the pooled/CLS vector, tokens 1.. the pooled patch grid.
    local_aug:     (N, 8, T, D) float32 or None; the 8 dihedral views of the local patch (view 0 = identity).
    neighbor:      (N, 25, D) float32 or None; 5 x 5 tiles around the spot, row-major.
    neighbor_mask: (N, 25) bool or None; True = tile on the image (valid).
    slide:         (N,) int; index into ``sample_ids`` of each spot's slide.
    grid:          (N, 2) int; integer grid position (x = column, y = row) of each spot on its slide, used by
                   the global positional encoding (PEG).
    sample_ids:    slide names, indexed by ``slide``.
    barcodes:      (N,) str.
    slide_local:   per slide index, the pooled vectors (M_s, D) and grid (M_s, 2) of *all* spots of that
                   slide (the global scale sees the whole slide even when N holds only some of its spots),
                   plus ``slide_pos``: (N,) the row of each spot inside its slide's arrays.
    """

    local: np.ndarray
    slide: np.ndarray
    grid: np.ndarray
    sample_ids: list[str]
    barcodes: np.ndarray
    local_aug: np.ndarray | None = None
    neighbor: np.ndarray | None = None
    neighbor_mask: np.ndarray | None = None
    slide_tokens: dict[int, np.ndarray] = field(default_factory=dict)
    slide_grid: dict[int, np.ndarray] = field(default_factory=dict)
    slide_pos: np.ndarray | None = None

    def __post_init__(self) -> None:
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

    def take(self, index: np.ndarray) -> "SpotFeatures":
        """Rows `index` of every per-spot array; slide-level arrays are shared (global scale unchanged)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return SpotFeatures(
            local=self.local[index],
            slide=self.slide[index],
            grid=self.grid[index],
            sample_ids=self.sample_ids,
            barcodes=self.barcodes[index],
            local_aug=pick(self.local_aug),
            neighbor=pick(self.neighbor),
            neighbor_mask=pick(self.neighbor_mask),
            slide_tokens=self.slide_tokens,
            slide_grid=self.slide_grid,
            slide_pos=self.slide_pos[index],
        )
