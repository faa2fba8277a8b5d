"""Features stay compact until the batch: gathered neighbour tokens equal the materialised ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.data.synthetic import make_synthetic_sample
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.heads.batch import BatchMaker
from genedml.heads.training import batch_order
from genedml.spots import load_spot_features


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact") / "cache"
    samples = [make_synthetic_sample(f"S{i}", grid=(5, 6), seed=i, n_genes=8) for i in range(2)]
    run_extraction(samples, load_backbone("tiny-cnn", random_init=True), root, ExtractSettings(augment="dihedral"))
    return FeatureCache(root)


def _materialised(cache: FeatureCache, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """What 0.1 held in memory: every spot's 25 tiles, float32, zero where off the image."""
    arrays = cache.read(sample_id).arrays
    mask = arrays["neighbor_mask"].astype(bool)
    tiles = arrays["lattice"][np.clip(arrays["neighbor_index"], 0, None)].astype(np.float32)
    tiles[~mask] = 0
    return tiles, mask


def test_gathered_neighbour_tokens_equal_the_materialised_ones(cache) -> None:
    feats = load_spot_features(cache, ["S0", "S1"])
    assert feats.tiles.dtype == np.float16 and feats.local_aug.dtype == np.float16  # the cache's dtype
    assert len(feats.tiles) < 10 * len(feats)  # tiles stored once, not 25 per spot
    expected = np.concatenate([_materialised(cache, s)[0] for s in ("S0", "S1")])
    mask = np.concatenate([_materialised(cache, s)[1] for s in ("S0", "S1")])
    rows = np.random.default_rng(0).permutation(len(feats))[:17]
    batch = BatchMaker(feats, "cpu", need_neighbor=True).make(rows)
    np.testing.assert_array_equal(batch.neighbor.numpy(), expected[rows])  # bit for bit, float16 -> float32
    np.testing.assert_array_equal(batch.neighbor_mask.numpy(), mask[rows])


def test_local_is_view_zero_of_the_dihedral_views(cache) -> None:
    feats = load_spot_features(cache, ["S0", "S1"])
    stored = np.concatenate([cache.read(s).arrays["local"] for s in ("S0", "S1")])
    np.testing.assert_array_equal(feats.local, stored)
    without = load_spot_features(cache, ["S0", "S1"], with_aug=False)
    assert without.local_aug is None
    np.testing.assert_array_equal(without.local, stored)


@pytest.mark.parametrize("batch_slides", [0, 1, 2])
def test_every_spot_once_per_pass(batch_slides: int) -> None:
    slide = np.repeat(np.arange(5), [7, 30, 3, 12, 9])
    batches = batch_order(slide, 8, batch_slides, torch.Generator().manual_seed(0))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(slide)))
    assert all(len(b) <= 8 for b in batches)
    if batch_slides:
        assert all(len(np.unique(slide[b])) <= batch_slides for b in batches)
