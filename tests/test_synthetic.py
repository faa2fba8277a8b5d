"""Synthetic tissue: speed, determinism, geometry, learnable expression, legacy-ST files."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import Ridge

from genedml.data.synthetic import make_synthetic_dataset, make_synthetic_sample, write_synthetic_dataset
from genedml.metrics import pearson_per_gene
from genedml.targets import fit_targets, make_targets

PROBE_FOV_UM = 112.0


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(n_samples=3, n_patients=2, seed=0)


def test_default_sample_generates_quickly_with_256_spots():
    start = time.perf_counter()
    s = make_synthetic_sample()
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"generation took {elapsed:.1f} s"
    assert s.n_spots == 256 and s.n_genes == 60
    assert 1600 <= s.image.width <= 2000 and 1600 <= s.image.height <= 2000


def test_same_seed_same_sample_other_seed_other_sample():
    a = make_synthetic_sample(grid=(4, 5), seed=3)
    b = make_synthetic_sample(grid=(4, 5), seed=3)
    c = make_synthetic_sample(grid=(4, 5), seed=4)
    assert np.array_equal(a.image.pixels, b.image.pixels)
    assert (a.counts != b.counts).nnz == 0
    assert not np.array_equal(a.image.pixels, c.image.pixels)
    assert (a.counts != c.counts).nnz > 0


def test_centres_and_probe_patches_lie_inside_the_image():
    s = make_synthetic_sample(grid=(3, 7), pitch_um=150.0, mpp=0.5, seed=1)
    half = PROBE_FOV_UM / s.mpp / 2
    assert (s.centers - half >= 0).all()
    assert (s.centers[:, 0] + half <= s.image.width).all() and (s.centers[:, 1] + half <= s.image.height).all()
    # array coords: x = column, y = row, one pitch apart in pixels
    step = np.diff(s.centers[s.array_coords[:, 1] == 0, 0])
    assert np.allclose(step, 150.0 / 0.5)
    assert s.array_coords[:, 0].max() == 6 and s.array_coords[:, 1].max() == 2


def test_ground_truth_and_edge_case_genes(dataset):
    s = dataset[0]
    kinds = s.meta["gene_kinds"]
    frac = s.meta["type_fractions"]
    assert frac.shape == (s.n_spots, len(s.meta["cell_types"]))
    assert np.allclose(frac.sum(axis=1), 1.0, atol=1e-5)
    assert s.meta["rates"].shape == (s.n_spots, s.n_genes)
    counts = s.counts.toarray()
    assert (counts[:, kinds == "zero"] == 0).all()
    assert (counts[:, kinds == "constant"] == 3).all()
    assert 0 < (counts[:, kinds == "rare"] > 0).mean() < 0.1
    # every cell type is present somewhere: composition varies in space
    assert (frac.max(axis=0) > 0.3).all()


def test_dataset_shares_panel_and_programs_across_patients(dataset):
    assert [s.sample_id for s in dataset] == ["SYN0", "SYN1", "SYN2"]
    assert [s.patient_id for s in dataset] == ["P0", "P0", "P1"]
    assert all(s.patient_known for s in dataset)
    for s in dataset[1:]:
        assert np.array_equal(s.genes, dataset[0].genes)
        assert np.array_equal(s.meta["gene_programs"], dataset[0].meta["gene_programs"])
    assert not np.array_equal(dataset[0].image.pixels, dataset[1].image.pixels)


def _image_statistics(sample) -> np.ndarray:
    """Mean RGB and dark-pixel fraction of the probe patch around each spot."""
    half = int(round(PROBE_FOV_UM / sample.mpp / 2))
    feats = []
    for x, y in np.round(sample.centers).astype(int):
        patch = sample.image.read_region(x - half, y - half, 2 * half, 2 * half).pixels.astype(np.float64)
        feats.append(np.r_[patch.reshape(-1, 3).mean(axis=0), (patch.mean(axis=2) < 120).mean()])
    return np.array(feats)


def test_image_statistics_probe_predicts_top_genes_across_patients(dataset):
    train, test = dataset[:2], dataset[2]
    spec = fit_targets(train, n_genes=20, smooth=False)
    x_train = np.concatenate([_image_statistics(s) for s in train])
    y_train = np.concatenate([make_targets(s, spec) for s in train])
    x_test, y_test = _image_statistics(test), make_targets(test, spec)
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0)

    def probe_pcc(y_fit: np.ndarray) -> float:
        model = Ridge(alpha=1.0).fit((x_train - mu) / sd, y_fit)
        return float(np.nanmean(pearson_per_gene(y_test, model.predict((x_test - mu) / sd))))

    real = probe_pcc(y_train)
    rng = np.random.default_rng(0)
    shuffled = np.mean([probe_pcc(y_train[rng.permutation(len(y_train))]) for _ in range(5)])
    assert real > 0.3, f"probe PCC {real:.3f}"
    assert abs(shuffled) < 0.15, f"shuffled-label probe PCC {shuffled:.3f}"


def test_written_files_follow_the_legacy_st_layout(tmp_path):
    samples = make_synthetic_dataset(n_samples=2, n_patients=2, seed=5, grid=(3, 4), mpp=0.8)
    out = write_synthetic_dataset(tmp_path / "syn", samples)
    table = pd.read_csv(out / "samples.csv")
    assert list(table.columns) == ["sample_id", "patient_id", "mpp"]
    assert table["sample_id"].tolist() == ["SYN0", "SYN1"] and table["patient_id"].tolist() == ["P0", "P1"]
    assert np.allclose(table["mpp"], 0.8)
    for s in samples:
        with gzip.open(out / f"{s.sample_id}.tsv.gz", "rt") as fh:
            assert fh.readline().startswith("\t")  # her2st: unnamed first (spot id) column
        counts = pd.read_csv(out / f"{s.sample_id}.tsv.gz", sep="\t", index_col=0)
        assert list(counts.columns) == list(s.genes)
        assert list(counts.index) == [f"{x}x{y}" for x, y in s.array_coords]
        assert np.array_equal(counts.to_numpy(), s.counts.toarray())
        sel = pd.read_csv(out / f"{s.sample_id}_selection.tsv", sep="\t")
        assert list(sel.columns) == ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
        assert np.allclose(sel[["pixel_x", "pixel_y"]].to_numpy(), s.centers)
        assert np.array_equal(sel[["x", "y"]].to_numpy(), s.array_coords)
        with Image.open(out / f"{s.sample_id}.jpg") as im:
            assert im.size == (s.image.width, s.image.height)
            decoded = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert np.abs(decoded - s.image.pixels).mean() < 6  # quality-95 JPEG stays close


def test_written_dataset_round_trips_through_the_legacy_reader(tmp_path):
    legacy = pytest.importorskip("genedml.data.legacy_st")
    samples = make_synthetic_dataset(n_samples=2, n_patients=1, seed=2, grid=(4, 4), pitch_um=120.0, mpp=0.9)
    out = write_synthetic_dataset(tmp_path / "syn", samples)
    read = legacy.read_legacy_st(out, samples_table=out / "samples.csv")
    assert [r.sample_id for r in read] == ["SYN0", "SYN1"]
    for orig, back in zip(samples, read):
        assert back.patient_id == "P0" and back.patient_known
        assert back.mpp == pytest.approx(0.9)
        assert list(back.barcodes) == list(orig.barcodes)
        assert np.allclose(back.centers, orig.centers)
        assert np.array_equal(back.array_coords, orig.array_coords)
        assert np.array_equal(back.genes, orig.genes)
        assert np.array_equal(back.counts.toarray(), orig.counts.toarray())
