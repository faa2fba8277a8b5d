"""TiffImage: tile-wise reads of pyramidal/flat TIFFs, colour layouts, padding, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from genedml.data import TiffImage, open_image
from genedml.errors import ImageError

TILE = 256


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2100, 2900, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, slide: np.ndarray) -> Path:
    """A BigTIFF with a 3-level pyramid in SubIFDs, 256 px zlib tiles."""
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    options = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(slide, subifds=2, **options)
        tif.write(slide[::2, ::2], subfiletype=1, **options)
        tif.write(slide[::4, ::4], subfiletype=1, **options)
    return path


def test_region_read_touches_only_needed_tiles(pyramid: Path, slide: np.ndarray) -> None:
    image = open_image(pyramid)
    assert isinstance(image, TiffImage) and image.n_levels == 3 and image.tile_shape == (TILE, TILE)
    assert (image.width, image.height) == (2900, 2100) and image.chunks_read == 0
    inside_one_tile = image.read_region(300, 530, 200, 200)  # tile (col 1, row 2) only
    np.testing.assert_array_equal(inside_one_tile.pixels, slide[530:730, 300:500])
    assert image.chunks_read == 1
    image.reset_counter()
    region = image.read_region(1000, 700, 224, 224)  # crosses one column and one row boundary: 2 x 2 tiles
    np.testing.assert_array_equal(region.pixels, slide[700:924, 1000:1224])
    assert image.chunks_read == 4  # of 12 x 9 level-0 tiles


def test_region_half_outside_is_white_padded(pyramid: Path, slide: np.ndarray) -> None:
    image = TiffImage(pyramid)
    region = image.read_region(2900 - 100, -50, 224, 224)
    assert region.inside == (0, 50, 100, 224)
    np.testing.assert_array_equal(region.pixels[50:, :100], slide[:174, 2800:])
    assert (region.pixels[:50] == 255).all() and (region.pixels[:, 100:] == 255).all()
    assert image.read_region(5000, 5000, 10, 10).inside == (0, 0, 0, 0)
    image.release()  # no-op, kept for symmetry with PillowImage
    np.testing.assert_array_equal(image.read_region(0, 0, 8, 8).pixels, slide[:8, :8])


@pytest.mark.parametrize("layout", ["grey", "rgba", "planar", "strips"])
def test_colour_layouts_read_as_rgb(tmp_path: Path, slide: np.ndarray, layout: str) -> None:
    crop = slide[:600, :700]
    path = tmp_path / f"{layout}.tif"
    if layout == "grey":
        tifffile.imwrite(path, crop[..., 0], tile=(TILE, TILE), compression="zlib")
        expected = np.repeat(crop[..., :1], 3, axis=2)
    elif layout == "rgba":
        rgba = np.concatenate([crop, np.full(crop.shape[:2] + (1,), 255, np.uint8)], axis=2)
        tifffile.imwrite(path, rgba, tile=(TILE, TILE), photometric="rgb", extrasamples=["unassalpha"])
        expected = crop
    elif layout == "planar":
        tifffile.imwrite(path, np.moveaxis(crop, -1, 0), photometric="rgb", planarconfig="separate", tile=(TILE, TILE))
        expected = crop
    else:
        tifffile.imwrite(path, crop, photometric="rgb", rowsperstrip=64)
        expected = crop
    image = TiffImage(path)
    assert (image.width, image.height) == (700, 600)
    np.testing.assert_array_equal(image.read_region(250, 100, 300, 200).pixels, expected[100:300, 250:550])


def test_missing_garbage_and_truncated_tiffs_raise_image_error(tmp_path: Path, pyramid: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        TiffImage(tmp_path / "absent.tif")
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a tiff" * 100)
    with pytest.raises(ImageError, match="garbage.tif"):
        TiffImage(garbage)
    truncated = tmp_path / "truncated.tif"
    data = pyramid.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        TiffImage(truncated)


def test_corrupt_tile_raises_image_error_on_read(tmp_path: Path, pyramid: Path) -> None:
    with tifffile.TiffFile(pyramid) as tif:
        page = tif.series[0].levels[0].pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    data = bytearray(pyramid.read_bytes())
    data[offset : offset + count] = b"\x07" * count
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(bytes(data))
    image = TiffImage(corrupt)
    assert image.read_region(0, 0, 16, 16).pixels.shape == (16, 16, 3)  # other tiles still read
    with pytest.raises(ImageError, match="corrupt.tif"):
        image.read_region(5 * TILE + 3, 3, 10, 10)


def test_tile_cache_decodes_a_shared_tile_once_and_stays_bounded(pyramid: Path, slide: np.ndarray) -> None:
    tile_bytes = TILE * TILE * 3
    image = TiffImage(pyramid, tile_cache_mb=2 * tile_bytes / 2**20)  # room for two decoded tiles
    for _ in range(2):  # the same tile twice: decoded once, then served from the cache
        np.testing.assert_array_equal(image.read_region(300, 530, 200, 200).pixels, slide[530:730, 300:500])
    assert (image.chunks_read, image.cache_hits, image.bytes_decoded) == (1, 1, tile_bytes)
    region = image.read_region(1000, 700, 224, 224)  # four other tiles: the cache keeps the last two
    np.testing.assert_array_equal(region.pixels, slide[700:924, 1000:1224])
    assert image.chunks_read == 5 and len(image._tiles) == 2 and image._tiles.nbytes == 2 * tile_bytes
    image.read_region(300, 530, 200, 200)  # evicted: decoded again
    assert image.chunks_read == 6
    image.release()
    assert len(image._tiles) == 0 and image._tiles.nbytes == 0


def test_tile_cache_off_decodes_every_read(pyramid: Path) -> None:
    image = TiffImage(pyramid, tile_cache_mb=0)
    image.read_region(300, 530, 200, 200)
    image.read_region(300, 530, 200, 200)
    assert (image.chunks_read, image.cache_hits, len(image._tiles)) == (2, 0, 0)


def test_gigapixel_bigtiff_opens_small_and_decodes_only_the_tiles_of_a_region(tmp_path: Path) -> None:
    """A 51,200 x 51,200 px JPEG BigTIFF (40,000 tiles; a whole level would be 7.9 GB decoded)."""
    import resource

    side, tile = 51_200, 256
    colours = [np.full((tile, tile, 3), c, np.uint8) for c in ((230, 200, 220), (120, 60, 140))]
    scratch = tmp_path / "two_tiles.tif"
    tifffile.imwrite(scratch, np.concatenate(colours, axis=1), tile=(tile, tile), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(scratch) as tif:  # the two tiles' JPEG bytes, written as-is 40,000 times below
        page = tif.pages[0]
        data = scratch.read_bytes()
        encoded = [data[o:o + n] for o, n in zip(page.dataoffsets, page.databytecounts)]
    n = side // tile
    path = tmp_path / "giga.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write((encoded[(r + c) % 2] for r in range(n) for c in range(n)), shape=(side, side, 3),
                  dtype=np.uint8, tile=(tile, tile), compression="jpeg", photometric="rgb")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = open_image(path)
    assert (image.width, image.height) == (side, side)
    region = image.read_region(30_000, 40_000, 224, 224)  # crosses a tile corner: 4 tiles
    grow_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert image.chunks_read == 4 and image.bytes_decoded == 4 * tile * tile * 3
    assert grow_mb < 200, f"opening and one region read grew the peak RSS by {grow_mb:.0f} MB"
    # (30000 // 256 + 40000 // 256) is odd: the top-left tile has the second colour (JPEG: within a few levels).
    assert np.abs(region.pixels[0, 0].astype(int) - colours[1][0, 0]).max() <= 3
    assert np.abs(region.pixels[-1, 0].astype(int) - colours[0][0, 0]).max() <= 3
