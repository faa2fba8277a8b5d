"""Patch geometry in physical units: local patches, 5 x 5 neighbourhoods (exact or shared lattice).

Boxes are int64 (x, y, w, h) in level-0 pixels, x = column, y = row of the top-left corner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from genedml.errors import ConfigError
from genedml.log import log

GRID = 5
# µm per pixel of real H&E images: 0.25 (40x) and 0.5 (20x) scans, Visium/ST full-resolution images up to a
# few µm/px, thumbnails up to ~20. Outside this range a value is almost surely a unit mistake (mm, px/µm).
MPP_RANGE = (0.05, 20.0)
MAX_FOV_PX = 16384  # one local patch read at this side is 0.8 GB of RGB: a wrong mpp, not a plan
MIN_FOV_PX = 8  # below this a patch is upsampled from a few pixels and carries no morphology
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


def check_mpp(mpp: float | None, where: str, *, allow_unusual: bool = False, source: str = "--mpp") -> None:
    """Refuse a non-positive µm/px, and one outside MPP_RANGE unless `allow_unusual` (--allow-unusual-mpp)."""
    if mpp is None:
        return
    prefix = f"{where}: " if where else ""
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"{prefix}{source} must be a positive number of µm per pixel, got {mpp!r}.")
    low, high = MPP_RANGE
    if not allow_unusual and not low <= mpp <= high:
        raise ConfigError(
            f"{prefix}{source} {mpp:g} µm/px is outside the plausible range {low:g}–{high:g} µm/px (0.25 = 40x, "
            f"0.5 = 20x scans); check the value and its unit, or pass --allow-unusual-mpp if it is right."
        )


def check_patch_geometry(sample_id: str, mpp: float, width: int, height: int, geometry: Geometry, *, allow_unusual: bool = False) -> None:
    """Before extraction: a plausible mpp, a patch that is neither gigantic nor sub-pixel, and an image that holds one."""
    check_mpp(mpp, f"sample '{sample_id}'", allow_unusual=allow_unusual, source="mpp")
    fov = geometry.fov_px(mpp)
    if fov > MAX_FOV_PX and not allow_unusual:
        raise ConfigError(
            f"sample '{sample_id}': one patch would be {fov} px wide ({geometry.patch_px} px at {geometry.mpp_target} µm/px "
            f"from {mpp:g} µm/px); check --mpp / --mpp-target, or pass --allow-unusual-mpp."
        )
    if geometry.patch_px * (geometry.mpp_target or mpp) / mpp < MIN_FOV_PX:
        log.warning("sample '%s': each patch is read from a %d px region (%g µm/px) and upsampled to %d px; check --mpp",
                    sample_id, fov, mpp, geometry.patch_px)
    if fov > width or fov > height:
        log.warning("sample '%s': the image (%d x %d px) is smaller than one patch (%d px = %.0f µm); patches are padded with white",
                    sample_id, width, height, fov, fov * mpp)


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
