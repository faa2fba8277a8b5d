"""benchmarks/scale.py keeps its command-line contract (other tooling reads scale.json) at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import load_benchmark

from genedml.cache.schema import ARRAYS, LATTICE_BOXES, NEIGHBOR
from genedml.cache.store import FeatureCache
from genedml.data import read_samples
from genedml.metrics import mean_gene_pcc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale.py"
CONTRACT = ("spots", "dim", "cache_bytes", "fit_peak_rss_bytes", "fit_seconds_per_epoch", "predict_spots_per_second")


def load_scale():
    return load_benchmark("scale", "scale_benchmark")


def test_scale_benchmark_writes_its_contract_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--spots", "900", "--dim", "64", "--spots-per-slide", "300",
           "--batch-slides", "1", "--encoder-dim", "16", "--max-memory", "1MB", "--no-startup", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    record = json.loads((out / "scale.json").read_text())
    assert set(CONTRACT) <= set(record)
    assert (record["spots"], record["dim"], record["slides"], record["batch_slides"]) == (900, 64, 3, 1)
    assert record["train_spots"] == 900  # the whole cohort is the training set (no validation split)
    # float16 features per spot: local + 8 views + ≈ 3.4 lattice tiles ≈ 12.4 × 64 × 2 B, compressed a little
    assert 600 < record["cache_bytes"] / 900 < 3000, record["cache_bytes"]
    assert 2.5 < record["lattice_tiles_per_spot"] < 4.5
    assert 100e6 < record["fit_peak_rss_bytes"] < 8e9 and 100e6 < record["predict_peak_rss_bytes"] < 8e9
    assert 0 < record["fit_seconds_per_epoch"] < 120 and record["fit_epochs"] == 1
    assert np.isfinite(record["fit_train_loss"])
    assert record["predict_spots_per_second"] > 0
    assert "batch_slides=1" in record["fit_command"] and "--retrieve-k 50" in record["predict_command"]
    # ≈ 1.3 MB of features against --max-memory 1MB: read from the cache slide by slide
    assert record["fit_features_streamed"] and "encoder_dim=16" in record["fit_command"]
    assert record["targets"]["fit_peak_rss_max_bytes"] == 10**6 + 2 * 10**9
    assert record["command"].startswith("python benchmarks/scale.py --spots 900 --dim 64")
    assert record["machine"]["cores"] >= 1 and record["machine"]["ram_bytes"] > 0 and record["date"]
    assert len(record["genedml_commit"].split("-")[0]) == 40
    assert isinstance(record["targets"]["fit_peak_rss_ok"], bool)
    assert not (out / "work").exists()  # removed unless --keep-work


def test_synthetic_cohort_looks_like_an_extraction_and_carries_a_learnable_signal(tmp_path: Path) -> None:
    scale = load_scale()
    built = scale.build_cohort(tmp_path, spots=900, dim=64, per_slide=300, genes=60, mpp=0.25, seed=0)
    cache = FeatureCache(built["cache"])
    assert cache.samples() == ["S0000", "S0001", "S0002"]
    assert cache.settings["backbone"] == "synthetic" and cache.settings["weights"] == "random-init"
    assert cache.settings["augment"] == "dihedral" and cache.settings["neighbor_mode"] == "lattice"
    cached = cache.read("S0002")
    assert set(cached.arrays) == set(ARRAYS) - {NEIGHBOR}
    assert cached.arrays["local_aug"].shape == (300, 8, 1, 64) and cached.arrays["local_aug"].dtype == np.float16
    np.testing.assert_array_equal(cached.arrays["local"], cached.arrays["local_aug"][:, 0])
    assert cached.arrays["neighbor_index"].shape == (300, 25) and len(cached.arrays[LATTICE_BOXES]) == len(cached.arrays["lattice"])
    assert cached.attrs["mpp"] == 0.25 and cached.attrs["fov_px"] == 224 and cached.attrs["local_token_weights"] == [197.0]

    samples = {s.sample_id: s for s in read_samples(built["data"])}  # the HEST reader reads the targets
    np.testing.assert_array_equal(samples["S0002"].barcodes, cached.barcodes)
    np.testing.assert_allclose(samples["S0002"].centers, cached.arrays["centers"])

    def features_and_targets(sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        counts = samples[sample_id].counts.toarray()
        x = cache.read(sample_id, names=["local"]).local[:, 0].astype(np.float64)
        return np.c_[x, np.ones(len(x))], np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)

    (x0, y0), (x1, y1), (x2, y2) = (features_and_targets(s) for s in ("S0000", "S0001", "S0002"))
    x, y = np.concatenate([x0, x1]), np.concatenate([y0, y1])
    ridge = np.linalg.solve(x.T @ x + 10 * np.eye(x.shape[1]), x.T @ y)
    assert mean_gene_pcc(x2 @ ridge, y2) > 0.4  # a held-out slide is predictable from its local features


def test_the_memory_diagnostic_runs_and_attributes_its_stages(tmp_path: Path) -> None:
    """scale_fit_memory.py wraps library internals; 0.3's streaming broke it silently until this test."""
    out = tmp_path / "mem"
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale_fit_memory.py"), "--spots", "600", "--dim", "32",
           "--spots-per-slide", "300", "--steps", "2", "--encoder-dim", "16", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    record = json.loads((out / "fit_memory.json").read_text())
    assert [s["step"] for s in record["steps_log"]] == [1, 2] and all(s["peak_bytes"] > 0 for s in record["steps_log"])
    stages = {s["stage"] for s in record["stages"]}
    assert {"read counts (h5ad)", "read cached slides into the assembled arrays", "reference bank"} <= stages
    assert record["encoder_dim"] == 16 and record["peak_bytes"] > record["rss_before_fit_bytes"] > 0
