"""Training the heads on a CUDA device: mixed precision trains, and a model fitted on the GPU serves on the CPU.

`precision="auto"` means fp16 autocast with a gradient scaler on CUDA (as the authors train), so every user
with a GPU takes this path by default; CI has no GPU, so these tests run in `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.data import read_samples
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model
from genedml.predict import Predictor
from genedml.spots import load_spot_features

pytestmark = pytest.mark.gpu

HEAD = {"epochs": 4, "dim": 32, "groups": 3, "min_epoch_steps": 5, "batch_size": 64, "patience": 50}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_training")
    data = write_synthetic_dataset(root / "data", make_synthetic_dataset(n_samples=3, n_patients=2, seed=3, grid=(10, 10), n_genes=30))
    samples = {s.sample_id: s for s in read_samples(data)}
    run_extraction(list(samples.values()), load_backbone("he-stats"), root / "cache", ExtractSettings(patch_px=64, mpp_target=1.0))
    feats = load_spot_features(FeatureCache(root / "cache"), ["SYN2"], with_aug=False)
    return {"root": root, "samples": samples, "feats": feats}


@pytest.fixture(scope="module")
def fp32_on_cuda(world) -> np.ndarray:
    return _fit(world, "fp32", device="cuda", precision="fp32").predict(world["feats"], None)["X"]


def _fit(world, name: str, **head) -> Predictor:
    settings = FitSettings(model="genedml", genes=20, train_samples=["SYN0"], val_samples=["SYN1"], head={**HEAD, **head})
    model_dir = fit_model(world["root"] / "cache", None, world["root"] / name, settings, samples=world["samples"]).model_dir
    return Predictor(model_dir)


def _curve(world, name: str) -> dict:
    return json.loads(next((world["root"] / name).rglob("curve.json")).read_text())


@pytest.mark.parametrize("precision, recorded", [("auto", "float16"), ("bf16", "bfloat16")])
def test_mixed_precision_fit_on_cuda_trains_like_fp32(world, fp32_on_cuda, precision, recorded):
    mixed = _fit(world, precision, device="cuda", precision=precision).predict(world["feats"], None)["X"]
    curve = _curve(world, precision)
    assert curve["precision"] == recorded
    losses = [e["loss"] for e in curve["epochs"]]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses  # the scaler did not skip every step
    assert np.isfinite(mixed).all()
    # Same seed, same data: half-precision rounding moves the weights a little, not the function learnt.
    r = np.corrcoef(np.asarray(mixed, dtype=np.float64).ravel(), np.asarray(fp32_on_cuda, dtype=np.float64).ravel())[0, 1]
    assert r > 0.95, r


def test_model_fitted_on_cuda_serves_on_the_cpu(world, monkeypatch):
    on_gpu = _fit(world, "portable", device="auto").predict(world["feats"], None)["X"]
    # A machine without a GPU: "auto" resolves to the CPU when the model is opened there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = Predictor(world["root"] / "portable").predict(world["feats"], None)["X"]
    np.testing.assert_allclose(on_cpu, on_gpu, rtol=1e-3, atol=1e-3)
