"""Patch geometry in physical units: local patches, 5 x 5 neighbourhoods (exact or shared lattice).

Boxes are int64 (x, y, w, h) in level-0 pixels, x = column, y = row of the top-left corner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 5
# Row-major offsets (drow, dcol) of the 25 neighbourhood tiles; index 12 is the spot's own tile.
OFFSETS = np.array([(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)], dtype=np.int64)
CENTRE_TILE = 12


@dataclass(frozen=True)
class Geometry:
    """A scale is a field of view in µm rendered at `patch_px` pixels.

    `mpp_target` None keeps the slide's own resolution (the Gene-DML protocol); 0.5 is the HEST protocol.
    """

    patch_px: int = 224
    mpp_target: float | None = None

    def fov_px(self, mpp: float) -> int:
        """Side of the local field of view in level-0 pixels of a slide with `mpp` µm/px."""
        target = self.mpp_target or mpp
        return max(1, int(round(self.patch_px * target / mpp)))

    def fov_um(self, mpp: float) -> float:
        return self.fov_px(mpp) * mpp


def local_boxes(centers: np.ndarray, fov: int) -> np.ndarray:
    """(N, 4) boxes of side `fov` centred on each spot (rounded to whole pixels)."""
    top_left = np.rint(np.asarray(centers, dtype=np.float64) - fov / 2.0).astype(np.int64)
    return np.concatenate([top_left, np.full_like(top_left, fov)], axis=1)


def _neighbour_top_left(centers: np.ndarray, fov: int) -> np.ndarray:
    """(N, 25, 2) top-left corners of the exact 5 x 5 tiles around each spot."""
    tl = local_boxes(centers, fov)[:, None, :2]
    return tl + OFFSETS[None, :, ::-1] * fov  # OFFSETS are (row, col); boxes are (x=col, y=row)


def _valid_tiles(top_left: np.ndarray, fov: int, width: int, height: int) -> np.ndarray:
    """A tile is on the image when its centre is (the same rule for exact and lattice modes)."""
    centre = top_left + fov / 2.0
    return (centre[..., 0] >= 0) & (centre[..., 0] < width) & (centre[..., 1] >= 0) & (centre[..., 1] < height)


def exact_neighbor_boxes(centers: np.ndarray, fov: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference pipelines' neighbourhood: (N, 25, 4) boxes and (N, 25) validity mask."""
    tl = _neighbour_top_left(centers, fov)
    boxes = np.concatenate([tl, np.full_like(tl, fov)], axis=-1)
    return boxes, _valid_tiles(tl, fov, width, height)


@dataclass(frozen=True)
class Lattice:
    """A shared grid of tiles: `boxes` (M, 4) to encode once, `index` (N, 25) into them (-1 = masked)."""

    boxes: np.ndarray
    index: np.ndarray
    mask: np.ndarray


def lattice_neighbors(centers: np.ndarray, fov: int, width: int, height: int) -> Lattice:
    """Snap every exact neighbourhood tile to the nearest tile of one lattice of pitch `fov`.

    The lattice is anchored on the first spot's local patch, so that spot's 25 tiles coincide exactly
    with the exact mode; neighbouring spots share lattice tiles, so each piece of tissue is encoded
    about once instead of up to 25 times.
    """
    tl = _neighbour_top_left(centers, fov)
    mask = _valid_tiles(tl, fov, width, height)
    origin = local_boxes(centers[:1], fov)[0, :2]
    cells = np.rint((tl - origin) / fov).astype(np.int64)  # (N, 25, 2) lattice (i, j)
    valid_cells = cells[mask]
    unique, inverse = np.unique(valid_cells, axis=0, return_inverse=True)
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = inverse.reshape(-1)
    top_left = origin + unique * fov
    boxes = np.concatenate([top_left, np.full_like(top_left, fov)], axis=1).reshape(-1, 4)
    return Lattice(boxes=boxes, index=index, mask=mask)
