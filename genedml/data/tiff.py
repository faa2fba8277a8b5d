"""TIFF / BigTIFF / SVS region reader: level 0 through tifffile's zarr store, decoding only the tiles a region
touches (a whole slide is never decoded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from genedml.data.image import Region, _as_rgb, padded_region
from genedml.errors import ImageError

# Axis layouts of tifffile series that hold one 2-D image (S = samples per pixel, C = channels).
_PLANAR = {"SYX", "CYX"}
_CONTIGUOUS = {"YXS", "YXC"}


class TiffImage:
    """A lazily read TIFF/BigTIFF/SVS (pyramidal or not); ``read_region`` works in level-0 pixels.

    ``chunks_read`` counts the level-0 tiles (chunks) fetched from the file since open or the last
    ``reset_counter()`` — tests use it to prove that a region read touches only the tiles it needs.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile
        import zarr

        self.path = str(path)
        if not Path(path).is_file():
            raise ImageError(f"Image not found: {path}.")
        try:
            self._tiff = tifffile.TiffFile(self.path)
            series = self._tiff.series[0]
            self.axes = series.axes
            self.n_levels = len(series.levels)
            _check_complete(series.levels[0], self.path)
            self._store = series.aszarr(level=0)
            self._array = zarr.open(self._store, mode="r")
        except ImageError:
            self._close_quietly()
            raise
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
            self._close_quietly()
            raise ImageError(f"Cannot read TIFF {path}: {exc}. Is it a valid (Big)TIFF/SVS file?") from exc
        if not hasattr(self._array, "shape"):  # a group (multiscale store): the level-0 array is "0"
            self._array = self._array["0"]
        self.height, self.width = _size(self.axes, self._array.shape, self.path)
        self.chunks_read = 0
        self._count_chunk_reads()

    def _count_chunk_reads(self) -> None:
        """Wrap the store's `get` so every data chunk fetched from the file increments `chunks_read`."""
        get = self._store.get

        async def counting_get(key: str, *args: Any, **kwargs: Any):
            if not key.endswith(("zarr.json", ".zarray", ".zgroup", ".zattrs")):
                self.chunks_read += 1
            return await get(key, *args, **kwargs)

        self._store.get = counting_get  # type: ignore[method-assign]

    def reset_counter(self) -> None:
        self.chunks_read = 0

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(rows, columns) of one level-0 chunk (a TIFF tile, or a strip for striped files)."""
        return _size(self.axes, self._array.chunks, self.path)

    def _fetch(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            if self.axes in _PLANAR:
                block = np.moveaxis(np.asarray(self._array[:, y0:y1, x0:x1]), 0, -1)
            else:
                block = np.asarray(self._array[y0:y1, x0:x1])
        except Exception as exc:  # codec errors from imagecodecs have no common base class
            raise ImageError(
                f"Cannot decode region x={x0}..{x1}, y={y0}..{y1} of {self.path}: {exc}. "
                "The file may be truncated or corrupt."
            ) from exc
        return _as_rgb(block, self.path)

    def read_region(self, x: int, y: int, w: int, h: int) -> Region:
        return padded_region(x, y, w, h, self.width, self.height, self._fetch)

    def release(self) -> None:
        """Nothing to drop: tiles are read on demand (kept for symmetry with PillowImage)."""

    def close(self) -> None:
        """Close the file handle now (a later read reopens it)."""
        self._close_quietly()

    def _close_quietly(self) -> None:
        tiff = getattr(self, "_tiff", None)
        if tiff is not None:
            tiff.close()

    def __repr__(self) -> str:
        return f"TiffImage({self.path!r}, {self.width}x{self.height}, axes={self.axes}, levels={self.n_levels})"


def _size(axes: str, shape: tuple[int, ...], path: str) -> tuple[int, int]:
    """(height, width) of a level-0 shape, or an ImageError for layouts that are not one 2-D image."""
    if axes == "YX" or axes in _CONTIGUOUS:
        return int(shape[0]), int(shape[1])
    if axes in _PLANAR and shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    raise ImageError(
        f"{path}: unsupported TIFF layout (axes {axes!r}, shape {tuple(shape)}); expected a single 2-D "
        "RGB or greyscale image (YXS, YX or SYX)."
    )


def _check_complete(level0: Any, path: str) -> None:
    """Raise when level-0 tiles point past the end of the file (a truncated download or copy)."""
    size = os.path.getsize(path)
    ends = [
        offset + count
        for page in level0.pages
        if page is not None
        for offset, count in zip(page.dataoffsets, page.databytecounts)
        if count
    ]
    if ends and max(ends) > size:
        missing = sum(end > size for end in ends)
        raise ImageError(
            f"TIFF {path} is truncated: it has {size} bytes but {missing} of {len(ends)} level-0 tiles end "
            f"beyond that (up to byte {max(ends)}). Copy or download the file again."
        )
