"""Benchmark protocols as commands: HEST-Benchmark on its folder layout, and the Gene-DML/TRIPLEX paper folds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from genedml.backbones import load_backbone
from genedml.bench.hest import HestBenchSettings, find_tasks, read_splits, run_hest_bench
from genedml.bench.paper import DATASETS, plan_folds, read_gene_list
from genedml.cache import FeatureCache
from genedml.data import read_samples
from genedml.errors import ConfigError, InputError
from genedml.extract.runner import ExtractSettings, run_extraction

SECTIONS = ["B4", "C2", "C3"]  # two patients (B, C): two folds
DROPPED = 5  # spots of B4 left out of HEST's patch file (HEST keeps only in-slide patches)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genedml", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def her2st_cache(her2st_dir, tmp_path_factory) -> Path:
    """A tiny he-stats cache of three her2st sections (112 µm patches, HEST's field of view)."""
    cache = tmp_path_factory.mktemp("bench") / "cache"
    samples = read_samples(her2st_dir, samples=SECTIONS)
    run_extraction(samples, load_backbone("he-stats"), cache, ExtractSettings(patch_px=112, mpp_target=1.0, scales=("local",), batch_size=64))
    return cache


@pytest.fixture(scope="module")
def hest_tree(her2st_dir, tmp_path_factory) -> Path:
    """A HEST-benchmark-shaped task folder built from the her2st sections (layout of MahmoodLab/hest-bench)."""
    task = tmp_path_factory.mktemp("hest_bench") / "HER2ST_TOY"
    samples = {s.sample_id: s for s in read_samples(her2st_dir, samples=SECTIONS)}
    for folder in ("splits", "adata", "patches"):
        (task / folder).mkdir(parents=True)
    for sid, s in samples.items():
        ad.AnnData(X=s.counts, obs=pd.DataFrame(index=s.barcodes), var=pd.DataFrame(index=s.genes)).write_h5ad(task / "adata" / f"{sid}.h5ad")
        keep = slice(DROPPED, None) if sid == "B4" else slice(None)
        with h5py.File(task / "patches" / f"{sid}.h5", "w") as fh:
            fh.create_dataset("barcode", data=np.char.encode(s.barcodes[keep], "utf-8").reshape(-1, 1))
            fh.create_dataset("coords", data=s.centers[keep].astype(np.int64) - 81)
    common = sorted(set.intersection(*(set(s.genes) for s in samples.values())))
    columns = {sid: pd.Index(s.genes).get_indexer(common) for sid, s in samples.items()}
    pooled = np.concatenate([np.log1p(s.counts[:, columns[sid]].toarray()) for sid, s in samples.items()])
    genes = [common[i] for i in np.argsort(-pooled.var(axis=0))[:50]]
    (task / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    folds = [(["C2", "C3"], ["B4"]), (["B4"], ["C2", "C3"])]
    for i, (train, test) in enumerate(folds):
        for kind, ids in (("train", train), ("test", test)):
            rows = [{"sample_id": sid, "patches_path": f"patches/{sid}.h5", "expr_path": f"adata/{sid}.h5ad"} for sid in ids]
            pd.DataFrame(rows).to_csv(task / "splits" / f"{kind}_{i}.csv", index=False)
    return task


def test_hest_layout_is_found_and_read(hest_tree):
    assert find_tasks(hest_tree.parent) == [hest_tree] == find_tasks(hest_tree)
    splits = read_splits(hest_tree)
    assert [(s.train[0].sample_id, s.test[0].sample_id) for s in splits] == [("C2", "B4"), ("B4", "C2")]
    with pytest.raises(InputError, match="--task"):
        find_tasks(hest_tree.parent, only=["IDC"])


def test_hest_ridge_reproduces_hests_own_probe_and_metric(hest_tree, her2st_cache, tmp_path):
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    summary = run_hest_bench(hest_tree.parent, her2st_cache, tmp_path, HestBenchSettings(models=["ridge"]))
    written = json.loads((tmp_path / "dataset_results.json").read_text())
    assert {"results", "average"} <= set(written)  # the shape of HEST's dataset_results.json
    (row,) = written["results"][0]["results"]
    assert written["results"][0]["dataset_name"] == "HER2ST_TOY" and row["encoder_name"] == "he-stats + ridge (HEST probe)"
    assert row["pearson_std"] == pytest.approx(np.std(row["mean_per_split"]))  # population std over splits, as HEST
    split0 = json.loads((tmp_path / "HER2ST_TOY" / "ridge" / "split0" / "results.json").read_text())
    assert split0["n_test"] == 283 - DROPPED and split0["n_train"] == 187 + 180

    # HEST's own pipeline (benchmark.py + trainer.py), run here on the same embeddings and spots
    cache = FeatureCache(her2st_cache)
    genes = json.loads((hest_tree / "var_50genes.json").read_text())["genes"]

    def assets(sid: str, barcodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cached = cache.read(sid)
        index = {b: i for i, b in enumerate(cached.barcodes)}
        x = cached.local[[index[b] for b in barcodes], 0, :].astype(np.float64)
        adata = ad.read_h5ad(hest_tree / "adata" / f"{sid}.h5ad")[list(barcodes), genes]
        return x, np.log1p(adata.X.toarray().astype(np.float64))

    def patch_barcodes(sid: str) -> np.ndarray:
        with h5py.File(hest_tree / "patches" / f"{sid}.h5", "r") as fh:
            return fh["barcode"][:].flatten().astype(str)

    train = [assets(s, patch_barcodes(s)) for s in ("C2", "C3")]
    x_train, y_train = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    x_test, y_test = assets("B4", patch_barcodes("B4"))
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=min(256, x_train.shape[1]), random_state=1))])
    z_train, z_test = pipe.fit_transform(x_train), pipe.transform(x_test)
    alpha = 100 / (z_train.shape[1] * y_train.shape[1])

    def hest_metric(solver: str) -> tuple[float, int]:
        reg = Ridge(solver=solver, alpha=alpha, fit_intercept=False, max_iter=1000, random_state=1)
        pred = reg.fit(z_train, y_train).predict(z_test)
        r = np.array([pearsonr(y_test[:, g], pred[:, g])[0] for g in range(len(genes))])
        return float(np.nanmean(r)), int(np.isnan(r).sum())

    exact, n_constant = hest_metric("svd")
    assert split0["pearson_mean"] == pytest.approx(exact, abs=1e-6)  # the same ridge, solved exactly
    assert split0["n_genes_constant"] == n_constant
    # HEST runs lsqr (tolerance 1e-4), which stops early along near-null PCA directions: ≈ 0.003 lower here.
    assert split0["pearson_mean"] == pytest.approx(hest_metric("lsqr")[0], abs=5e-3)
    assert "HER2ST_TOY" in summary["markdown"] and "he-stats + ridge" in summary["markdown"]


