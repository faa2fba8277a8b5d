"""Which region reader opens which image file: chosen by extension, every one lazy where the format allows."""

from __future__ import annotations

from pathlib import Path

from genedml.data.image import PillowImage, RegionReader
from genedml.data.tiff import TiffImage

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ndpi")


def open_image(path: str | Path) -> RegionReader:
    """Open an image by extension: TIFF/SVS lazily through tifffile, everything else through Pillow."""
    if Path(path).suffix.lower() in TIFF_SUFFIXES:  # ".ome.tif" ends in ".tif"
        return TiffImage(path)
    return PillowImage(path)
