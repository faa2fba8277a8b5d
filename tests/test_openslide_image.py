"""OpenSlideImage: vendor slide formats through OpenSlide, checked pixel for pixel against the tifffile reader on
a tiled pyramidal TIFF written here (OpenSlide's generic-tiff driver).

Only generic tiled TIFF can be generated in a test; MIRAX, NDPI, VMS/VMU, SCN, BIF, SVSLIDE, CZI and DICOM
need vendor writers. Those extensions are still routed through OpenSlide (`open_image`), which detects the
vendor from the content, so a generic TIFF renamed to them exercises the routing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from genedml.data import TiffImage, open_image
from genedml.data.formats import OPENSLIDE_SUFFIXES
from genedml.data.openslide_image import OpenSlideImage, composite_on_white, openslide_available
from genedml.errors import ImageError

needs_openslide = pytest.mark.skipif(
    not openslide_available(), reason="OpenSlide not installed (pip install 'genedml[openslide]')"
)
TILE = 256


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (1100, 1500, 3), dtype=np.uint8)


def write_pyramid(path: Path, slide: np.ndarray, compression: str = "zlib") -> Path:
    """A tiled TIFF whose reduced levels follow level 0 in the main IFD chain (OpenSlide's generic-tiff)."""
    options = {"tile": (TILE, TILE), "compression": compression, "photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(slide, **options)
        tif.write(slide[::2, ::2], subfiletype=1, **options)
        tif.write(slide[::4, ::4], subfiletype=1, **options)
    return path


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, slide: np.ndarray) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("openslide") / "slide.tif", slide)


BOXES = [(300, 530, 200, 200), (1000, 700, 224, 224), (1400, -20, 224, 224), (-50, 1000, 224, 224), (5000, 5000, 8, 8)]


@needs_openslide
@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_openslide_regions_equal_tifffile_regions(tmp_path: Path, slide: np.ndarray, compression: str) -> None:
    path = write_pyramid(tmp_path / f"{compression}.tif", slide, compression)
    via_openslide, via_tifffile = OpenSlideImage(path), TiffImage(path)
    assert via_openslide.vendor == "generic-tiff" and via_openslide.n_levels == 3
    assert (via_openslide.width, via_openslide.height) == (via_tifffile.width, via_tifffile.height) == (1500, 1100)
    for box in BOXES:
        a, b = via_openslide.read_region(*box), via_tifffile.read_region(*box)
        assert a.inside == b.inside, box
        np.testing.assert_array_equal(a.pixels, b.pixels, err_msg=str(box))
    edge = via_openslide.read_region(1400, -20, 224, 224)
    assert edge.inside == (0, 20, 100, 224) and (edge.pixels[:20] == 255).all() and (edge.pixels[:, 100:] == 255).all()


@needs_openslide
def test_release_closes_and_next_read_reopens(pyramid: Path, slide: np.ndarray) -> None:
    image = OpenSlideImage(pyramid)
    image.release()
    assert image._slide is None
    np.testing.assert_array_equal(image.read_region(10, 20, 30, 40).pixels, slide[20:60, 10:40])
    assert image._slide is not None


@needs_openslide
@pytest.mark.parametrize("suffix", [s for s in OPENSLIDE_SUFFIXES if s != ".dcm"])
def test_vendor_extensions_open_through_openslide(tmp_path: Path, pyramid: Path, slide: np.ndarray, suffix: str) -> None:
    renamed = tmp_path / f"slide{suffix}"
    shutil.copy(pyramid, renamed)
    image = open_image(renamed)
    assert isinstance(image, OpenSlideImage), suffix  # before: Pillow ("cannot identify image file" on MIRAX, CZI…)
    np.testing.assert_array_equal(image.read_region(700, 400, 64, 64).pixels, slide[400:464, 700:764])


@needs_openslide
def test_area_outside_the_scan_is_white(tmp_path: Path, pyramid: Path, slide: np.ndarray) -> None:
    """A tile missing from the file (offset and byte count 0) is transparent in OpenSlide, white for genedml."""
    with tifffile.TiffFile(pyramid) as tif:
        tags = tif.pages[0].tags
        positions = [(tags[name].valueoffset, tags[name].count) for name in ("TileOffsets", "TileByteCounts")]
        assert tif.byteorder == "<" and tags["TileOffsets"].dtype == 4  # uint32 entries
    data = bytearray(pyramid.read_bytes())
    for offset, count in positions:
        entries = np.frombuffer(bytes(data[offset : offset + 4 * count]), "<u4").copy()
        entries[1] = 0  # tile (row 0, column 1): x 256..512, y 0..256
        data[offset : offset + 4 * count] = entries.tobytes()
    sparse = tmp_path / "sparse.tif"
    sparse.write_bytes(bytes(data))
    region = OpenSlideImage(sparse).read_region(200, 0, 400, 300)
    assert (region.pixels[:256, 56:312] == 255).all()
    np.testing.assert_array_equal(region.pixels[:, :56], slide[:300, 200:256])
    np.testing.assert_array_equal(region.pixels[256:], slide[256:300, 200:600])


def test_composite_on_white_keeps_opaque_pixels_exact() -> None:
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], np.uint8)
    out = composite_on_white(rgba)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [227, 177, 127]  # half-transparent: halfway to white


def test_missing_openslide_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = tmp_path / "scan.mrxs"
    slide.write_bytes(b"not really a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(ImageError, match=r"pip install 'genedml\[openslide\]'") as info:
        open_image(slide)
    assert "scan.mrxs" in str(info.value)


def test_ndpi_without_openslide_falls_back_to_tifffile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genedml.data import formats

    ndpi = tmp_path / "scan.ndpi"
    ndpi.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "openslide", None)
    monkeypatch.setattr(formats, "TiffImage", lambda path: ("tifffile", Path(path).name))  # no NDPI writer exists
    assert open_image(ndpi) == ("tifffile", "scan.ndpi")


@needs_openslide
def test_unreadable_and_missing_slides_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "absent.mrxs")
    garbage = tmp_path / "garbage.scn"
    garbage.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(ImageError, match="garbage.scn"):
        open_image(garbage)
