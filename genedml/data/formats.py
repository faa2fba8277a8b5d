"""Which region reader opens which image file: chosen by extension, every one lazy where the format allows."""

from __future__ import annotations

from pathlib import Path

from genedml.data.image import PillowImage, RegionReader
from genedml.data.openslide_image import INSTALL_HINT, OpenSlideImage, openslide_available
from genedml.data.tiff import TiffImage
from genedml.log import log

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf")  # tifffile, tile by tile (".ome.tif" ends in ".tif")
# Vendor formats read through OpenSlide (the `openslide` extra). NDPI is a TIFF variant: without OpenSlide it
# falls back to tifffile; the others have no fallback.
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".czi", ".bif", ".svslide", ".dcm")
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png")
SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
IMAGE_SUFFIXES = SLIDE_SUFFIXES + PICTURE_SUFFIXES  # every extension open_image reads


def open_image(path: str | Path) -> RegionReader:
    """Open an image by extension: TIFF/SVS through tifffile, vendor slides through OpenSlide, JPEG/PNG through
    Pillow. A vendor slide without OpenSlide installed raises an ImageError naming the install command."""
    suffix = Path(path).suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        if suffix == ".ndpi" and not openslide_available():
            log.info("%s: OpenSlide is not installed (%s); reading the NDPI file through tifffile", path, INSTALL_HINT)
            return TiffImage(path)
        return OpenSlideImage(path)
    if suffix in TIFF_SUFFIXES:
        return TiffImage(path)
    return PillowImage(path)
