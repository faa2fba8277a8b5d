"""Metrics: Pearson per gene against scipy, both aggregations, exclusions, HPG, JSON safety."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import pearsonr

from genedml.errors import InputError
from genedml.metrics import evaluate_predictions, pearson_per_gene


@pytest.fixture
def case():
    """Two slides (40 + 25 spots), 60 genes; gene 0 constant in slide B only, gene 1 constant everywhere."""
    rng = np.random.default_rng(0)
    n, g = 65, 60
    truth = rng.normal(size=(n, g))
    pred = truth * rng.uniform(0, 1, size=g) + rng.normal(size=(n, g))
    slides = np.array(["A"] * 40 + ["B"] * 25)
    truth[40:, 0] = 0.3
    truth[:, 1] = 1.0
    genes = [f"G{i}" for i in range(g)]
    return truth, pred, slides, genes


def test_pearson_matches_scipy_and_flags_constant_columns():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(30, 5))
    p = t + rng.normal(size=(30, 5))
    t[:, 3] = 0.1  # constant truth (0.1 is not exactly representable: ptp catches it, a mean-centring would not)
    p[:, 4] = 2.0  # constant prediction
    r = pearson_per_gene(t, p)
    for j in range(3):
        assert r[j] == pytest.approx(pearsonr(t[:, j], p[:, j])[0], abs=1e-12)
    assert np.isnan(r[3]) and np.isnan(r[4])
    with pytest.raises(InputError):
        pearson_per_gene(t, p[:, :4])


def test_pooled_and_per_slide_aggregations_match_scipy(case):
    truth, pred, slides, genes = case
    heg, hvg = genes[10:20], genes[:5]
    out = evaluate_predictions(truth, pred, slides, genes, heg, hvg, n_hpg=50)

    pooled_r = np.array([np.nan if j == 1 else pearsonr(truth[:, j], pred[:, j])[0] for j in range(60)])
    assert out["pooled"]["pcc_acg"] == pytest.approx(np.nanmean(pooled_r), abs=1e-12)
    assert out["pooled"]["pcc_heg"] == pytest.approx(np.nanmean(pooled_r[10:20]), abs=1e-12)
    assert out["pooled"]["pcc_hvg"] == pytest.approx(np.nanmean(pooled_r[:5]), abs=1e-12)
    assert out["pooled"]["mse"] == pytest.approx(np.mean((truth - pred) ** 2))
    assert out["pooled"]["mae"] == pytest.approx(np.mean(np.abs(truth - pred)))
    assert out["pooled"]["n_excluded_constant_truth"] == 1

    per_slide = {}
    for s in ("A", "B"):
        m = slides == s
        r = np.array([
            np.nan if (np.ptp(truth[m, j]) == 0) else pearsonr(truth[m, j], pred[m, j])[0] for j in range(60)
        ])
        per_slide[s] = r
        got = out["per_slide_mean"]["slides"][s]
        assert got["pcc_acg"] == pytest.approx(np.nanmean(r), abs=1e-12)
        assert got["mse"] == pytest.approx(np.mean((truth[m] - pred[m]) ** 2))
        assert got["n_spots"] == m.sum()
    assert out["per_slide_mean"]["slides"]["A"]["n_excluded_constant_truth"] == 1
    assert out["per_slide_mean"]["slides"]["B"]["n_excluded_constant_truth"] == 2
    assert out["per_slide_mean"]["n_excluded_constant_truth"] == 3
    assert out["per_slide_mean"]["pcc_acg"] == pytest.approx(np.mean([np.nanmean(r) for r in per_slide.values()]))
    assert out["per_slide_mean"]["pcc_heg"] == pytest.approx(
        np.mean([np.nanmean(r[10:20]) for r in per_slide.values()])
    )
    # gene 0 has a PCC only in slide A: its per-slide mean is that one value
    table = out["per_gene"]
    assert table["gene"][:2] == ["G0", "G1"]
    assert table["pcc_per_slide_mean"][0] == pytest.approx(per_slide["A"][0])
    assert table["pcc_per_slide_mean"][1] is None and table["pcc_pooled"][1] is None
    assert table["pcc_pooled"][5] == pytest.approx(pooled_r[5])
    assert table["mae"][7] == pytest.approx(np.mean(np.abs(truth[:, 7] - pred[:, 7])))


def test_hpg_is_the_mean_of_the_top_genes_and_labelled_optimistic(case):
    truth, pred, slides, genes = case
    out = evaluate_predictions(truth, pred, slides, genes, None, None, n_hpg=50)
    r = np.array([x if x is not None else np.nan for x in out["per_gene"]["pcc_pooled"]])
    top = np.sort(r[np.isfinite(r)])[::-1][:50]
    assert out["pooled"]["pcc_hpg"] == pytest.approx(top.mean())
    assert out["pooled"]["pcc_hpg"] > out["pooled"]["pcc_acg"]
    small = evaluate_predictions(truth, pred, slides, genes, None, None, n_hpg=3)
    assert small["pooled"]["pcc_hpg"] == pytest.approx(top[:3].mean())
    assert "optimistic" in out["labels"]["pcc_hpg"]
    assert out["pooled"]["pcc_heg"] is None  # no HEG list given


def test_constant_prediction_is_excluded_and_counted(case):
    truth, pred, slides, genes = case
    pred = pred.copy()
    pred[:, 5] = 0.0
    out = evaluate_predictions(truth, pred, slides, genes, genes[:50], genes[:50])
    assert out["pooled"]["n_excluded_constant_pred"] == 1
    assert out["pooled"]["n_genes_valid"] == 58
    assert out["per_gene"]["pcc_pooled"][5] is None


def test_output_is_plain_json(case):
    truth, pred, slides, genes = case
    out = evaluate_predictions(truth, pred, slides, genes, genes[:50], genes[10:60])
    text = json.dumps(out, allow_nan=False)  # raises on NaN or numpy scalars
    assert json.loads(text)["slides"] == ["A", "B"]


def test_unknown_marker_genes_and_bad_shapes_raise(case):
    truth, pred, slides, genes = case
    with pytest.raises(InputError, match="NOPE"):
        evaluate_predictions(truth, pred, slides, genes, ["NOPE"], None)
    with pytest.raises(InputError, match="shape"):
        evaluate_predictions(truth, pred[:10], slides, genes, None, None)
    bad = pred.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate_predictions(truth, bad, slides, genes, None, None)
