"""Thumbnails (scanpy's uns['spatial'], slide tissue masks) are made without decoding a full-resolution copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from genedml.data import TiffImage, open_image
from genedml.data.image import PillowImage
from genedml.output import READ_BLOCK, thumbnail


def _smooth(height: int, width: int) -> np.ndarray:
    """A smooth RGB picture, so nearest-pixel and box-filtered shrinking agree closely."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


def _by_blocks(image, max_side: int) -> tuple[np.ndarray, float]:
    """The generic path: every step-th level-0 pixel."""
    step = max(1, int(np.ceil(max(image.width, image.height) / max_side)))
    return image.read_region(0, 0, image.width, image.height).pixels[::step, ::step], 1.0 / step


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_picture_thumbnail_matches_the_generic_one_without_decoding_the_picture(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"slide{suffix}"
    Image.fromarray(_smooth(1500, 2300)).save(path, quality=95)
    image = open_image(path)
    assert isinstance(image, PillowImage)
    thumb, scale = thumbnail(image, 400)
    assert image._pixels is None  # the full-resolution RGB array was never made
    ref, ref_scale = _by_blocks(PillowImage(path), 400)
    assert thumb.shape == ref.shape and thumb.dtype == np.uint8 and scale == ref_scale
    assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 4


def test_a_pyramid_thumbnail_reads_a_small_level_not_level_0(tmp_path: Path) -> None:
    full = _smooth(3000, 4200)
    path = tmp_path / "slide.tif"
    options = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(full, subifds=2, **options)
        tif.write(full[::2, ::2], subfiletype=1, **options)
        tif.write(full[::4, ::4], subfiletype=1, **options)
    image = TiffImage(path)
    thumb, scale = thumbnail(image, 1000)  # level 2 (1050 px wide) is the smallest with a long side >= 1000
    assert image.chunks_read == 0
    assert max(thumb.shape[:2]) <= 1000 and scale == pytest.approx(0.25 / 2)
    ref, _ = _by_blocks(image, int(4200 * scale))
    assert np.abs(thumb[: ref.shape[0], : ref.shape[1]].astype(int) - ref[: thumb.shape[0], : thumb.shape[1]].astype(int)).mean() < 4


def test_a_tiff_without_a_pyramid_uses_bounded_block_reads(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _smooth(700, 900), tile=(256, 256), photometric="rgb")
    image = TiffImage(path)
    thumb, scale = thumbnail(image, 300)
    ref, ref_scale = _by_blocks(image, 300)
    assert READ_BLOCK > 0 and scale == ref_scale and np.array_equal(thumb, ref)
