"""Bad input raises the documented error class with a message that names the file and the problem.

Uses tiny synthetic legacy-ST / AnnData inputs built in tmp_path (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from genedml.data import detect_format, read_anndata, read_legacy_st, read_samples
from genedml.errors import ImageError, InputError

PITCH = 100  # px per array step → inferred mpp = 200 µm / 100 px = 2.0
SIZE = 500


def write_legacy(folder: Path, sid: str = "S1", edit_spots=None, edit_counts=None) -> Path:
    """A 3 x 3-spot legacy-ST section; `edit_*` callbacks corrupt the tables before they are written."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = np.meshgrid(np.arange(1, 4), np.arange(1, 4))
    x, y = x.ravel(), y.ravel()
    spots = pd.DataFrame(
        {"x": x, "y": y, "new_x": x, "new_y": y, "pixel_x": x * PITCH + 0.5, "pixel_y": y * PITCH, "selected": 1}
    )
    counts = pd.DataFrame(
        np.arange(27).reshape(9, 3) % 5, index=[f"{a}x{b}" for a, b in zip(x, y)], columns=["G1", "G2", "G3"]
    )
    spots = edit_spots(spots) if edit_spots else spots
    counts = edit_counts(counts) if edit_counts else counts
    spots.to_csv(folder / f"{sid}_selection.tsv", sep="\t", index=False)
    counts.to_csv(folder / f"{sid}.tsv.gz", sep="\t")
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(folder / f"{sid}.jpg")
    return folder


def raises(error: type, *patterns: str, call):
    with pytest.raises(error) as info:
        call()
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    return info.value


def test_valid_synthetic_section_reads(tmp_path: Path) -> None:
    [s] = read_legacy_st(write_legacy(tmp_path))
    assert s.n_spots == 9 and s.mpp == pytest.approx(2.0) and s.barcodes[0] == "1x1"


@pytest.mark.parametrize("mpp", [0, -0.5, float("nan")])
def test_non_positive_mpp_argument(tmp_path: Path, mpp: float) -> None:
    raises(InputError, "positive", "--mpp", call=lambda: read_legacy_st(write_legacy(tmp_path), mpp=mpp))


def test_non_positive_mpp_in_samples_table(tmp_path: Path) -> None:
    table = tmp_path / "table.csv"
    table.write_text("sample_id,patient_id,mpp\nS1,P1,-1\n")
    folder = write_legacy(tmp_path / "d")
    raises(InputError, str(table), "rows [2]", call=lambda: read_legacy_st(folder, samples_table=table))
    table.write_text("sample,patient\nS1,P1\n")
    raises(InputError, "lacks columns", call=lambda: read_legacy_st(folder, samples_table=table))


def test_samples_table_ids_are_stripped_and_unmatched_samples_are_named(tmp_path: Path, caplog) -> None:
    folder = write_legacy(tmp_path / "d", "S1")
    write_legacy(folder, "S2")
    table = tmp_path / "table.csv"
    # Hand-written: spaces after the commas, and a typo (S_2) that leaves S2's patient unknown.
    table.write_text("sample_id, patient_id\nS1, P1\nS_2, P1\n")
    with caplog.at_level("WARNING", logger="genedml"):
        s1, s2 = read_samples(folder, samples_table=table)
    assert (s1.patient_id, s1.patient_known) == ("P1", True) and not s2.patient_known
    [warning] = [r.getMessage() for r in caplog.records if "not in the samples table" in r.getMessage()]
    assert "['S2']" in warning and "['S_2']" in warning and "typo" in warning


def test_missing_mpp_says_how_to_pass_it(tmp_path: Path) -> None:
    write_legacy(tmp_path / "img")
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((2, 3), np.float32)))
    adata.obs_names = ["a", "b"]
    adata.obsm["spatial"] = np.array([[10.0, 10.0], [20.0, 20.0]])
    adata.write_h5ad(tmp_path / "x.h5ad")
    raises(InputError, "x.h5ad", "--mpp", call=lambda: read_anndata(tmp_path / "x.h5ad", tmp_path / "img" / "S1.jpg"))
    assert read_anndata(tmp_path / "x.h5ad", tmp_path / "img" / "S1.jpg", mpp=0.5).mpp == 0.5


def test_centres_outside_image(tmp_path: Path) -> None:
    def push_out(spots):
        spots.loc[[2, 5], "pixel_x"] = SIZE + 40
        return spots

    def with_mpp() -> None:
        read_legacy_st(write_legacy(tmp_path, edit_spots=push_out), mpp=2.0)

    raises(InputError, "2 of 9 spot centres fall outside the 500x500 image", "3x1", call=with_mpp)


