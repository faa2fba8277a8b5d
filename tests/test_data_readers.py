"""Readers on real data: her2st (legacy ST), the Visium AnnData crop, and HEST / Space Ranger trees rebuilt
in tmp_path from a real her2st section — each must give the same Sample as the legacy-ST reader."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import HER2ST_SPOTS
from genedml.data import (
    PillowImage,
    TiffImage,
    detect_format,
    inspect_samples,
    read_anndata,
    read_legacy_st,
    read_samples,
    read_spaceranger,
)
from genedml.errors import InputError

pytestmark = pytest.mark.realdata
SECTION = "C3"


@pytest.fixture(scope="module")
def her2st(her2st_dir: Path) -> dict:
    return {s.sample_id: s for s in read_legacy_st(her2st_dir)}


@pytest.fixture(scope="module")
def section(her2st: dict):
    return her2st[SECTION]


@pytest.fixture(scope="module")
def section_pixels(her2st_dir: Path) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = None
    return np.asarray(Image.open(her2st_dir / f"{SECTION}.jpg").convert("RGB"))


def assert_same_spots(sample, reference, scale: float = 1.0) -> None:
    assert list(sample.barcodes) == list(reference.barcodes)
    np.testing.assert_allclose(sample.centers, reference.centers * scale, atol=1e-6)
    np.testing.assert_array_equal(sample.array_coords, reference.array_coords)
    assert list(sample.genes) == list(reference.genes)
    assert (sample.counts != reference.counts).nnz == 0


# ---------------------------------------------------------------- legacy ST (her2st)


def test_her2st_all_sections_load_with_known_spot_counts(her2st: dict) -> None:
    assert {sid: s.n_spots for sid, s in her2st.items()} == HER2ST_SPOTS
    for s in her2st.values():
        assert 0.67 <= s.mpp <= 0.71, (s.sample_id, s.mpp)
        assert isinstance(s.image, PillowImage) and s.image._pixels is None  # header only, not decoded
        inside = (s.centers >= 0).all() and (s.centers[:, 0] < s.image.width).all()
        assert inside and (s.centers[:, 1] < s.image.height).all()
        assert s.counts.dtype == np.float32 and s.counts.format == "csr" and s.n_genes > 15000
        assert s.source == "legacy-st" and s.meta["path"]
        assert not s.patient_known and s.patient_id == s.sample_id
        x, y = s.array_coords[0]
        assert s.barcodes[0] == f"{x}x{y}"


def test_her2st_counts_follow_selection_table_order(her2st_dir: Path, section) -> None:
    spots = pd.read_csv(her2st_dir / f"{SECTION}_selection.tsv", sep="\t")
    order = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    assert list(section.barcodes) == [b for b in order if b in set(section.barcodes)]
    counts = pd.read_csv(her2st_dir / f"{SECTION}.tsv.gz", sep="\t", index_col=0)
    spot = section.barcodes[7]
    np.testing.assert_array_equal(section.counts[7].toarray().ravel(), counts.loc[spot].to_numpy(np.float32))


def test_her2st_region_equals_jpeg_crop_and_pads_white(section, section_pixels: np.ndarray) -> None:
    cx, cy = section.centers[0].round().astype(int)
    region = section.image.read_region(cx - 112, cy - 112, 224, 224)
    np.testing.assert_array_equal(region.pixels, section_pixels[cy - 112 : cy + 112, cx - 112 : cx + 112])
    assert region.inside == (0, 0, 224, 224)
    edge = section.image.read_region(-112, cy, 224, 224)
    assert edge.inside == (112, 0, 224, 224)
    assert (edge.pixels[:, :112] == 255).all()
    np.testing.assert_array_equal(edge.pixels[:, 112:], section_pixels[cy : cy + 224, :112])


def test_samples_table_sets_patient_and_mpp(her2st_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "samples.csv"
    table.write_text("sample_id,patient_id,mpp\nC3,C,0.5\nB4,B,\n")
    b4, c3 = read_samples(her2st_dir, samples=["C3", "B4"], samples_table=table)  # folder order
    assert (b4.sample_id, b4.patient_id, b4.patient_known) == ("B4", "B", True)
    assert (c3.patient_id, c3.mpp) == ("C", 0.5)
    assert 0.67 <= b4.mpp <= 0.71  # blank mpp in the table: inferred
    assert read_samples(her2st_dir, samples="C3", mpp=0.6)[0].mpp == 0.6  # the mpp argument wins


# ---------------------------------------------------------------- AnnData (Visium crop)


def test_visium_anndata_fixture(visium_dir: Path) -> None:
    s = read_anndata(visium_dir / "test_data.h5ad", visium_dir / "test_img.jpg")
    assert s.n_spots == 49 and s.n_genes == 1999
    assert s.mpp == pytest.approx(0.615, abs=0.01)
    assert (s.image.width, s.image.height) == (950, 1717)
    assert (s.centers >= 0).all() and (s.centers < [950, 1717]).all()
    assert s.meta["image_resolution"] == "fullres" and s.source == "anndata"
    assert detect_format(visium_dir / "test_data.h5ad") == "anndata"
    [row] = inspect_samples(visium_dir / "test_data.h5ad", image=visium_dir / "test_img.jpg")
    assert row["spots"] == 49 and row["image"]["width"] == 950 and row["format"] == "anndata"


def test_folder_with_one_h5ad_and_one_image_reads_as_anndata(tmp_path: Path, visium_dir: Path) -> None:
    """Before: "no known input layout found"."""
    folder = tmp_path / "crop"
    folder.mkdir()
    (folder / "brain.h5ad").symlink_to(visium_dir / "test_data.h5ad")
    (folder / "brain_he.jpg").symlink_to(visium_dir / "test_img.jpg")
    assert detect_format(folder) == "anndata"
    [s] = read_samples(folder)
    reference = read_anndata(visium_dir / "test_data.h5ad", visium_dir / "test_img.jpg")
    assert s.sample_id == "brain" and s.n_spots == reference.n_spots and s.mpp == pytest.approx(reference.mpp)
    np.testing.assert_array_equal(s.centers, reference.centers)
    assert s.meta["image"].endswith("brain_he.jpg")
    [row] = inspect_samples(folder)
    assert row["format"] == "anndata" and row["image"]["width"] == 950
    (folder / "second.png").symlink_to(visium_dir / "test_img.jpg")
    with pytest.raises(InputError, match="one .h5ad and one image"):
        detect_format(folder)  # two images: ambiguous, not guessed


# ---------------------------------------------------------------- HEST layout rebuilt from her2st


def section_anndata(sample, scalefactors: dict | None = None) -> anndata.AnnData:
    obs = pd.DataFrame(
        {"array_col": sample.array_coords[:, 0], "array_row": sample.array_coords[:, 1]}, index=sample.barcodes
    )
    adata = anndata.AnnData(X=sample.counts.copy(), obs=obs, var=pd.DataFrame(index=sample.genes))
    adata.obsm["spatial"] = sample.centers.copy()
    if scalefactors is not None:
        adata.uns["spatial"] = {"lib": {"scalefactors": scalefactors, "metadata": {}}}
    return adata


@pytest.fixture(scope="module")
def hest_dir(tmp_path_factory, section, section_pixels: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("hest")
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir()
    section_anndata(section).write_h5ad(root / "st" / f"{SECTION}.h5ad")
    options = {"tile": (256, 256), "compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    with tifffile.TiffWriter(root / "wsis" / f"{SECTION}.tif", bigtiff=True) as tif:
        tif.write(section_pixels, subifds=2, **options)
        tif.write(section_pixels[::4, ::4], subfiletype=1, **options)
        tif.write(section_pixels[::16, ::16], subfiletype=1, **options)
    meta = {"pixel_size_um_estimated": section.mpp, "patient": "patient-C"}
    (root / "metadata" / f"{SECTION}.json").write_text(json.dumps(meta))
    return root


def test_hest_folder_matches_legacy_reader(hest_dir: Path, section, section_pixels: np.ndarray) -> None:
    assert detect_format(hest_dir) == "hest"
    [s] = read_samples(hest_dir)
    assert_same_spots(s, section)
    assert s.mpp == pytest.approx(section.mpp) and s.source == "hest"
    assert (s.patient_id, s.patient_known) == ("patient-C", True)
    assert isinstance(s.image, TiffImage) and s.image.n_levels == 3
    assert (s.image.width, s.image.height) == (section.image.width, section.image.height)

    cx, cy = s.centers[5].round().astype(int)
    s.image.reset_counter()
    region = s.image.read_region(cx - 112, cy - 112, 224, 224)
    np.testing.assert_array_equal(region.pixels, section_pixels[cy - 112 : cy + 112, cx - 112 : cx + 112])
    columns, rows = ((c + 111) // 256 - (c - 112) // 256 + 1 for c in (cx, cy))
    tiles = columns * rows
    assert s.image.chunks_read == tiles <= 4  # of 39 x 37 level-0 tiles


# ---------------------------------------------------------------- Space Ranger layout rebuilt from her2st


def write_10x_h5(path: Path, sample, order: np.ndarray) -> None:
    """10x feature-barcode matrix (features x barcodes CSC == barcodes x features CSR), barcodes shuffled."""
    counts = sample.counts[order].astype(np.int32)
    with h5py.File(path, "w") as h5:
        m = h5.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = counts.data, counts.indices, counts.indptr
        m["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        m["barcodes"] = sample.barcodes[order].astype("S")
        m["features/name"] = sample.genes.astype("S")
        m["features/id"] = np.array([f"ENSG{i:011d}" for i in range(sample.n_genes)], dtype="S")
        m["features/feature_type"] = np.full(sample.n_genes, b"Gene Expression")


def build_spaceranger(root: Path, sample, layout: str) -> Path:
    (root / "spatial").mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", sample, rng.permutation(sample.n_spots))
    positions = pd.DataFrame(
        {
            "barcode": sample.barcodes,
            "in_tissue": 1,
            "array_row": sample.array_coords[:, 1],
            "array_col": sample.array_coords[:, 0],
            "pxl_row_in_fullres": sample.centers[:, 1],
            "pxl_col_in_fullres": sample.centers[:, 0],
        }
    )
    off_tissue = positions.iloc[:3].assign(barcode=["off1", "off2", "off3"], in_tissue=0)
    positions = pd.concat([off_tissue, positions], ignore_index=True)
    if layout == "csv":
        positions.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    elif layout == "list":
        positions.to_csv(root / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    else:
        positions.to_parquet(root / "spatial" / "tissue_positions.parquet", index=False)
    scalefactors = {"spot_diameter_fullres": 55.0 / sample.mpp, "tissue_hires_scalef": 0.1}
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    return root


@pytest.mark.parametrize("layout", ["csv", "list", "parquet"])
def test_spaceranger_folder_matches_legacy_reader(tmp_path: Path, her2st_dir: Path, section, layout: str) -> None:
    root = build_spaceranger(tmp_path / SECTION / "outs", section, layout)
    assert detect_format(tmp_path / SECTION) == "spaceranger"
    [s] = read_samples(tmp_path / SECTION, image=her2st_dir / f"{SECTION}.jpg")
    assert_same_spots(s, section)
    assert s.sample_id == SECTION and s.source == "spaceranger" and s.meta["path"] == str(root)
    assert s.mpp == pytest.approx(section.mpp)


def test_spaceranger_hires_image_scales_coordinates(tmp_path: Path, section, section_pixels: np.ndarray) -> None:
    root = build_spaceranger(tmp_path / SECTION, section, "csv")
    height, width = section_pixels.shape[:2]
    hires = root / "spatial" / "tissue_hires_image.png"
    Image.fromarray(section_pixels).resize((round(width * 0.1), round(height * 0.1))).save(hires)
    s = read_spaceranger(root, image=hires)
    assert_same_spots(s, section, scale=0.1)
    assert s.mpp == pytest.approx(section.mpp / 0.1)
    assert s.meta["image_resolution"] == "hires"


def test_inspect_her2st_does_not_decode_images(her2st_dir: Path) -> None:
    rows = inspect_samples(her2st_dir, samples=["B4", "C2"])
    assert [r["sample_id"] for r in rows] == ["B4", "C2"]
    assert [r["spots"] for r in rows] == [HER2ST_SPOTS["B4"], HER2ST_SPOTS["C2"]]
    assert rows[0]["format"] == "legacy-st" and rows[0]["image"]["width"] > 9000


# ---------------------------------------------------------------- HEST-written AnnData read as plain AnnData


def hest_written_anndata(sample, section_pixels: np.ndarray, metadata: dict | None = None) -> anndata.AnnData:
    """What HEST writes for a legacy-ST section: spot_diameter_fullres for 100 µm spots, a downscaled_fullres
    thumbnail (longest side 1000 px) and its scale factor, under uns['spatial']['ST']."""
    adata = section_anndata(sample)
    factor = 1000 / max(section_pixels.shape[:2])
    thumbnail = np.asarray(Image.fromarray(section_pixels).resize(
        (round(section_pixels.shape[1] * factor), round(section_pixels.shape[0] * factor))))
    adata.uns["spatial"] = {"ST": {
        "images": {"downscaled_fullres": thumbnail},
        "scalefactors": {"spot_diameter_fullres": 100.0 / sample.mpp, "tissue_downscaled_fullres_scalef": factor},
        **({"metadata": metadata} if metadata is not None else {}),
    }}
    return adata


def test_hest_written_anndata_gets_legacy_st_spot_size(tmp_path: Path, her2st_dir: Path, section, section_pixels,
                                                       caplog) -> None:
    """Before: 55 µm / spot_diameter_fullres gave 0.55 x the true µm/px (0.377 instead of 0.686)."""
    h5ad = tmp_path / f"{SECTION}.h5ad"
    hest_written_anndata(section, section_pixels).write_h5ad(h5ad)
    with caplog.at_level("WARNING", logger="genedml"):
        s = read_anndata(h5ad, her2st_dir / f"{SECTION}.jpg")
    assert s.mpp == pytest.approx(section.mpp)
    assert "barcodes look like legacy ST" in caplog.text  # guessed, so said

    caplog.clear()
    hest_written_anndata(section, section_pixels, {"st_technology": "Spatial Transcriptomics"}).write_h5ad(h5ad)
    with caplog.at_level("WARNING", logger="genedml"):
        s = read_anndata(h5ad, her2st_dir / f"{SECTION}.jpg")
    assert s.mpp == pytest.approx(section.mpp) and not caplog.text  # named by the file: no warning


def test_hest_downscaled_fullres_image_scales_coordinates(tmp_path: Path, section, section_pixels) -> None:
    adata = hest_written_anndata(section, section_pixels, {"st_technology": "Spatial Transcriptomics"})
    adata.write_h5ad(tmp_path / f"{SECTION}.h5ad")
    thumbnail = tmp_path / "downscaled_fullres.jpeg"  # the file name HEST saves it under
    Image.fromarray(adata.uns["spatial"]["ST"]["images"]["downscaled_fullres"]).save(thumbnail)
    factor = adata.uns["spatial"]["ST"]["scalefactors"]["tissue_downscaled_fullres_scalef"]
    s = read_anndata(tmp_path / f"{SECTION}.h5ad", thumbnail)
    assert s.meta["image_resolution"] == "downscaled_fullres"
    assert_same_spots(s, section, scale=factor)
    assert s.mpp == pytest.approx(section.mpp / factor)


def test_h5ad_inside_hest_folder_takes_mpp_from_its_metadata(hest_dir: Path, section, her2st_dir: Path) -> None:
    s = read_anndata(hest_dir / "st" / f"{SECTION}.h5ad", her2st_dir / f"{SECTION}.jpg")
    assert s.mpp == pytest.approx(section.mpp) and s.source == "anndata"  # no scale factors in that file


def test_platform_spot_sizes() -> None:
    from genedml.data.visium import platform_from_barcodes, platform_spot_um

    assert platform_spot_um("Visium")[0] == platform_spot_um("Spatial 3' v1")[0] == 55.0
    assert platform_spot_um("Spatial Transcriptomics")[0] == 100.0
    assert platform_spot_um("Visium HD", ["s_016um_00001_00002-1"]) == (16.0, "Visium HD")
    assert platform_spot_um("Xenium") is None
    assert platform_from_barcodes(["10x12", "3x4"])[1] == "legacy ST"
    assert platform_from_barcodes(["AAACAAGTATCTCCCA-1"])[1] == "Visium"
    assert platform_from_barcodes(["cell_1"]) is None
