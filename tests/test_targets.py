"""Targets: panel selection, normalisation, log, 3x3 smoothing, and the recorded spec."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import scipy.sparse as sp

from genedml.data.image import ArrayImage
from genedml.data.sample import Sample
from genedml.errors import InputError
from genedml.targets import TargetSpec, fit_targets, make_targets, select_panel


def make_sample(counts, genes, sample_id="S", array_coords=None) -> Sample:
    counts = np.asarray(counts, dtype=np.float32)
    n = len(counts)
    return Sample(
        sample_id=sample_id,
        patient_id="P",
        mpp=1.0,
        barcodes=[f"b{i}" for i in range(n)],
        centers=np.column_stack([np.arange(n) + 0.5, np.full(n, 0.5)]),
        image=ArrayImage(np.zeros((2, n + 1, 3), dtype=np.uint8)),
        counts=sp.csr_matrix(counts),
        genes=genes,
        array_coords=array_coords,
    )


def tiny_training_set() -> list[Sample]:
    """A: everywhere, high.  B: everywhere, low.  C: 1 of 4 spots in S1.  D: only in S1.  E: never detected."""
    s1 = make_sample(
        [[10, 1, 5, 3, 0], [20, 2, 0, 3, 0], [30, 1, 0, 3, 0], [40, 2, 0, 3, 0]], ["A", "B", "C", "D", "E"], "S1"
    )
    s2 = make_sample([[5, 5, 1, 0], [5, 1, 1, 0], [5, 9, 1, 0]], ["E", "C", "B", "A"], "S2")
    # S2 has A all zero -> A fails detection in S2.
    return [s1, s2]


def test_panel_keeps_genes_detected_in_every_sample_and_ranks_by_mean():
    samples = tiny_training_set()
    # C is detected in 1/4 of S1 and 3/3 of S2; B in all spots of both; A never in S2; D absent from S2.
    assert select_panel(samples, n=5, min_detected=0.5) == ["B"]
    assert select_panel(samples, n=5, min_detected=0.25) == ["B", "C"]  # C is zero in 3 of S1's spots


def test_panel_by_variance_differs_from_mean_ranking():
    genes = ["flat", "varied", "low"]
    s = make_sample([[50, 1, 1], [50, 100, 1], [50, 1, 1], [50, 100, 1]], genes)
    assert select_panel([s], n=3, method="mean") == ["flat", "varied", "low"]
    by_var = select_panel([s], n=3, method="variance")
    assert by_var[0] == "varied"
    # hand check of the score: variance of log1p(1e4 * count / total) pooled over spots
    norm = np.log1p(1e4 * np.array([[50, 1, 1], [50, 100, 1]] * 2) / np.array([[52], [151]] * 2))
    assert by_var == [genes[i] for i in np.argsort(-norm.var(axis=0), kind="stable")]


def test_fewer_qualifying_genes_warn_and_none_raise(caplog):
    samples = tiny_training_set()
    with caplog.at_level(logging.WARNING, logger="genedml"):
        assert select_panel(samples, n=10, min_detected=0.25) == ["B", "C"]
    assert "only 2 genes qualify" in caplog.text
    with pytest.raises(InputError, match="no gene is detected"):
        select_panel(samples, n=10, min_detected=1.01)


def test_explicit_gene_list_is_validated_and_kept_in_order():
    samples = tiny_training_set()
    assert select_panel(samples, method="list", gene_list=["E", "A"]) == ["E", "A"]
    with pytest.raises(InputError, match=r"D.*S2"):
        select_panel(samples, method="list", gene_list=["A", "D", "NOPE"])
    with pytest.raises(InputError, match="repeats"):
        select_panel(samples, method="list", gene_list=["A", "A"])


def test_normalisation_over_panel_and_over_all_genes_by_hand():
    s = make_sample([[1, 3, 4], [0, 0, 7], [2, 2, 0]], ["A", "B", "X"])
    panel = TargetSpec(panel=["A", "B"], n_genes=2, smooth=False)
    expected = np.log1p([[2500.0, 7500.0], [0.0, 0.0], [5000.0, 5000.0]])  # zero panel total -> zeros
    assert np.allclose(make_targets(s, panel), expected, rtol=1e-6)
    over_all = TargetSpec(panel=["A", "B"], n_genes=2, smooth=False, normalize_over="all", target_sum=100.0)
    expected_all = np.log1p([[12.5, 37.5], [0.0, 0.0], [50.0, 50.0]])
    got = make_targets(s, over_all)
    assert got.dtype == np.float32 and got.shape == (3, 2)
    assert np.allclose(got, expected_all, rtol=1e-6)
    log10 = TargetSpec(panel=["B", "A"], n_genes=2, smooth=False, log="log10")
    assert np.allclose(make_targets(s, log10), np.log10(1 + np.array([[7500.0, 2500.0], [0, 0], [5000, 5000]])))


def test_zero_total_spots_give_zeros_not_nan():
    s = make_sample([[0, 0], [0, 0]], ["A", "B"], array_coords=[[0, 0], [1, 0]])
    out = make_targets(s, TargetSpec(panel=["A", "B"], n_genes=2, smooth=True))
    assert np.array_equal(out, np.zeros((2, 2)))


def test_smoothing_averages_the_existing_3x3_array_neighbourhood():
    # 3 x 3 grid with value v = 3 * row + col in gene A, spots listed in a scrambled order, (2, 2) missing.
    cells = [(c, r) for r in range(3) for c in range(3) if (c, r) != (2, 2)]
    order = [4, 0, 7, 2, 5, 1, 6, 3]
    coords = np.array([cells[i] for i in order])
    value = 3 * coords[:, 1] + coords[:, 0]
    # counts chosen so that the panel-normalised log1p target of A is exactly `value`
    a = np.expm1(value.astype(np.float64)) / 1e4
    s = make_sample(np.column_stack([a, 1 - a]), ["A", "B"], array_coords=coords)
    got = make_targets(s, TargetSpec(panel=["A"], n_genes=1, normalize_over="all", target_sum=1e4, smooth=True))[:, 0]
    grid = {(0, 0): 0, (1, 0): 1, (2, 0): 2, (0, 1): 3, (1, 1): 4, (2, 1): 5, (0, 2): 6, (1, 2): 7}
    for (x, y), g in zip(coords, got):
        neigh = [v for (cx, cy), v in grid.items() if abs(cx - x) <= 1 and abs(cy - y) <= 1]
        assert g == pytest.approx(np.mean(neigh), rel=1e-5), (x, y)
    # by hand: centre (1,1) sees 8 existing spots: (0+1+2+3+4+5+6+7)/8; corner (0,0) sees 0,1,3,4
    assert got[0] == pytest.approx(28 / 8, rel=1e-5) and got[1] == pytest.approx(2.0, rel=1e-5)


def test_smoothing_needs_array_coords_and_unique_positions():
    s = make_sample([[1, 1], [2, 1]], ["A", "B"])
    with pytest.raises(InputError, match="array"):
        make_targets(s, TargetSpec(panel=["A"], n_genes=1, smooth=True))
    dup = make_sample([[1, 1], [2, 1]], ["A", "B"], array_coords=[[3, 4], [3, 4]])
    with pytest.raises(InputError, match="share array coordinates"):
        make_targets(dup, TargetSpec(panel=["A"], n_genes=1, smooth=True))


def test_missing_panel_gene_names_the_gene_and_sample():
    s = make_sample([[1, 1]], ["A", "B"], "S9")
    with pytest.raises(InputError, match=r"S9.*GATA3"):
        make_targets(s, TargetSpec(panel=["A", "GATA3"], n_genes=2, smooth=False))


def test_fit_targets_records_panel_heg_hvg_and_round_trips_json():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(70)]
    scale = np.exp(np.linspace(0, 4, 70))
    def rates():
        return scale * rng.gamma(2, 0.5, size=(30, 1)) * rng.uniform(0.5, 1.5, (30, 70))

    samples = [make_sample(rng.poisson(rates()), genes, f"S{i}") for i in range(2)]
    spec = fit_targets(samples, n_genes=60, select="mean", smooth=False, log="log10")
    assert spec.n_genes == 60 and len(spec.heg) == 50 and len(spec.hvg) == 50
    assert set(spec.heg) <= set(spec.panel) and set(spec.hvg) <= set(spec.panel)
    pooled = np.concatenate([make_targets(s, spec) for s in samples])
    means = pooled.mean(axis=0)
    assert min(means[spec.panel.index(g)] for g in spec.heg) >= max(
        means[spec.panel.index(g)] for g in spec.panel if g not in spec.heg
    )
    back = TargetSpec.from_json(spec.to_json())
    assert back == spec
    assert np.array_equal(make_targets(samples[0], back), make_targets(samples[0], spec))
    with pytest.raises(InputError, match="unknown fields"):
        TargetSpec.from_json({**spec.to_dict(), "bogus": 1})
    with pytest.raises(InputError, match="log"):
        TargetSpec(panel=["A"], n_genes=1, log="ln")


def test_her2st_sized_sparse_counts_are_fast():
    rng = np.random.default_rng(1)
    genes = np.array([f"G{i}" for i in range(15000)])
    counts = sp.random(280, 15000, density=0.08, rng=1, format="csr", data_rvs=lambda k: rng.integers(1, 20, k))
    s = make_sample(np.zeros((280, 1)), ["tmp"])
    s.counts, s.genes = counts.astype(np.float32), genes
    s.array_coords = np.column_stack([np.arange(280) % 20, np.arange(280) // 20])
    start = time.perf_counter()
    spec = fit_targets([s, s], n_genes=250)
    y = make_targets(s, spec)
    assert time.perf_counter() - start < 5.0
    assert y.shape == (280, 250) and np.isfinite(y).all()
