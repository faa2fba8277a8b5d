"""The genedml head's ridge shortcut: training starts from the ridge-cv probe and learns the residual."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genedml.heads.batch import BatchMaker
from genedml.heads.registry import load_head, make_head
from genedml.heads.ridge import RidgeCVHead, RidgeHead, RidgeSettings
from tests.test_heads import SMALL, TRAIN, synthetic


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    feats, y = synthetic(n_slides=4, side=8)
    # Targets far from 0 with very different scales per gene, and raw features far from standardised: the
    # shortcut has to fold the probe's scaler/PCA and the head's feature and target scaling together exactly.
    y = y * np.linspace(0.2, 20, y.shape[1], dtype=np.float32) + 7
    feats.local = feats.local * 30 + 5
    train, val = np.flatnonzero(feats.slide < 3), np.flatnonzero(feats.slide == 3)
    return {"train": feats.take(train), "y_train": y[train], "val": feats.take(val), "y_val": y[val]}


@pytest.mark.parametrize("head_cls", [RidgeHead, RidgeCVHead])
def test_ridge_affine_map_reproduces_predict(data: dict[str, Any], head_cls: type) -> None:
    probe = head_cls(RidgeSettings(n_components=8)).fit(data["train"], data["y_train"])
    weight, bias = probe.affine()
    np.testing.assert_allclose(data["val"].local[:, 0].astype(np.float64) @ weight + bias, probe.predict(data["val"]),
                               rtol=1e-4, atol=1e-4 * np.abs(data["y_val"]).max())


def test_untrained_genedml_predicts_exactly_what_ridge_cv_predicts(data: dict[str, Any]) -> None:
    # lr ~ 0: the weights stay where they start, so the prediction is the shortcut alone.
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 1, "lr": 1e-12})
    head.fit(data["train"], data["y_train"])
    probe = RidgeCVHead().fit(data["train"], data["y_train"])
    scale = np.abs(data["y_val"]).max()
    np.testing.assert_allclose(head.predict(data["val"]), probe.predict(data["val"]), rtol=0, atol=1e-4 * scale)
    assert head.history_["started_from"]["ridge_shortcut"]["alpha"] == probe.history_["alpha"]


def test_without_the_shortcut_the_untrained_head_is_not_the_probe(data: dict[str, Any]) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 1, "lr": 1e-12, "ridge_shortcut": False})
    head.fit(data["train"], data["y_train"])
    probe = RidgeCVHead().fit(data["train"], data["y_train"])
    assert np.abs(head.predict(data["val"]) - probe.predict(data["val"])).max() > 0.1
    assert "started_from" not in head.history_


def test_shortcut_is_frozen_and_every_parameter_learns_from_the_second_step(data: dict[str, Any]) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN})
    torch.manual_seed(0)
    head.model = head._with_target_scaler(head._with_scaler(head.build(data["train"].dim, data["y_train"].shape[1]), data["train"]), data["y_train"])
    head.init_from_training(data["train"], data["y_train"])
    model = head.model
    assert not any("shortcut" in name for name, _ in model.named_parameters())  # buffers: never trained
    before = model.shortcut_weight.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    maker = BatchMaker(data["train"], "cpu", head.needs_neighbor(), head._scaler())
    y = head.scale_targets(data["y_train"])
    for step in range(2):
        batch = maker.make(np.arange(64), torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss, _ = head.batch_loss(batch, y[:64])
        loss.backward()
        optimizer.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert torch.equal(model.shortcut_weight, before)


def test_saved_head_keeps_the_shortcut_and_a_head_saved_before_it_loads_without_one(data: dict[str, Any], tmp_path: Path) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 2})
    head.fit(data["train"], data["y_train"])
    head.save(tmp_path / "new")
    np.testing.assert_array_equal(load_head(tmp_path / "new").predict(data["val"]), head.predict(data["val"]))

    old = make_head("genedml", {**SMALL, **TRAIN, "epochs": 2, "ridge_shortcut": False})
    old.fit(data["train"], data["y_train"])
    old.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "head.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["ridge_shortcut"]  # as genedml 0.5 wrote it
    meta_path.write_text(json.dumps(meta))
    loaded = load_head(tmp_path / "old")
    assert loaded.settings.ridge_shortcut is False
    np.testing.assert_array_equal(loaded.predict(data["val"]), old.predict(data["val"]))


def test_triplex_and_the_mlp_baseline_have_no_shortcut() -> None:
    from genedml.cv import ABLATIONS

    assert make_head("triplex").settings.ridge_shortcut is False
    assert ABLATIONS["mlp"]["ridge_shortcut"] is False and make_head("genedml").settings.ridge_shortcut is True
