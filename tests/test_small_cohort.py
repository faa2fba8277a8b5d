"""The paper's optimiser settings on a small cohort (three her2st sections) must learn something.

Adam 1e-4, batch 512, patience 20, up to 200 epochs: with one or two optimiser steps per epoch the old loop
stopped at epoch ~21 and kept epoch 0. Epochs of at least `min_epoch_steps` steps and standardised targets
are what make these settings work here.
"""

from __future__ import annotations

import numpy as np
import pytest

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model
from genedml.metrics import mean_gene_pcc
from genedml.predict import Predictor
from genedml.spots import load_spot_features
from genedml.targets import targets_at

SMALL_SIZES = {"dim": 32, "groups": 8, "scales": ["local", "global"], "global_depth": 1, "global_heads": 2,
               "global_mlp_ratio": 1.0, "device": "cpu"}


@pytest.mark.realdata
def test_paper_optimiser_settings_learn_on_three_sections(tmp_path, her2st_dir) -> None:
    from genedml.data import read_samples

    ids = ["C2", "C3", "C4", "C5", "C6"]
    samples = {s.sample_id: s for s in read_samples(her2st_dir, samples=ids)}
    backbone = load_backbone("he-stats", random_init=True)
    run_extraction(list(samples.values()), backbone, tmp_path / "cache", ExtractSettings(scales=("local",)))
    cache = FeatureCache(tmp_path / "cache")
    settings = FitSettings(model="genedml", genes=50, train_samples=["C2", "C4", "C5"], val_samples=["C6"],
                           head=SMALL_SIZES)  # optimiser settings: the defaults (the paper's)
    assert settings.head.lr == 1e-4 and settings.head.batch_size == 512 and settings.head.patience == 20
    result = fit_model(cache, None, tmp_path / "model", settings, samples=samples)
    assert result.history["best_epoch"] > 0, result.history["best_epoch"]

    predictor = Predictor(tmp_path / "model")
    feats = load_spot_features(cache, ["C3"], with_aug=False)
    truth = targets_at(samples["C3"], feats.barcodes, predictor.targets)
    pred = predictor.predict(feats, None)["X"]
    constant = np.broadcast_to(truth.mean(axis=0), truth.shape)  # the best constant predictor, told the answer
    assert mean_gene_pcc(pred, truth) > 0.1
    assert ((pred - truth) ** 2).mean() < ((constant - truth) ** 2).mean() * 1.05

    # The promise of the defaults: at least as good as the tuned linear probe on the same features and split
    # (measured 2026-11-28 with 0.7.0: 0.317 against 0.312; the averaged weights improved on validation to the
    # last of the 200 epochs. 0.6.0, keeping the last weights of the best epoch: 0.324).
    ridge = FitSettings(model="ridge-cv", genes=50, train_samples=["C2", "C4", "C5"], val_samples=["C6"])
    fit_model(cache, None, tmp_path / "ridge", ridge, samples=samples)
    ridge_pred = Predictor(tmp_path / "ridge").predict(feats, None)["X"]
    assert mean_gene_pcc(pred, truth) >= mean_gene_pcc(ridge_pred, truth)
