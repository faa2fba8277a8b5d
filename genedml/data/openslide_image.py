"""Whole-slide formats tifffile cannot read (MIRAX, Hamamatsu, Leica, Ventana, Sakura, Zeiss, DICOM) through
OpenSlide: the optional extra ``genedml[openslide]`` (``openslide-python`` + the ``openslide-bin`` wheel)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from genedml.data.image import WHITE, Region, padded_region
from genedml.errors import ImageError

INSTALL_HINT = "pip install 'genedml[openslide]'"
MPP_PROPERTIES = ("openslide.mpp-x", "openslide.mpp-y")


def import_openslide(path: str = "") -> Any:
    """The ``openslide`` module, or an ImageError that says how to install it."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # no package, or the package without its shared library
        what = f"{path}: {Path(path).suffix or 'this'} slides are" if path else "Slides in vendor formats are"
        raise ImageError(
            f"{what} read through OpenSlide, which is not available ({exc}). Install it with {INSTALL_HINT} "
            "(openslide-python and the openslide-bin library wheel; no system package needed)."
        ) from exc
    return openslide


def openslide_available() -> bool:
    """Whether OpenSlide (Python binding and library) can be imported."""
    try:
        import_openslide()
    except ImageError:
        return False
    return True


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an OpenSlide RGBA region laid on white: areas outside the scan (alpha 0) become white.

    OpenSlide returns non-premultiplied RGBA, so opaque pixels keep their exact values.
    """
    alpha = rgba[..., 3:4]
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint32)
    rgb = (rgba[..., :3].astype(np.uint32) * a + WHITE * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class OpenSlideImage:
    """A slide opened with OpenSlide; ``read_region`` works in level-0 pixels like every region reader.

    The handle is opened at construction (to read the size) and again on the first read after ``release()``.
    ``vendor`` is OpenSlide's format name (``mirax``, ``hamamatsu``, ``generic-tiff``…); ``mpp`` is the
    scanner's µm/px when the file records it (None otherwise).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not Path(path).exists():
            raise ImageError(f"Image not found: {path}.")
        self._openslide = import_openslide(self.path)
        self._lock = threading.Lock()
        self._slide: Any = None
        slide = self._handle()
        self.width, self.height = (int(v) for v in slide.dimensions)
        self.n_levels = int(slide.level_count)
        self.vendor = self._openslide.OpenSlide.detect_format(self.path)
        self.mpp = _mpp(slide.properties)

    def _handle(self) -> Any:
        with self._lock:
            if self._slide is None:
                try:
                    self._slide = self._openslide.OpenSlide(self.path)
                except (self._openslide.OpenSlideError, OSError, ValueError) as exc:
                    raise ImageError(
                        f"Cannot open slide {self.path} with OpenSlide: {exc}. Is it a complete slide in a format "
                        "OpenSlide reads (MIRAX .mrxs needs its data folder next to it, VMS/VMU their JPEG files)?"
                    ) from exc
            return self._slide

    def _fetch(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            rgba = np.asarray(self._handle().read_region((x0, y0), 0, (x1 - x0, y1 - y0)))
        except self._openslide.OpenSlideError as exc:
            raise ImageError(
                f"Cannot decode region x={x0}..{x1}, y={y0}..{y1} of {self.path}: {exc}. "
                "The file may be truncated or corrupt."
            ) from exc
        return composite_on_white(rgba)

    def read_region(self, x: int, y: int, w: int, h: int) -> Region:
        return padded_region(x, y, w, h, self.width, self.height, self._fetch)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """OpenSlide's thumbnail (from the best pyramid level, long side ≤ `max_side`) and its scale."""
        try:
            thumb = self._handle().get_thumbnail((max_side, max_side))
        except self._openslide.OpenSlideError as exc:
            raise ImageError(f"Cannot read a thumbnail of {self.path}: {exc}. The file may be truncated or corrupt.") from exc
        return composite_on_white(np.asarray(thumb.convert("RGBA"))), thumb.width / self.width

    def release(self) -> None:
        """Close the handle (and OpenSlide's tile cache); the next read reopens it."""
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None

    def __repr__(self) -> str:
        return f"OpenSlideImage({self.path!r}, {self.width}x{self.height}, vendor={self.vendor}, levels={self.n_levels})"


def _mpp(properties: Any) -> float | None:
    values = []
    for key in MPP_PROPERTIES:
        try:
            values.append(float(properties[key]))
        except (KeyError, TypeError, ValueError):
            return None
    return float(np.mean(values)) if all(v > 0 for v in values) else None
