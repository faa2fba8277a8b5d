"""Local-token layouts of the cache: every patch token (`all`) and the weights of compact layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.data.synthetic import make_synthetic_sample
from genedml.errors import CacheMismatchError, InputError
from genedml.extract.runner import ExtractSettings, local_token_weights, run_extraction
from genedml.heads.registry import make_head
from genedml.spots import load_spot_features


@pytest.fixture(scope="module")
def tiny_vit():
    return load_backbone("tiny-vit", random_init=True)


@pytest.fixture(scope="module")
def sample():
    return make_synthetic_sample("S0", grid=(4, 4), seed=3, n_genes=10)


def test_weights_count_the_backbone_tokens_each_cached_token_stands_for() -> None:
    assert local_token_weights(0, 196) == [197.0]
    assert local_token_weights(-1, 196) == [1.0] * 197
    assert local_token_weights(4, 196) == [1.0] + [9.0, 12.0, 9.0, 12.0, 12.0, 16.0, 12.0, 16.0] * 2  # 3/4/3/4 bands
    assert local_token_weights(2, 196) == [1.0] + [49.0] * 4
    assert local_token_weights(2, None) is None  # no token map (he-stats)
    for grid in (0, 2, 4, -1):  # every layout stands for the same 197 tokens
        assert sum(local_token_weights(grid, 196)) == pytest.approx(197.0)


def test_all_layout_caches_every_patch_token_and_pooled_grids_are_their_means(tmp_path, tiny_vit, sample) -> None:
    base = dict(dtype="float32", scales=("local",))
    run_extraction([sample], tiny_vit, tmp_path / "all", ExtractSettings(local_tokens="all", **base))
    run_extraction([sample], tiny_vit, tmp_path / "2x2", ExtractSettings(local_tokens="2x2", **base))
    full = load_spot_features(FeatureCache(tmp_path / "all"), ["S0"])
    grid = load_spot_features(FeatureCache(tmp_path / "2x2"), ["S0"])
    n = tiny_vit.native_tokens
    side = int(round(np.sqrt(n)))
    assert full.local.shape[1] == 1 + n and side * side == n
    np.testing.assert_allclose(full.local[:, 0], grid.local[:, 0], rtol=1e-4, atol=1e-5)  # same pooled token
    patches = full.local[:, 1:].reshape(len(full), side, side, -1)
    half = side // 2
    top_left = patches[:, :half, :half].reshape(len(full), -1, full.dim).mean(1)
    np.testing.assert_allclose(grid.local[:, 1], top_left, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(full.token_weights, np.ones(1 + n, np.float32))
    np.testing.assert_allclose(grid.token_weights, [1.0] + [n / 4] * 4)


def test_4x4_cells_of_a_14x14_map_weighted_by_their_size_average_to_the_patch_mean(tmp_path, tiny_vit, sample) -> None:
    # 0.3's adaptive pooling overlapped cells on a 14 x 14 map and weighted each 12.25: ≈ 2 % off the patch mean.
    base = dict(dtype="float32", scales=("local",))
    run_extraction([sample], tiny_vit, tmp_path / "all", ExtractSettings(local_tokens="all", **base))
    run_extraction([sample], tiny_vit, tmp_path / "4x4", ExtractSettings(local_tokens="4x4", **base))
    full = load_spot_features(FeatureCache(tmp_path / "all"), ["S0"])
    grid = load_spot_features(FeatureCache(tmp_path / "4x4"), ["S0"])
    weights = grid.token_weights[1:]
    assert weights.sum() == tiny_vit.native_tokens == 196
    weighted = (grid.local[:, 1:] * weights[:, None]).sum(1) / weights.sum()
    np.testing.assert_allclose(weighted, full.local[:, 1:].mean(1), rtol=1e-4, atol=1e-5)
    assert FeatureCache(tmp_path / "4x4").settings["cell_pooling"] == "partition"
    assert "cell_pooling" not in FeatureCache(tmp_path / "all").settings


def test_a_grid_cache_with_the_overlapping_cells_of_0_3_is_not_resumed(tmp_path, tiny_vit, sample) -> None:
    settings = ExtractSettings(local_tokens="4x4", dtype="float32", scales=("local",))
    old = {k: v for k, v in settings.cache_settings(tiny_vit.provenance()).items() if k != "cell_pooling"}
    FeatureCache(tmp_path / "c", old)  # what 0.3 wrote
    with pytest.raises(CacheMismatchError, match="cell_pooling"):
        run_extraction([sample], tiny_vit, tmp_path / "c", settings)


def test_all_layout_needs_a_token_map(tmp_path, sample) -> None:
    stats = load_backbone("he-stats", random_init=True)
    with pytest.raises(InputError, match="all"):
        run_extraction([sample], stats, tmp_path / "c", ExtractSettings(local_tokens="all", scales=("local",)))


def test_weighted_and_unweighted_heads_differ_only_through_the_weights(tmp_path, tiny_vit, sample) -> None:
    run_extraction([sample], tiny_vit, tmp_path / "c", ExtractSettings(local_tokens="2x2", scales=("local",), dtype="float32"))
    feats = load_spot_features(FeatureCache(tmp_path / "c"), ["S0"])
    y = np.random.default_rng(0).normal(size=(len(feats), 3)).astype(np.float32)
    small = {"dim": 16, "groups": 2, "scales": ["local", "global"], "global_depth": 1, "global_heads": 2, "epochs": 1,
             "min_epoch_steps": 1, "batch_size": 8, "device": "cpu"}
    preds = []
    for weighting in (True, False):
        torch.manual_seed(0)
        head = make_head("genedml", {**small, "local_token_weighting": weighting}).fit(feats, y)
        preds.append(head.predict(feats))
    assert not np.allclose(preds[0], preds[1])
