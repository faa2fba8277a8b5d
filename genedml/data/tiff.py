"""TIFF / BigTIFF / SVS region reader: level 0 through tifffile's zarr store, decoding only the tiles a region
touches (a whole slide is never decoded)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from genedml.data.image import Region, _as_rgb, padded_region, thumbnail_step
from genedml.errors import ImageError

# Axis layouts of tifffile series that hold one 2-D image (S = samples per pixel, C = channels).
_PLANAR = {"SYX", "CYX"}
_CONTIGUOUS = {"YXS", "YXC"}
_METADATA_KEYS = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
TILE_CACHE_MB = 128.0  # default bound on decoded tiles kept per open slide (~680 tiles of 256 x 256 RGB)


class _TileCache:
    """Decoded tiles by chunk key; the least recently used go first once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._tiles: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tiles)

    def __contains__(self, key: str) -> bool:
        return key in self._tiles

    def get(self, key: str) -> bytes | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: str, tile: bytes) -> None:
        if len(tile) > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            self.nbytes += len(tile) - (len(old) if old is not None else 0)
            self._tiles[key] = tile
            while self.nbytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self.nbytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self.nbytes = 0


class TiffImage:
    """A lazily read TIFF/BigTIFF/SVS (pyramidal or not); ``read_region`` works in level-0 pixels.

    Decoded level-0 tiles are kept in a least-recently-used cache of at most `tile_cache_mb` (0: none), so
    neighbouring spots read in spatial order decode a shared tile once; ``release()`` empties it.
    ``chunks_read`` counts the level-0 tiles (chunks) fetched from the file and decoded since open or the
    last ``reset_counter()``, ``bytes_decoded`` their decoded size and ``cache_hits`` the tiles served from
    the cache — tests and benchmarks/gigapixel.py use them to prove that a region read touches only the
    tiles it needs.
    """

    def __init__(self, path: str | Path, tile_cache_mb: float = TILE_CACHE_MB) -> None:
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
        self._tiles = _TileCache(int(tile_cache_mb * 2**20))
        self.reset_counter()
        self._cache_and_count_chunk_reads()

    def _cache_and_count_chunk_reads(self) -> None:
        """Wrap the store's `get`: serve a chunk from the tile cache, or fetch and decode it from the file
        (counted in `chunks_read` and `bytes_decoded`) and keep it."""
        get = self._store.get

        async def caching_get(key: str, prototype: Any, byte_range: Any = None) -> Any:
            if key.endswith(_METADATA_KEYS):
                return await get(key, prototype, byte_range)
            tile = self._tiles.get(key)
            if tile is not None:
                self.cache_hits += 1
                return prototype.buffer.from_bytes(tile)
            chunk = await get(key, prototype, byte_range)
            self.chunks_read += 1
            if chunk is not None:
                self.bytes_decoded += len(chunk)
                if self._tiles.max_bytes:
                    self._tiles.put(key, chunk.to_bytes())
            return chunk

        self._store.get = caching_get  # type: ignore[method-assign]

    def reset_counter(self) -> None:
        self.chunks_read = 0
        self.bytes_decoded = 0
        self.cache_hits = 0

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

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float] | None:
        """RGB from the smallest pyramid level whose long side is ≥ `max_side`, subsampled to ≤ `max_side`,
        and its scale (thumbnail px per level-0 px); None without such a level (the caller reads level 0)."""
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tiff:
                levels = [(_size(self.axes, level.shape, self.path), level) for level in tiff.series[0].levels[1:]]
                usable = [(hw, level) for hw, level in levels if max(hw) >= max_side]
                if not usable:
                    return None
                (height, width), level = min(usable, key=lambda item: item[0][0] * item[0][1])
                block = level.asarray()
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
            raise ImageError(f"Cannot read the pyramid of {self.path}: {exc}. The file may be truncated or corrupt.") from exc
        if self.axes in _PLANAR:
            block = np.moveaxis(block, 0, -1)
        step = thumbnail_step(width, height, max_side)
        return _as_rgb(block[::step, ::step], self.path), (width / self.width) / step

    def release(self) -> None:
        """Drop the cached tiles (extraction calls this after each sample to bound memory)."""
        self._tiles.clear()

    def close(self) -> None:
        """Drop the cached tiles and close the file handle now (a later read reopens it)."""
        self._tiles.clear()
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
