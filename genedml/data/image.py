"""Lazy region readers: every image format answers `read_region(x, y, w, h)` in level-0 pixels.

Regions that reach outside the image are padded with white (background of an H&E slide) and the reader
reports which part of the region lies inside, so callers can mask off-image tiles.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from genedml.errors import ImageError

WHITE = 255


@dataclass(frozen=True)
class Region:
    """Pixels of a requested region and the part of it that lies inside the image.

    ``inside`` is (x0, y0, x1, y1) in region coordinates (half-open); x0 == x1 when nothing is inside.
    """

    pixels: np.ndarray
    inside: tuple[int, int, int, int]

    @property
    def fraction_inside(self) -> float:
        x0, y0, x1, y1 = self.inside
        h, w = self.pixels.shape[:2]
        return max(0, x1 - x0) * max(0, y1 - y0) / float(w * h)


@runtime_checkable
class RegionReader(Protocol):
    """What the pipeline needs from an image: its size and level-0 regions as uint8 RGB."""

    path: str
    width: int
    height: int

    def read_region(self, x: int, y: int, w: int, h: int) -> Region: ...

    def release(self) -> None:
        """Drop decoded pixels or open handles (called after each sample to bound memory)."""
        ...


def clip_region(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Intersection of a region with the image, in image coordinates (x0, y0, x1, y1)."""
    return max(0, x), max(0, y), min(width, x + w), min(height, y + h)


def padded_region(x: int, y: int, w: int, h: int, width: int, height: int, fetch) -> Region:
    """Assemble a white-padded region; `fetch(x0, y0, x1, y1)` returns the in-image RGB block."""
    if w <= 0 or h <= 0:
        raise ValueError(f"region size must be positive, got {w}x{h}")
    out = np.full((h, w, 3), WHITE, dtype=np.uint8)
    x0, y0, x1, y1 = clip_region(x, y, w, h, width, height)
    if x1 <= x0 or y1 <= y0:
        return Region(out, (0, 0, 0, 0))
    block = fetch(x0, y0, x1, y1)
    out[y0 - y : y1 - y, x0 - x : x1 - x] = block
    return Region(out, (x0 - x, y0 - y, x1 - x, y1 - y))


def _as_rgb(array: np.ndarray, where: str) -> np.ndarray:
    """Normalise grey, RGBA or 16-bit arrays to uint8 RGB."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"{where}: expected an RGB image, got array of shape {array.shape}.")
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255:
            array = (array / 257).astype(np.uint8)
        else:
            array = array.astype(np.uint8)
    return array


class ArrayImage:
    """An image already in memory (synthetic tissue, tests, thumbnails)."""

    def __init__(self, pixels: np.ndarray, path: str = "<memory>") -> None:
        self.pixels = _as_rgb(np.asarray(pixels), path)
        self.path = path
        self.height, self.width = self.pixels.shape[:2]

    def read_region(self, x: int, y: int, w: int, h: int) -> Region:
        return padded_region(x, y, w, h, self.width, self.height, lambda x0, y0, x1, y1: self.pixels[y0:y1, x0:x1])

    def release(self) -> None:
        """Nothing to drop: the pixels are the image."""


def thumbnail_step(width: int, height: int, max_side: int) -> int:
    """The integer subsampling step that brings the long side of a width x height image to <= max_side."""
    return max(1, -(-max(width, height) // max_side))


class PillowImage:
    """JPEG/PNG: the header is read at open; the pixels are decoded once, on the first region read.

    A JPEG cannot be decoded tile by tile, so the whole image is decoded once and kept (≈270 MB for a
    10k × 10k section) — reading all spots of a sample then costs one decode, not one per patch.
    """

    def __init__(self, path: str | Path) -> None:
        from PIL import Image

        self.path = str(path)
        if not Path(path).is_file():
            raise ImageError(f"Image not found: {path}.")
        Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed Pillow's decompression-bomb guard
        try:
            with Image.open(path) as im:
                self.width, self.height = im.size
        except OSError as exc:
            raise ImageError(f"Cannot read image {path}: {exc}. Is it a valid JPEG/PNG/TIFF?") from exc
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def decode(self) -> np.ndarray:
        """The full decoded RGB array (decoded on first use, then kept)."""
        with self._lock:
            if self._pixels is None:
                from PIL import Image

                try:
                    with Image.open(self.path) as im:
                        self._pixels = _as_rgb(np.asarray(im.convert("RGB")), self.path)
                except OSError as exc:
                    raise ImageError(
                        f"Cannot decode image {self.path}: {exc}. The file may be truncated or corrupt."
                    ) from exc
            return self._pixels

    def release(self) -> None:
        """Drop the decoded pixels (extraction calls this after each sample to bound memory)."""
        with self._lock:
            self._pixels = None

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """RGB shrunk by the integer step that brings the long side to ≤ `max_side`, and its scale (1/step).

        Never holds the full image as RGB: a JPEG is decoded at 1/2–1/8 scale (libjpeg's DCT scaling) and a
        PNG is box-filtered straight from its decoded form (once the size of the file's pixels, not 3×).
        """
        from PIL import Image

        step = thumbnail_step(self.width, self.height, max_side)
        size = (-(-self.width // step), -(-self.height // step))
        try:
            with Image.open(self.path) as im:
                im.draft("RGB", size)  # JPEG only; a no-op for other formats
                if im.mode in ("1", "P"):  # bilevel/palette: shrink first (nearest), then convert the small image
                    small = im.resize(size, Image.Resampling.NEAREST)
                elif im.mode in ("RGB", "RGBA", "L", "LA"):
                    small = im.resize(size, Image.Resampling.BOX)
                else:  # 16-bit, CMYK…: rare; converted at full size
                    small = im.convert("RGB").resize(size, Image.Resampling.BOX)
        except OSError as exc:
            raise ImageError(f"Cannot decode image {self.path}: {exc}. The file may be truncated or corrupt.") from exc
        return _as_rgb(np.asarray(small.convert("RGB")), self.path), 1.0 / step

    def read_region(self, x: int, y: int, w: int, h: int) -> Region:
        pixels = self.decode()
        return padded_region(x, y, w, h, self.width, self.height, lambda x0, y0, x1, y1: pixels[y0:y1, x0:x1])