def test_bench_hest_command_runs_every_head_on_the_same_splits(hest_tree, her2st_cache, tmp_path):
    small = ["--head-option", 'scales=["local","global"]', "--head-option", "dim=32", "--head-option", "groups=4",
             "--head-option", "batch_size=128", "--head-option", "global_depth=1", "--epochs", "2"]
    out = run("bench", "hest", str(hest_tree), "--cache", str(her2st_cache), "--backbone", "he-stats", "--out", str(tmp_path),
              "--model", "ridge", "--model", "ridge-cv", "--model", "genedml", *small)
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "hest_bench.md").read_text()
    assert "| he-stats + ridge (HEST probe) |" in table and "| he-stats + ridge-cv |" in table and "| he-stats + genedml |" in table
    # Neural heads select their epoch on a training section, never the test split: split 0 trains on C2 + C3.
    split0, split1 = (json.loads((tmp_path / "HER2ST_TOY" / "genedml" / f"split{i}" / "results.json").read_text()) for i in (0, 1))
    (val,) = split0["validation_samples"]
    assert val in ("C2", "C3") and split0["n_train"] == {"C2": 180, "C3": 187}[val] and split0["n_test"] == 283 - DROPPED
    assert split1["validation_samples"] == [] and split1["n_train"] == 283 - DROPPED  # one training section: none carved
    assert "Average" in table and "--mpp-target 0.5" in table  # the leaderboard's average column; the geometry note
    wrong = run("bench", "hest", str(hest_tree), "--cache", str(her2st_cache), "--backbone", "uni", "--out", str(tmp_path))
    assert wrong.returncode == 2 and "he-stats" in wrong.stderr


def test_paper_datasets_follow_the_authors_folds_and_names():
    from sklearn.model_selection import KFold

    her2st, stnet, cscc = DATASETS["her2st"], DATASETS["stnet"], DATASETS["cscc"]
    assert [f[0] for f in her2st.folds()] == list("ABCDEFGH") and len(cscc.folds()) == 4
    kfold = [tuple(np.array(stnet.patients)[t]) for _, t in KFold(8, shuffle=True, random_state=2021).split(stnet.patients)]
    assert stnet.folds() == kfold and sum(len(f) for f in kfold) == 23
    assert len(her2st.hest_ids) == 36 and len(stnet.hest_ids) == 68 and len(cscc.hest_ids) == 12
    assert her2st.patient_of("B4") == "B" and her2st.patient_of("SPA150") == "A" and her2st.patient_of("C2x") is None
    assert stnet.patient_of("BC23209_C1") == "BC23209" and stnet.patient_of("SPA111") == "BC23901"
    assert cscc.patient_of("P10_ST_rep2") == "P10" and cscc.patient_of("P2_ST_rep1") == "P2"
    assert cscc.patient_of("sec7", "Patient 2", known=True) == "P2" and cscc.patient_of("NCBI770") == "P2"


