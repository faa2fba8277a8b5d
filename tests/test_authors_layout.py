"""The Gene-DML / TRIPLEX data layout (ST-spotfiles/, ST-cnts/*_sub.parquet, ST-imgs/): rebuilt from real her2st
sections it must give the legacy-ST reader's samples; small synthetic trees cover the other conventions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from genedml.data import detect_format, inspect_samples, read_authors_layout, read_legacy_st, read_samples
from genedml.errors import InputError

SECTIONS = ["B4", "C3"]


@pytest.fixture(scope="module")
def authors_her2st(tmp_path_factory, her2st_dir: Path) -> Path:
    """data/her2st as the authors ship it: counts as parquet, images nested by patient letter."""
    root = tmp_path_factory.mktemp("authors") / "her2st"
    for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs"):
        (root / sub).mkdir(parents=True)
    for name in SECTIONS:
        counts = pd.read_csv(her2st_dir / f"{name}.tsv.gz", sep="\t", index_col=0)
        counts.to_parquet(root / "ST-cnts" / f"{name}_sub.parquet")
        shutil.copy(her2st_dir / f"{name}_selection.tsv", root / "ST-spotfiles" / f"{name}_selection.tsv")
        nested = root / "ST-imgs" / name[0] / name
        nested.mkdir(parents=True)
        (nested / f"HE_{name}.jpg").symlink_to(her2st_dir / f"{name}.jpg")
    return root


@pytest.mark.realdata
def test_authors_her2st_equals_legacy_reader(authors_her2st: Path, her2st_dir: Path) -> None:
    assert detect_format(authors_her2st) == "authors"
    samples = read_samples(authors_her2st)
    legacy = {s.sample_id: s for s in read_legacy_st(her2st_dir, samples=SECTIONS)}
    assert [s.sample_id for s in samples] == SECTIONS
    for s in samples:
        ref = legacy[s.sample_id]
        assert list(s.barcodes) == list(ref.barcodes)  # spots joined with counts by "<x>x<y>"
        np.testing.assert_array_equal(s.centers, ref.centers)
        np.testing.assert_array_equal(s.array_coords, ref.array_coords)
        assert list(s.genes) == list(ref.genes) and (s.counts != ref.counts).nnz == 0
        assert s.mpp == pytest.approx(ref.mpp)
        assert (s.patient_id, s.patient_known) == (s.sample_id[0], True)  # ST-imgs/<patient letter>/<name>/
        assert s.source == "authors" and s.meta["image"].endswith(f"HE_{s.sample_id}.jpg")
    rows = inspect_samples(authors_her2st, samples="C3")
    assert rows[0]["format"] == "authors" and rows[0]["spots"] == legacy["C3"].n_spots


# ---------------------------------------------------------------- synthetic trees

PITCH = 100  # px per array step: 200 µm / 100 px = 2 µm/px


def write_section(root: Path, name: str, image_name: str, swap: bool = False, size=(500, 420)) -> None:
    """A 3 x 3-spot section; `swap` writes pixel_x/pixel_y exchanged (the TRIPLEX test-set convention)."""
    for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    x, y = (a.ravel() for a in np.meshgrid(np.arange(1, 4), np.arange(1, 4)))
    px, py = x * PITCH + 40.0, y * PITCH + 0.5
    spots = pd.DataFrame({"x": x + 0.02, "y": y - 0.03, "pixel_x": py if swap else px, "pixel_y": px if swap else py,
                          "selected": [1] * 8 + [0]})
    spots.to_csv(root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t", index=False)
    counts = pd.DataFrame(np.arange(27).reshape(9, 3) % 4, index=[f"{a}x{b}" for a, b in zip(x, y)],
                          columns=["G1", "G2", "G3"])
    counts.iloc[1:].to_parquet(root / "ST-cnts" / f"{name}_sub.parquet")  # spot 1x1 has no counts
    Image.new("RGB", size, "white").save(root / "ST-imgs" / image_name)


def test_flat_images_named_by_suffix_and_spots_follow_the_counts(tmp_path: Path) -> None:
    write_section(tmp_path, "BC1_C1", "HE_BC1_C1.jpg")
    [s] = read_authors_layout(tmp_path)
    assert s.n_spots == 8 and s.barcodes[0] == "2x1"  # x, y rounded; 1x1 has no counts
    assert s.barcodes[-1] == "3x3"  # selected == 0 kept, as the authors' code does
    np.testing.assert_allclose(s.centers[0], [2 * PITCH + 40.0, PITCH + 0.5])
    assert s.mpp == pytest.approx(2.0) and not s.patient_known


def test_swapped_pixel_columns_are_detected(tmp_path: Path) -> None:
    write_section(tmp_path, "ff1", "ff1.jpg", swap=True, size=(480, 320))  # swapped x would fall off the image
    [s] = read_authors_layout(tmp_path)
    np.testing.assert_allclose(s.centers[0], [2 * PITCH + 40.0, PITCH + 0.5])
    assert s.array_coords[0].tolist() == [1, 2]  # grid swapped with the pixels


def test_ambiguous_or_missing_images_and_counts(tmp_path: Path) -> None:
    write_section(tmp_path, "A1", "x_A1.jpg")
    Image.new("RGB", (10, 10)).save(tmp_path / "ST-imgs" / "y_A1.png")
    with pytest.raises(InputError, match="expected one image of section 'A1'"):
        read_authors_layout(tmp_path)
    (tmp_path / "ST-imgs" / "y_A1.png").unlink()
    (tmp_path / "ST-cnts" / "A1_sub.parquet").unlink()
    with pytest.raises(InputError, match="ST-cnts/A1_sub.parquet"):
        read_authors_layout(tmp_path)


def test_hexagonal_grid_needs_mpp(tmp_path: Path) -> None:
    root = tmp_path / "visium"
    for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs"):
        (root / sub).mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(4), np.arange(0, 8, 2), indexing="ij")
    cols = cols + rows % 2  # Visium: array_row + array_col is even
    x, y = cols.ravel(), rows.ravel()
    pd.DataFrame({"x": x, "y": y, "pixel_x": x * 20.0 + 5, "pixel_y": y * 35.0 + 5}).to_csv(
        root / "ST-spotfiles" / "V1_selection.tsv", sep="\t", index=False)
    pd.DataFrame(np.ones((len(x), 2)), index=[f"{a}x{b}" for a, b in zip(x, y)], columns=["G1", "G2"]).to_parquet(
        root / "ST-cnts" / "V1_sub.parquet")
    Image.new("RGB", (200, 200), "white").save(root / "ST-imgs" / "V1.tif")
    with pytest.raises(InputError, match="hexagonal"):
        read_samples(root)
    assert read_samples(root, mpp=0.5)[0].mpp == 0.5
