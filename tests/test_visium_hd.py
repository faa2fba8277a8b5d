"""Visium HD: a synthetic Space Ranger HD tree (outs/binned_outputs/square_008um and square_016um) read as one
sample per run, with µm/px from the scale factors, the run's id and the bin size chosen by option or path."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from genedml.data import detect_format, inspect_samples, read_samples, read_spaceranger
from genedml.data.visium import fullres_mpp
from genedml.errors import InputError

MPP = 0.5  # µm per full-res pixel
WIDTH, HEIGHT = 420, 330
GENES = np.array(["Actb", "Gfap", "Mbp", "Snap25", "Plp1"])


def write_10x_h5(path: Path, barcodes: np.ndarray, genes: np.ndarray, counts: sp.csr_matrix, ids=None) -> None:
    """A 10x feature-barcode HDF5 matrix (features x barcodes CSC == barcodes x features CSR)."""
    counts = sp.csr_matrix(counts).astype(np.int32)
    with h5py.File(path, "w") as h5:
        m = h5.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = counts.data, counts.indices, counts.indptr
        m["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        m["barcodes"] = np.asarray(barcodes).astype("S")
        m["features/name"] = np.asarray(genes).astype("S")
        ids = ids if ids is not None else [f"ENSMUSG{i:011d}" for i in range(len(genes))]
        m["features/id"] = np.asarray(ids).astype("S")
        m["features/feature_type"] = np.full(len(genes), b"Gene Expression")


def write_bins(binned: Path, bin_um: int, scalefactors: dict) -> pd.DataFrame:
    """One square_<NNN>um folder: every bin of the image grid, in tissue inside an ellipse."""
    folder = binned / f"square_{bin_um:03d}um"
    (folder / "spatial").mkdir(parents=True)
    pitch = bin_um / MPP
    rows, cols = np.meshgrid(np.arange(int(HEIGHT // pitch)), np.arange(int(WIDTH // pitch)), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x, y = (cols + 0.5) * pitch, (rows + 0.5) * pitch
    in_tissue = (((x - WIDTH / 2) / (WIDTH / 2.4)) ** 2 + ((y - HEIGHT / 2) / (HEIGHT / 2.4)) ** 2 <= 1).astype(int)
    positions = pd.DataFrame(
        {
            "barcode": [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)],
            "in_tissue": in_tissue,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": y,
            "pxl_col_in_fullres": x,
        }
    )
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    tissue = positions[positions.in_tissue == 1].sample(frac=1.0, random_state=0)  # matrix order != table order
    counts = sp.csr_matrix(np.random.default_rng(bin_um).poisson(2.0, (len(tissue), len(GENES))))
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", tissue.barcode.to_numpy(), GENES, counts)
    scale = {"spot_diameter_fullres": pitch, "bin_size_um": float(bin_um), "tissue_hires_scalef": 0.2, **scalefactors}
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scale))
    return positions[positions.in_tissue == 1].reset_index(drop=True)


@pytest.fixture()
def hd_run(tmp_path: Path) -> tuple[Path, dict[int, pd.DataFrame]]:
    run = tmp_path / "HD_run1"
    binned = run / "outs" / "binned_outputs"
    tables = {size: write_bins(binned, size, {"microns_per_pixel": MPP}) for size in (8, 16)}
    (run / "outs" / "spatial").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(run / "HD_run1_HE.png")
    return run, tables


def test_bin_folder_mpp_comes_from_microns_per_pixel(hd_run) -> None:
    """Before: 55 µm / spot_diameter_fullres = 55 / 16 px = 3.44 µm/px for 8 µm bins at 0.5 µm/px (6.9x off)."""
    run, _ = hd_run
    folder = run / "outs" / "binned_outputs" / "square_008um"
    s = read_spaceranger(folder, image=run / "HD_run1_HE.png")
    assert s.mpp == pytest.approx(MPP)


def test_fullres_mpp_prefers_microns_per_pixel_then_bin_size() -> None:
    assert fullres_mpp({"microns_per_pixel": 0.27, "spot_diameter_fullres": 30.0}, "x")[0] == 0.27
    assert fullres_mpp({"spot_diameter_fullres": 16.0, "bin_size_um": 8.0}, "x")[0] == pytest.approx(0.5)
    assert fullres_mpp({"spot_diameter_fullres": 110.0}, "x")[0] == pytest.approx(0.5)  # 55 µm Visium spots
    assert fullres_mpp({}, "x")[0] is None


@pytest.mark.parametrize("where", ["run", "outs", "binned_outputs", "square_008um"])
def test_run_folder_reads_as_one_sample_named_after_the_run(hd_run, where: str) -> None:
    run, tables = hd_run
    path = {"run": run, "outs": run / "outs", "binned_outputs": run / "outs" / "binned_outputs",
            "square_008um": run / "outs" / "binned_outputs" / "square_008um"}[where]
    assert detect_format(path) == "visium-hd"
    [s] = read_samples(path)
    expected = tables[8]
    assert s.sample_id == "HD_run1" and s.source == "visium-hd" and s.meta["bin_size_um"] == 8
    assert s.mpp == pytest.approx(MPP)
    assert list(s.barcodes) == expected.barcode.tolist()  # positions order, matrix joined by barcode
    np.testing.assert_allclose(s.centers, expected[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    np.testing.assert_array_equal(s.array_coords, expected[["array_col", "array_row"]].to_numpy())
    assert s.counts.shape == (len(expected), len(GENES)) and list(s.genes) == list(GENES)
    assert s.meta["image"].endswith("HD_run1_HE.png")


def test_bin_size_by_option_or_by_folder(hd_run) -> None:
    run, tables = hd_run
    [by_option] = read_samples(run, bin_size_um=16)
    [by_folder] = read_samples(run / "outs" / "binned_outputs" / "square_016um")
    for s in (by_option, by_folder):
        assert s.sample_id == "HD_run1" and s.meta["bin_size_um"] == 16 and s.n_spots == len(tables[16])
        assert s.mpp == pytest.approx(MPP) and s.barcodes[0].startswith("s_016um_")
    with pytest.raises(InputError, match="available bin sizes: \\[8, 16\\]"):
        read_samples(run, bin_size_um=2)
    with pytest.raises(InputError, match="holds 16 µm bins"):
        read_samples(run / "outs" / "binned_outputs" / "square_016um", bin_size_um=8)
    with pytest.raises(InputError, match="applies to visium-hd and spatialdata inputs, not spaceranger"):
        read_samples(run / "outs" / "binned_outputs" / "square_008um", format="spaceranger", bin_size_um=8)


def test_inspect_shows_the_run(hd_run) -> None:
    run, tables = hd_run
    [row] = inspect_samples(run)
    assert row["format"] == "visium-hd" and row["sample_id"] == "HD_run1" and row["spots"] == len(tables[8])
    assert row["image"]["width"] == WIDTH and row["mpp"] == pytest.approx(MPP)


def test_bin_size_without_microns_per_pixel(tmp_path: Path) -> None:
    binned = tmp_path / "run2" / "outs" / "binned_outputs"
    write_bins(binned, 8, {})
    Image.new("RGB", (WIDTH, HEIGHT), "white").save(tmp_path / "run2" / "outs" / "he.jpg")
    [s] = read_samples(tmp_path / "run2")
    assert s.mpp == pytest.approx(MPP)  # bin_size_um / spot_diameter_fullres
