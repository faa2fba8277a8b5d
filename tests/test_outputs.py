"""Outputs other tools read as their own: prediction .h5ad for scanpy/squidpy, .h5 exports for HEST and TRIDENT."""

from __future__ import annotations

import json
from pathlib import Path
import shutil
import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache, export_h5
from genedml.data import read_samples
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model
from genedml.output import HIRES_SIDE, LOWRES_SIDE, SpatialView, cached_sample_view, model_dir_of, write_prediction
from genedml.predict import Predictor, predict_cache

GROUPS = 12  # more than 10, so string order ("1", "10", "11", "2") would differ from numeric order

# scanpy `read_visium` (src/scanpy/readwrite.py) and `sc.pl.spatial` (plotting/_tools/scatterplots.py:
# _check_spot_size, _check_scale_factor, _check_img) read these keys of uns['spatial'][library_id];
# squidpy's Key.uns (squidpy/_constants/_pkg_constants.py) names the same: images, scalefactors,
# spot_diameter_fullres, and tissue_{hires,lowres}_scalef for its img_res_key.
SCANPY_SPATIAL_KEYS = {"images", "scalefactors", "metadata"}
SCANPY_IMAGE_KEYS = {"hires", "lowres"}
SCANPY_SCALEFACTOR_KEYS = {"tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"}
SCANPY_METADATA_KEYS = {"software_version", "source_image_path"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Synthetic sections, a he-stats cache, and a small Gene-DML model with 12 group prototypes."""
    root = tmp_path_factory.mktemp("outputs")
    data = write_synthetic_dataset(root / "data", make_synthetic_dataset(n_samples=3, n_patients=2, seed=5, grid=(7, 7), n_genes=25))
    run_extraction(read_samples(data), load_backbone("he-stats"), root / "cache", ExtractSettings(patch_px=112, mpp_target=1.0, batch_size=64))
    head = {"epochs": 2, "batch_size": 64, "dim": 32, "groups": GROUPS}
    fit_model(root / "cache", data, root / "project" / "model", FitSettings(model="genedml", genes=20, train_samples=["SYN0", "SYN1"], val_samples=[], head=head))
    return root, data


def test_prediction_has_the_spatial_entry_scanpy_and_squidpy_read(project, tmp_path):
    root, _ = project
    (path,) = predict_cache(root / "project" / "model", root / "cache", tmp_path, samples=["SYN2"])
    adata = ad.read_h5ad(path)
    entry = adata.uns["spatial"]["SYN2"]
    assert set(entry) == SCANPY_SPATIAL_KEYS
    assert set(entry["images"]) == SCANPY_IMAGE_KEYS
    assert SCANPY_SCALEFACTOR_KEYS <= set(entry["scalefactors"])
    assert SCANPY_METADATA_KEYS <= set(entry["metadata"])
    attrs = FeatureCache(root / "cache").sample_attrs("SYN2")
    width, height = attrs["image_size"]
    hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
    sf = entry["scalefactors"]
    assert max(hires.shape[:2]) <= HIRES_SIDE and max(lowres.shape[:2]) <= LOWRES_SIDE and hires.dtype == np.uint8
    # scale factor = image px per full-resolution (level-0) px, as Space Ranger's
    assert hires.shape[1] == pytest.approx(width * sf["tissue_hires_scalef"], abs=1)
    assert lowres.shape[0] == pytest.approx(height * sf["tissue_lowres_scalef"], abs=1)
    assert entry["metadata"]["source_image_path"] == attrs["image"]
    # spot diameter: half the pitch of the spot grid (the synthetic grid is regular)
    centers = adata.obsm["spatial"]
    pitch = np.median(np.sort(np.linalg.norm(centers[:, None] - centers[None], axis=2), axis=1)[:, 1])
    assert sf["spot_diameter_fullres"] == pytest.approx(pitch / 2, rel=0.02)
    group = adata.obs["genedml_group"]
    assert group.cat.ordered and list(group.cat.categories) == [str(i) for i in range(GROUPS)]
    assert "knn_index" not in adata.obsm


def test_sc_pl_spatial_plots_a_prediction_out_of_the_box(project, tmp_path):
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, _ = project
    (path,) = predict_cache(root / "project" / "model", root / "cache", tmp_path, samples=["SYN2"])
    adata = ad.read_h5ad(path)
    axes = sc.pl.spatial(adata, color=[adata.var_names[0], "genedml_group"], show=False)
    assert len(axes) == 2 and axes[0].get_images()  # the hires thumbnail is drawn under the spots
    plt.close("all")


def test_squidpy_spatial_scatter_plots_a_prediction(project, tmp_path):
    sq = pytest.importorskip("squidpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, _ = project
    (path,) = predict_cache(root / "project" / "model", root / "cache", tmp_path, samples=["SYN2"])
    sq.pl.spatial_scatter(ad.read_h5ad(path), color="genedml_group")
    plt.close("all")


def test_missing_image_gives_scalefactors_without_images_and_says_so(project, tmp_path):
    root, _ = project
    cache = FeatureCache(root / "cache")
    attrs = cache.sample_attrs("SYN2") | {"image": str(tmp_path / "moved.jpg")}
    centers = cache.read("SYN2", names=["centers"]).arrays["centers"]
    view = cached_sample_view(attrs, centers)
    assert view.hires is None and "not found" in view.note
    predictor = Predictor(root / "project" / "model")
    feats_pred = {"X": np.zeros((len(centers), len(predictor.genes)), dtype=np.float32)}
    barcodes = cache.read("SYN2", names=["barcodes"]).barcodes
    adata = ad.read_h5ad(write_prediction(tmp_path / "SYN2.h5ad", "SYN2", barcodes, centers, predictor.genes, feats_pred, predictor.provenance(None), spatial=view))
    entry = adata.uns["spatial"]["SYN2"]
    assert not entry.get("images") and SCANPY_SCALEFACTOR_KEYS <= set(entry["scalefactors"])
    assert "img_key=None" in adata.uns["genedml"]["spatial_image"]
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    sc.pl.spatial(adata, img_key=None, color=adata.var_names[0], show=False)


def test_thumbnail_view_of_an_image_smaller_than_hires_is_the_image(project):
    root, data = project
    (sample,) = read_samples(data, samples=["SYN0"])
    view = SpatialView.read(sample.image, 10.0)
    assert view.hires_scale == 1.0 and view.hires.shape[:2] == (sample.image.height, sample.image.width)


def test_model_dir_resolves_after_the_project_folder_moves(project, tmp_path):
    root, _ = project
    moved = tmp_path / "moved"
    shutil.copytree(root / "project", moved)
    (path,) = predict_cache(moved / "model", root / "cache", moved / "pred", samples=["SYN2"])
    genedml_uns = ad.read_h5ad(path).uns["genedml"]
    assert genedml_uns["model_dir_relative"] == "../model" and genedml_uns["model_dir"] == str((moved / "model").resolve())
    again = tmp_path / "again"
    shutil.move(moved, again)  # the absolute path recorded in the file no longer exists
    assert model_dir_of(again / "pred" / "SYN2.h5ad", genedml_uns).resolve() == (again / "model").resolve()


# HEST's benchmark (src/hest/bench/benchmark.py, predict_single_split) reads an embedding file with
# read_assets_from_h5 (src/hest/bench/utils/file_utils.py) and uses assets['embeddings'] and
# assets['barcodes'].flatten().astype(str); embed_tiles also stores 'coords' (from the patch file).
HEST_EMBEDDING_KEYS = {"embeddings", "barcodes", "coords"}
# TRIDENT (trident/IO.py coords_to_h5 and read_coords; trident/wsi_objects/WSI.py extract_features,
# extract_slide_features): datasets 'features' and 'coords'; features attrs name, savetodir, encoder; coords attrs
# patch_size, level0_magnification, target_magnification (required: a KeyError otherwise), patch_size_level0
# (slide encoders), overlap, name, savetodir, level0_width, level0_height.
TRIDENT_DATASETS = {"features", "coords"}
TRIDENT_FEATURE_ATTRS = {"name", "savetodir", "encoder"}
TRIDENT_COORDS_ATTRS = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                        "name", "savetodir", "level0_width", "level0_height"}


def test_hest_layout_reads_as_hest_benchmark_reads_it(project, tmp_path):
    root, _ = project
    cache = FeatureCache(root / "cache")
    (path,) = export_h5(cache, tmp_path, ["SYN1"], layout="hest")
    with h5py.File(path, "r") as fh:
        assert HEST_EMBEDDING_KEYS <= set(fh)
        assets = {k: fh[k][:] for k in fh}
    barcodes = assets["barcodes"].flatten().astype(str).tolist()  # HEST's own line
    cached = cache.read("SYN1")
    assert barcodes == cached.barcodes.tolist()
    np.testing.assert_allclose(assets["embeddings"], cached.local[:, 0, :].astype(np.float32))
    assert assets["coords"].shape == (len(barcodes), 2)


def test_trident_layout_has_the_attributes_trident_requires(project, tmp_path):
    root, _ = project
    cache = FeatureCache(root / "cache")
    (path,) = export_h5(cache, tmp_path, ["SYN1"], layout="trident")
    with h5py.File(path, "r") as fh:
        assert TRIDENT_DATASETS <= set(fh)
        assert TRIDENT_FEATURE_ATTRS <= set(fh["features"].attrs)
        attrs = dict(fh["coords"].attrs)  # TRIDENT's read_coords
        coords = fh["coords"][:]
        assert fh["features"].attrs["encoder"] == "he-stats"
    assert TRIDENT_COORDS_ATTRS <= set(attrs)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    sample = cache.sample_attrs("SYN1")
    # TRIDENT's patcher: level-0 patch side = patch_size · (10 / target_mag) / (10 / level0_mag)
    level0_side = attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]
    assert level0_side == pytest.approx(sample["fov_px"]) and attrs["patch_size_level0"] == round(sample["fov_px"])
    assert 10 / attrs["level0_magnification"] == pytest.approx(sample["mpp"])
    centers = cache.read("SYN1", names=["centers"]).arrays["centers"]
    np.testing.assert_allclose(coords + sample["fov_px"] / 2, centers, atol=1)  # top-left corners


def test_export_h5_cli_layout_flag(project, tmp_path):
    root, _ = project
    out = subprocess.run([sys.executable, "-m", "genedml", "export-h5", str(root / "cache"), str(tmp_path), "--layout", "hest", "--samples", "SYN0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "SYN0.h5", "r") as fh:
        assert "embeddings" in fh and "features" not in fh
    bad = subprocess.run([sys.executable, "-m", "genedml", "export-h5", str(root / "cache"), str(tmp_path), "--layout", "clam"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "trident, hest" in bad.stderr


def test_real_section_prediction_has_her2st_spot_size(her2st_dir, tmp_path):
    """A real her2st section: 100 µm spots at a 200 µm pitch ≈ 145 px at ≈ 0.69 µm/px; hires ≤ 2000 px."""
    (c3,) = read_samples(her2st_dir, samples=["C3"])
    view = cached_sample_view({"image": str(her2st_dir / "C3.jpg"), "image_size": [c3.image.width, c3.image.height], "fov_px": 162.0}, c3.centers)
    assert view.spot_diameter_px == pytest.approx(100 / c3.mpp, rel=0.05)
    assert max(view.hires.shape[:2]) <= HIRES_SIDE and view.hires_scale == pytest.approx(1 / 5)
    entry = view.uns()
    assert entry["scalefactors"]["tissue_lowres_scalef"] * c3.image.height == pytest.approx(entry["images"]["lowres"].shape[0], abs=1)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    import os

    from genedml.jsonio import write_json

    path = tmp_path / "cv_runs.json"
    write_json(path, [{"fold": "A", "pcc": np.float32(0.5)}])
    assert json.loads(path.read_text()) == [{"fold": "A", "pcc": 0.5}]

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        write_json(path, [{"fold": "A"}, {"fold": "B"}])
    assert json.loads(path.read_text()) == [{"fold": "A", "pcc": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["cv_runs.json"]


def test_a_prediction_write_that_is_cut_off_leaves_no_h5ad_behind(project, tmp_path, monkeypatch):
    # The temporary file was "<sample>.tmp.h5ad": an interrupted predict left a partial file that
    # `genedml evaluate FOLDER` then read as a prediction.
    root, _ = project
    cache = FeatureCache(root / "cache")
    centers = cache.read("SYN2", names=["centers"]).arrays["centers"]
    barcodes = cache.read("SYN2", names=["barcodes"]).barcodes
    predictor = Predictor(root / "project" / "model")
    pred = {"X": np.zeros((len(centers), len(predictor.genes)), dtype=np.float32)}
    real = ad.AnnData.write_h5ad

    def cut_off(self, filename, *args, **kwargs):
        real(self, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # as if the process died mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", cut_off)
    with pytest.raises(KeyboardInterrupt):
        write_prediction(tmp_path / "SYN2.h5ad", "SYN2", barcodes, centers, predictor.genes, pred, predictor.provenance(None),
                         spatial=SpatialView(1.0, note="test"))
    assert list(tmp_path.iterdir()) == []


def test_an_export_cut_off_leaves_no_h5_behind(project, tmp_path, monkeypatch):
    # The temporary file was "<sample>.tmp.h5", which HEST's and TRIDENT's loaders take as a sample.
    import genedml.cache.export as export

    real = export._write_h5

    def cut_off(path, *args):
        real(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_h5", cut_off)
    with pytest.raises(KeyboardInterrupt):
        export.export_h5(FeatureCache(project[0] / "cache"), tmp_path, ["SYN0"], layout="hest")
    assert list(tmp_path.iterdir()) == []