def test_paper_folds_run_what_exists_and_name_what_is_missing():
    folds, missing = plan_folds(DATASETS["her2st"], {"B4": "B", "C2": "C", "C3": "C"}, None)
    assert [f["name"] for f in folds] == ["fold 1 (patient B)", "fold 2 (patient C)"]
    assert folds[0]["test"] == ["B4"] and folds[0]["train"] == ["C2", "C3"]
    assert len(missing) == 6 and missing[0].startswith("fold 0 (patient A)")
    _, missing = plan_folds(DATASETS["her2st"], {"C2": "C"}, [2])
    assert "no training section" in missing[0]
    with pytest.raises(ConfigError, match="0..7"):
        plan_folds(DATASETS["her2st"], {}, [8])


def test_gene_lists_load_without_unpickling(tmp_path):
    np.save(tmp_path / "genes_her2st.npy", np.array(["ERBB2", "GAPDH"]))
    assert read_gene_list(tmp_path / "genes_her2st.npy") == ["ERBB2", "GAPDH"]
    np.save(tmp_path / "objects.npy", np.array(["ERBB2", "GAPDH"], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="allow_pickle=True"):
        read_gene_list(tmp_path / "objects.npy")


def test_bench_paper_command_runs_one_her2st_fold_with_ridge(her2st_dir, her2st_cache, tmp_path):
    out = run("bench", "paper", str(her2st_dir), "--cache", str(her2st_cache), "--dataset", "her2st", "--out", str(tmp_path),
              "--model", "ridge", "--fold", "1")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "paper_summary.json").read_text())
    assert summary["folds_run"] == ["fold 1 (patient B)"] and summary["sections"] == {"B4": "B", "C2": "C", "C3": "C"}
    entry = summary["table"]["ridge"]
    assert 0 < entry["pcc_acg"]["mean"] < entry["pcc_hpg"]["mean"] <= 1 and entry["mse"]["mean"] > 0
    table = (tmp_path / "paper_summary.md").read_text()
    assert "| he-stats + ridge |" in table and "Gene-DML (published, 8 folds) | 0.210 | 0.331 | 0.541" in table
    assert "1 of 8 folds run" in table and "training-only panel" in table and "log10" in table
    targets = json.loads(next((tmp_path / "models").rglob("targets.json")).read_text())
    assert targets["log"] == "log10" and targets["smooth"] and targets["n_genes"] == 250


def test_authors_gene_list_is_found_in_the_data_folder(tmp_path):
    from genedml.bench.paper import find_gene_list

    assert find_gene_list(tmp_path, DATASETS["cscc"], None) is None
    np.save(tmp_path / "genes_skin.npy", np.array(["KRT14"]))
    assert find_gene_list(tmp_path, DATASETS["cscc"], None) == tmp_path / "genes_skin.npy"
    with pytest.raises(InputError, match="--gene-list"):
        find_gene_list(tmp_path, DATASETS["cscc"], tmp_path / "absent.txt")


def test_paper_with_a_fixed_panel_ranks_hpg_genes_over_folds(her2st_dir, her2st_cache, tmp_path):
    from genedml.bench.paper import PaperSettings, run_paper

    samples = read_samples(her2st_dir, samples=SECTIONS)
    shared = set.intersection(*(set(s.genes) for s in samples))
    c2 = samples[1]
    order = np.argsort(-np.asarray(c2.counts.sum(axis=0)).ravel())
    genes = [c2.genes[i] for i in order if c2.genes[i] in shared][:60]
    (tmp_path / "genes.txt").write_text("\n".join(genes))
    summary = run_paper(her2st_dir, her2st_cache, tmp_path / "out", PaperSettings(dataset="her2st", models=["ridge"], gene_list=tmp_path / "genes.txt"))
    assert summary["folds_run"] == ["fold 1 (patient B)", "fold 2 (patient C)"] and len(summary["folds_missing"]) == 6
    assert summary["panel"].startswith("fixed panel: 60 genes") and "mean PCC rank over folds" in summary["hpg"]
    runs = json.loads((tmp_path / "out" / "cv_runs.json").read_text())
    assert [list(r["gene_pcc"]) for r in runs] == [genes, genes]  # one panel, in the list's order
    entry = summary["table"]["ridge"]
    assert entry["pcc_hpg"]["std_folds"] is not None and entry["pcc_hpg"]["mean"] >= entry["pcc_acg"]["mean"] - 0.05