def test_anndata_coordinates_of_another_resolution(tmp_path: Path) -> None:
    write_legacy(tmp_path / "img")
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((2, 3), np.float32)))
    adata.obs_names = ["a", "b"]
    adata.obsm["spatial"] = np.array([[100.0, 100.0], [4000.0, 3000.0]])  # full-res coords, small image
    adata.write_h5ad(tmp_path / "x.h5ad")
    image = tmp_path / "img" / "S1.jpg"
    raises(InputError, "1 of 2", "scale factor", call=lambda: read_anndata(tmp_path / "x.h5ad", image, mpp=1.0))


def test_duplicate_barcodes(tmp_path: Path) -> None:
    def dup_spot(spots):
        spots.loc[4, ["x", "y"]] = spots.loc[3, ["x", "y"]].to_numpy()
        return spots

    def dup_count(counts):
        return counts.rename(index={"2x1": "1x1"})

    raises(InputError, "duplicate barcodes", "S1_selection.tsv", "rows [3, 4]",
           call=lambda: read_legacy_st(write_legacy(tmp_path / "a", edit_spots=dup_spot)))
    raises(InputError, "duplicate barcodes in the counts table", "'1x1'",
           call=lambda: read_legacy_st(write_legacy(tmp_path / "b", edit_counts=dup_count)))


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (-3, "negative")])
def test_bad_count_values(tmp_path: Path, value: float, word: str) -> None:
    def corrupt(counts):
        counts = counts.astype(float)
        counts.loc["2x2", "G2"] = value
        return counts

    raises(InputError, word, "'2x2'", "S1", call=lambda: read_legacy_st(write_legacy(tmp_path, edit_counts=corrupt)))


def test_counts_sharing_no_barcodes(tmp_path: Path) -> None:
    def rename(counts):
        counts.index = [f"spot{i}" for i in range(len(counts))]
        return counts

    folder = write_legacy(tmp_path, edit_counts=rename)
    raises(InputError, "shares no barcode", "S1.tsv.gz", call=lambda: read_legacy_st(folder))


def test_spots_without_counts_are_dropped_and_logged(tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="genedml"):
        [s] = read_legacy_st(write_legacy(tmp_path, edit_counts=lambda c: c.drop(index=["1x1", "3x3"])))
    assert s.n_spots == 7 and "1x1" not in s.barcodes
    assert any("dropped 2 of 9 spots without counts" in r.getMessage() for r in caplog.records)


def test_empty_sample(tmp_path: Path) -> None:
    folder = write_legacy(tmp_path, edit_spots=lambda spots: spots.iloc[:0])
    raises(InputError, "no spots", "S1_selection.tsv", call=lambda: read_legacy_st(folder))


def test_unreadable_and_truncated_images(tmp_path: Path) -> None:
    folder = write_legacy(tmp_path)
    jpeg = (folder / "S1.jpg").read_bytes()
    (folder / "S1.jpg").write_bytes(b"not an image at all")
    raises(ImageError, "S1.jpg", call=lambda: read_legacy_st(folder))
    (folder / "S1.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    [s] = read_legacy_st(folder)  # the header is intact: opening is lazy
    raises(ImageError, "truncated", "S1.jpg", call=lambda: s.image.read_region(0, 0, 10, 10))
    (folder / "S1.jpg").unlink()
    raises(InputError, "no image for sample 'S1'", "S1.jpg", call=lambda: read_legacy_st(folder))


def test_unknown_sample_ids_list_known_ones(tmp_path: Path) -> None:
    folder = write_legacy(tmp_path, "S1")
    write_legacy(tmp_path, "S2")
    assert [s.sample_id for s in read_samples(folder, samples="S2")] == ["S2"]
    raises(InputError, "['S9']", "['S1', 'S2']", call=lambda: read_samples(folder, samples=["S1", "S9"]))


def test_unknown_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    looked_for = ("_selection.tsv", "tissue_positions", ".h5ad", "st/<id>.h5ad")
    raises(InputError, *looked_for, call=lambda: detect_format(tmp_path))
    raises(InputError, "not found", call=lambda: read_samples(tmp_path / "absent"))
    write_legacy(tmp_path / "st_folder")
    raises(InputError, "image=", call=lambda: read_samples(tmp_path / "st_folder", image=tmp_path / "x.jpg"))
