"""End to end on synthetic tissue: extract → fit → predict (regression, retrieval) → evaluate → cv."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.ablations import ABLATIONS
from genedml.cv import CVSettings, check_settings, make_folds, run_cv, variants
from genedml.data import read_samples
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from genedml.errors import CacheMismatchError, ConfigError, ModelDirError
from genedml.evaluate import evaluate_dir
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model, split_samples, validation_kind
from genedml.predict import Predictor, RetrievalSettings, predict_cache

FAST_HEAD = {"epochs": 40, "patience": 40, "batch_size": 32, "lr": 1e-3, "dim": 128}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    samples = make_synthetic_dataset(n_samples=4, n_patients=2, seed=3, grid=(9, 9), n_genes=30)
    data = write_synthetic_dataset(root / "data", samples)
    backbone = load_backbone("he-stats")
    settings = ExtractSettings(patch_px=112, mpp_target=1.0, augment="dihedral", batch_size=64)
    run_extraction(read_samples(data), backbone, root / "cache", settings)
    return root, data


@pytest.fixture(scope="module")
def genedml_model(dataset):
    root, data = dataset
    fs = FitSettings(model="genedml", genes=24, train_samples=["SYN0", "SYN1"], val_samples=["SYN2"], head=dict(FAST_HEAD, groups=6))
    return fit_model(root / "cache", data, root / "model_genedml", fs)


def test_split_is_by_sample_and_deterministic():
    train, val = split_samples(["a", "b", "c", "d", "e"], None, None, 0.4, seed=1)
    assert sorted(train + val) == ["a", "b", "c", "d", "e"] and len(val) == 2
    assert split_samples(["a", "b", "c", "d", "e"], None, None, 0.4, seed=1) == (train, val)
    assert split_samples(["a", "b"], ["a"], ["b"], 0.2, 0) == (["a"], ["b"])


def test_validation_holds_out_whole_patients_when_there_are_three_or_more() -> None:
    samples = ["A1", "A2", "B1", "B2", "C1", "C2", "D1", "D2"]
    patients = {s: s[0] for s in samples}
    for seed in range(5):
        train, val = split_samples(samples, None, None, 0.2, seed, patients=patients)
        assert sorted(train + val) == samples and len({patients[s] for s in val}) == 1  # ceil(0.2 x 4) patients
        assert not {patients[s] for s in val} & {patients[s] for s in train}
    # Two patients, or a sample whose patient is unknown: sections, exactly as without patients.
    two = {s: "AB"[i % 2] for i, s in enumerate(samples)}
    assert split_samples(samples, None, None, 0.2, 1, patients=two) == split_samples(samples, None, None, 0.2, 1)
    partial = {s: p for s, p in patients.items() if s != "D2"}
    assert split_samples(samples, None, None, 0.2, 1, patients=partial) == split_samples(samples, None, None, 0.2, 1)
    assert validation_kind(["A1", "B1"], ["C1"], patients) == "patients not in training"
    assert validation_kind(["A1", "B1"], ["A2"], patients).startswith("sections")


def test_fit_writes_a_complete_model_dir(genedml_model):
    out = genedml_model.model_dir
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == "not-learned" and config["train_samples"] == ["SYN0", "SYN1"]
    assert config["val_samples"] == ["SYN2"] and len(config["genes"]) == 24
    assert config["validation"] == "patients not in training"  # SYN0, SYN1: patient P0; SYN2, given by name: P1
    for name in ("targets.json", "head/head.json", "bank/index.faiss", "prototypes.safetensors", "curve.json", "curve.png"):
        assert (out / name).is_file(), name
    assert genedml_model.history["best_val_pcc"] > 0.2


def test_predict_regression_and_retrieval_write_documented_anndata(dataset, genedml_model, tmp_path):
    root, data = dataset
    model = genedml_model.model_dir
    (reg,) = predict_cache(model, root / "cache", tmp_path / "reg", samples=["SYN3"])
    (ret,) = predict_cache(model, root / "cache", tmp_path / "ret", samples=["SYN3"], retrieval=RetrievalSettings(k=10, weighting="softmax"))
    a, b = ad.read_h5ad(reg), ad.read_h5ad(ret)
    assert a.shape == (81, 24) and list(a.var_names) == json.loads((model / "config.json").read_text())["genes"]
    assert a.obs_names[0] == FeatureCache(root / "cache").read("SYN3").barcodes[0]
    assert a.obsm["spatial"].shape == (81, 2)
    assert b.obsm["knn_index"].shape == (81, 10) and b.obsm["knn_similarity"].shape == (81, 10)
    assert np.all(np.diff(b.obsm["knn_similarity"], axis=1) <= 1e-6)  # sorted by similarity
    assert "genedml_group" in a.obs and a.uns["genedml"]["mode"] == "regression" and b.uns["genedml"]["mode"] == "retrieval"
    assert b.uns["genedml"]["retrieval"]["k"] == 10
    assert not np.allclose(a.X, b.X)
    # blend 0 is the regression output, blend 1 the retrieval output
    (b0,) = predict_cache(model, root / "cache", tmp_path / "b0", samples=["SYN3"], retrieval=RetrievalSettings(k=10, weighting="softmax", blend=0.0))
    np.testing.assert_allclose(ad.read_h5ad(b0).X, a.X, atol=1e-6)


def test_model_round_trip_gives_identical_predictions(dataset, genedml_model):
    root, _ = dataset
    from genedml.spots import load_spot_features

    feats = load_spot_features(FeatureCache(root / "cache"), ["SYN3"], with_aug=False)
    p1 = Predictor(genedml_model.model_dir).predict(feats, None)["X"]
    p2 = Predictor(genedml_model.model_dir).predict(feats, None)["X"]
    np.testing.assert_array_equal(p1, p2)


def test_evaluate_writes_metrics_and_figures(dataset, genedml_model, tmp_path):
    root, data = dataset
    predict_cache(genedml_model.model_dir, root / "cache", tmp_path / "pred", samples=["SYN3"])
    metrics = evaluate_dir(tmp_path / "pred", data, tmp_path / "eval")
    for name in ("metrics.json", "per_gene.csv", "pcc_distribution.png", "maps_SYN3.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert metrics["per_slide_mean"]["pcc_acg"] > 0.2  # he-stats features carry the synthetic signal


def test_ridge_has_no_bank_and_retrieval_is_refused_with_reason(dataset, tmp_path):
    root, data = dataset
    fs = FitSettings(model="ridge", genes=24, train_samples=["SYN0", "SYN1"], val_samples=["SYN2"])
    result = fit_model(root / "cache", data, tmp_path / "ridge", fs)
    with pytest.raises(ModelDirError, match="no gene embedding"):
        predict_cache(result.model_dir, root / "cache", tmp_path / "p", samples=["SYN3"], retrieval=RetrievalSettings(k=5))


def test_predict_refuses_a_cache_from_another_backbone(dataset, genedml_model, tmp_path):
    root, data = dataset
    other = load_backbone("tiny-vit", random_init=True)
    run_extraction(read_samples(data, samples=["SYN3"]), other, tmp_path / "other", ExtractSettings(patch_px=112, mpp_target=1.0))
    with pytest.raises(CacheMismatchError, match="backbone"):
        predict_cache(genedml_model.model_dir, tmp_path / "other", tmp_path / "p")


def test_fit_refuses_unexpected_backbone(dataset, tmp_path):
    root, data = dataset
    with pytest.raises(CacheMismatchError, match="he-stats"):
        fit_model(root / "cache", data, tmp_path / "m", FitSettings(model="ridge", expect_backbone="uni"))


def test_cv_ablation_rows_name_what_is_removed():
    labels = [v.name for v in variants(CVSettings(models=["genedml"], ablations=["no-group", "mlp"], retrieve_k=None))]
    assert labels == ["genedml", "genedml − group", "MLP (local only, regression only)"]  # not "genedml −no-group"
    labels = [v.name for v in variants(CVSettings(models=[], ablations=["paper-loss-weights", "authors"], retrieve_k=None))]
    assert labels == ["genedml, the paper's loss weights", "genedml as the authors (no named deviation)"]


def test_cv_every_ablation_has_its_own_row_label():
    # cv tables are keyed by label: two ablations with one label would be merged into one row.
    labels = [v.name for v in variants(CVSettings(models=["genedml"], ablations=list(ABLATIONS), retrieve_k=None))]
    assert len(set(labels)) == len(ABLATIONS) + 1


def test_cv_by_patient_never_splits_a_patient(dataset):
    _, data = dataset
    samples = read_samples(data)
    folds = make_folds(samples, "patient")
    patient = {s.sample_id: s.patient_id for s in samples}
    assert len(folds) == 2
    for fold in folds:
        assert not {patient[s] for s in fold["train"]} & {patient[s] for s in fold["test"]}


def test_cv_compares_models_on_identical_folds(dataset, tmp_path):
    root, data = dataset
    settings = CVSettings(by="patient", models=["ridge", "genedml"], genes=24, epochs=5, head={"batch_size": 64, "lr": 1e-3, "groups": 6, "dim": 64})
    summary = run_cv(data, root / "cache", tmp_path / "cv", settings)
    assert set(summary["table"]) == {"ridge", "genedml"}
    runs = json.loads((tmp_path / "cv" / "cv_runs.json").read_text())
    folds = {v: [r["fold"] for r in runs if r["variant"] == v] for v in ("ridge", "genedml")}
    assert folds["ridge"] == folds["genedml"]
    assert "| ridge |" in summary["markdown"] and "test ['SYN0', 'SYN1']" in summary["markdown"]


def test_bleep_with_an_ivf_index_predicts_by_retrieval(dataset, tmp_path):
    root, data = dataset
    fs = FitSettings(model="bleep", genes=24, train_samples=["SYN0", "SYN1"], val_samples=["SYN2"], index="ivf",
                     head={"epochs": 5, "batch_size": 64, "lr": 1e-3})
    result = fit_model(root / "cache", data, tmp_path / "bleep", fs)
    assert json.loads((result.model_dir / "config.json").read_text())["bank"]["index"].startswith("ivf")
    (path,) = predict_cache(result.model_dir, root / "cache", tmp_path / "p", samples=["SYN3"], retrieval=RetrievalSettings(k=7))
    adata = ad.read_h5ad(path)
    assert adata.obsm["knn_index"].shape == (81, 7) and np.isfinite(adata.X).all()


def _interrupt_on(monkeypatch, name: str, call: int) -> list[tuple]:
    """Make genedml.cv.<name> raise KeyboardInterrupt on its `call`-th call (1-based); return the calls made."""
    import genedml.cv

    real, calls = getattr(genedml.cv, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(genedml.cv, name, wrapper)
    return calls


def test_cv_resume_does_only_what_an_interrupted_run_left(dataset, tmp_path, monkeypatch):
    root, data = dataset
    settings = CVSettings(by="patient", models=["ridge", "genedml"], genes=24, epochs=2, retrieve_k=5,
                          head={"batch_size": 64, "lr": 1e-3, "groups": 6, "dim": 32})
    full = run_cv(data, root / "cache", tmp_path / "full", settings)["runs"]
    assert len(full) == 6  # 2 folds x (ridge, genedml, genedml + retrieval)
    # Stopped while scoring the retrieval row of the first fold: its two other rows are on disk already.
    _interrupt_on(monkeypatch, "evaluate_fold", 3)
    with pytest.raises(KeyboardInterrupt):
        run_cv(data, root / "cache", tmp_path / "cv", settings)
    kept = json.loads((tmp_path / "cv" / "cv_runs.json").read_text())
    assert [(r["fold"], r["variant"]) for r in kept] == [(full[0]["fold"], "ridge"), (full[0]["fold"], "genedml")]
    monkeypatch.undo()
    fits = _interrupt_on(monkeypatch, "fit_model", 0)  # counts only
    resumed = run_cv(data, root / "cache", tmp_path / "cv", settings, resume=True)["runs"]
    # The retrieval row reuses the first fold's genedml model; only the second fold is fitted.
    assert [a[2].parent.parent.name for a in fits] == [full[3]["fold"]] * 2
    assert [(r["fold"], r["variant"], r["seed"]) for r in resumed] == [(r["fold"], r["variant"], r["seed"]) for r in full]
    assert resumed[:2] == kept
    for a, b in zip(resumed, full):
        assert a["pcc_acg"] == pytest.approx(b["pcc_acg"], abs=1e-6), (a["fold"], a["variant"])


def test_cv_every_fit_has_its_own_model_dir_and_retrieval_scores_the_default(dataset, tmp_path, monkeypatch):
    # "genedml + neighbour (the paper's three scales)" was cut at " + " to "genedml": the ablation's fit overwrote
    # the default's model and the "genedml + retrieval" row then scored the ablation's model.
    root, data = dataset
    settings = CVSettings(by="patient", models=["genedml"], ablations=["paper-scales"], genes=24, epochs=1, retrieve_k=5,
                          head={"batch_size": 64, "lr": 1e-3, "groups": 6, "dim": 32})
    fits = _interrupt_on(monkeypatch, "fit_model", 0)  # counts only
    scored = _interrupt_on(monkeypatch, "evaluate_fold", 0)
    runs = run_cv(data, root / "cache", tmp_path / "cv", settings)["runs"]
    fit_dirs = [a[2] for a in fits]
    assert len(fit_dirs) == 4 and len(set(fit_dirs)) == 4  # 2 folds x (default, paper-scales)
    by_row = {(r["fold"], r["variant"]): a[0] for r, a in zip(runs, scored)}
    for fold in {r["fold"] for r in runs}:
        default = by_row[(fold, "genedml")]
        retrieval = [d for (f, name), d in by_row.items() if f == fold and "retrieval" in name]
        assert retrieval == [default]
        assert by_row[(fold, ABLATIONS["paper-scales"].label)] != default
        assert json.loads((default / "config.json").read_text())["head_config"]["scales"] == ["local", "global"]


def test_cv_resume_refuses_other_settings_before_any_fit(dataset, tmp_path, monkeypatch):
    root, data = dataset
    settings = CVSettings(by="patient", models=["ridge"], genes=24)
    run_cv(data, root / "cache", tmp_path / "cv", settings)
    fits = _interrupt_on(monkeypatch, "fit_model", 0)
    with pytest.raises(ConfigError, match=r"other settings \(settings.genes\)"):
        run_cv(data, root / "cache", tmp_path / "cv", CVSettings(by="patient", models=["ridge"], genes=20), resume=True)
    assert not fits
    # Nothing left to do: a resume of a finished cv fits nothing and gives the same table.
    again = run_cv(data, root / "cache", tmp_path / "cv", settings, resume=True)
    assert not fits and len(again["runs"]) == 2


def test_cv_resume_refuses_a_gene_list_whose_content_changed(dataset, tmp_path):
    root, data = dataset
    genes = tmp_path / "genes.txt"
    panel = list(read_samples(data)[0].genes[:12])
    genes.write_text("\n".join(panel) + "\n")
    settings = CVSettings(by="patient", models=["ridge"], genes=12, gene_list=genes)
    run_cv(data, root / "cache", tmp_path / "cv", settings)
    genes.write_text("\n".join(panel[::-1][:10]) + "\n")  # same path, other panel
    with pytest.raises(ConfigError, match="gene_list_sha256"):
        run_cv(data, root / "cache", tmp_path / "cv", settings, resume=True)


def test_cv_retrieve_k_beyond_a_fold_bank_is_refused_or_reported(dataset, tmp_path, monkeypatch):
    root, data = dataset
    head = {"batch_size": 64, "lr": 1e-3, "groups": 6, "dim": 32}
    fits = _interrupt_on(monkeypatch, "fit_model", 0)  # counts only
    # Each fold trains on two 81-spot sections: k = 500 could never run as k = 500.
    with pytest.raises(ConfigError, match=r"--retrieve-k 500 exceeds the reference bank of fold .* its 162 training spots"):
        run_cv(data, root / "cache", tmp_path / "refused", CVSettings(by="patient", models=["genedml"], genes=24, epochs=1, retrieve_k=500, head=head))
    assert not fits and not (tmp_path / "refused").exists()
    # k = 120 fits the training spots, but fit keeps one section out of the bank for validation: k as run is recorded.
    summary = run_cv(data, root / "cache", tmp_path / "cv", CVSettings(by="patient", models=["genedml"], genes=24, epochs=1, retrieve_k=120, head=head))
    used = [r["retrieve_k_used"] for r in summary["runs"] if "retrieval" in r["variant"]]
    assert len(used) == 2 and all(k < 120 for k in used)
    assert "fewer neighbours than k=120" in summary["markdown"]


@pytest.mark.parametrize("kwargs, message", [
    ({"smooth": "no"}, "--smooth takes true or false, got 'no'"),  # a truthy string: it smoothed
    ({"seed": 1.5}, "--seed takes an integer, got 1.5"),
    ({"val_fraction": "0.2"}, "--val-fraction takes a number"),  # it failed with a TypeError from '<='
    ({"genes": True}, "--genes takes an integer, got True"),
])
def test_fit_and_cv_settings_from_python_are_type_checked(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        FitSettings(model="ridge", **kwargs)
    if "val_fraction" not in kwargs and "seed" not in kwargs:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_settings(CVSettings(**kwargs))
    assert FitSettings(model="ridge", val_fraction=0).val_fraction == 0.0  # an int widens to a float


def test_extract_and_retrieval_settings_from_python_are_type_checked():
    from genedml.extract.runner import ExtractSettings

    with pytest.raises(ConfigError, match=re.escape("--patch-px takes an integer, got 224.0")):
        ExtractSettings(patch_px=224.0)
    with pytest.raises(ConfigError, match=re.escape("--retrieve-k takes an integer, got '5'")):
        RetrievalSettings(k="5")
    assert ExtractSettings(scales=["local"]).scales == ("local",) and RetrievalSettings(blend=1).blend == 1.0
