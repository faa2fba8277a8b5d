"""Training sets larger than memory: features streamed from the cache give the model an in-memory fit gives,
and every token type is standardised with its own statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.data.synthetic import make_synthetic_sample
from genedml.errors import ConfigError, InputError
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model, parse_bytes
from genedml.heads import load_head
from genedml.heads.base import WEIGHTS
from genedml.heads.batch import BatchMaker
from genedml.heads.features import StreamedSpots, slide_parts
from genedml.heads.gene_dml import GeneDMLHead, GeneDMLSettings
from genedml.heads.scaling import Moments, token_moments
from genedml.spots import feature_bytes, load_spot_features, stream_spot_features

# All three scales (the default leaves out the neighbour scale), so streamed neighbour tiles are covered too.
TINY = dict(dim=16, neighbor_depth=1, neighbor_heads=2, global_depth=2, global_heads=2, neighbor_mlp_ratio=1.0,
            global_mlp_ratio=1.0, groups=3, batch_size=8, eval_batch_size=16, epochs=2, min_epoch_steps=4,
            scales=("local", "neighbor", "global"))


@pytest.fixture(scope="module")
def samples():
    return [make_synthetic_sample(f"S{i}", grid=(5, 6), seed=i, n_genes=12) for i in range(3)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("stream") / "cache"
    run_extraction(samples, load_backbone("tiny-cnn", random_init=True), root, ExtractSettings(augment="dihedral", local_tokens="2x2"))
    return FeatureCache(root)


def _targets(n: int, genes: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, genes)).astype(np.float32)


@pytest.mark.parametrize("batch_slides", [1, 2])
def test_a_streamed_fit_equals_an_in_memory_fit(cache, batch_slides: int) -> None:
    ids = cache.samples()
    memory, streamed = load_spot_features(cache, ids), stream_spot_features(cache, ids)
    assert isinstance(streamed, StreamedSpots) and len(streamed) == len(memory)
    assert (streamed.barcodes == memory.barcodes).all() and (streamed.slide == memory.slide).all()
    y = _targets(len(memory))
    settings = GeneDMLSettings(**TINY, batch_slides=batch_slides)
    a = GeneDMLHead(settings).fit(memory, y)
    b = GeneDMLHead(settings).fit(streamed, y)
    assert [e["loss"] for e in a.history_["epochs"]] == [e["loss"] for e in b.history_["epochs"]]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    np.testing.assert_allclose(a.predict(memory), b.predict(streamed), rtol=1e-5, atol=1e-5)


def test_streaming_needs_slide_aware_batches(cache) -> None:
    streamed = stream_spot_features(cache, cache.samples())
    with pytest.raises(ConfigError, match="batch_slides"):
        GeneDMLHead(GeneDMLSettings(**TINY)).fit(streamed, _targets(len(streamed)))


def test_a_stream_reads_one_slide_group_at_a_time(cache) -> None:
    streamed = stream_spot_features(cache, cache.samples())
    reads: list[list[int]] = []
    inner = streamed.read
    streamed.read = lambda slides: (reads.append(list(slides)), inner(slides))[1]  # type: ignore[method-assign]
    GeneDMLHead(GeneDMLSettings(**{**TINY, "epochs": 1, "min_epoch_steps": 1}, batch_slides=1)).fit(streamed, _targets(len(streamed)))
    train_reads = reads[len(cache.samples()):]  # the first pass reads each slide once for the statistics
    assert all(len(r) == 1 for r in reads)
    assert sorted(s for r in train_reads for s in r) == list(range(len(cache.samples())))


def test_moments_chunked_and_merged_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((70_000, 3)) * [1.0, 50.0, 1e-3] + [5.0, -2.0, 0.0]).astype(np.float32)
    whole, parts = Moments(3), Moments(3)
    whole.add(x)
    for chunk in np.array_split(x, 7):
        parts.add(chunk)
    for m in (whole, parts):
        mean, std = m.mean_std()
        np.testing.assert_allclose(mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(std.numpy(), x.astype(np.float64).std(0, ddof=1), rtol=1e-6)


def test_each_token_type_is_standardised_with_its_own_statistics(cache) -> None:
    feats = load_spot_features(cache, cache.samples())
    assert feats.local.shape[1] == 5  # CLS + a 2 x 2 grid
    moments = token_moments(part for _, part in slide_parts(feats))
    assert set(moments) == {"pooled", "patch", "tile"}
    head = GeneDMLHead(GeneDMLSettings(**TINY))
    head.model = head._with_scaler(head.build(feats.dim, 12), feats)
    maker = BatchMaker(feats, "cpu", True, head._scaler())
    batch = maker.make(np.arange(len(feats)))
    np.testing.assert_allclose(batch.local[:, 0].mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(batch.local[:, 1:].reshape(-1, feats.dim).mean(0).numpy(), 0, atol=1e-4)
    std = batch.local[:, 1:].reshape(-1, feats.dim).std(0).numpy()
    live = np.asarray(feats.local[:, 1:], np.float32).reshape(-1, feats.dim).std(0) > 0  # ReLU leaves dead dims
    assert live.sum() > feats.dim // 2
    np.testing.assert_allclose(std[live], 1, atol=1e-3)
    # The patch statistics differ from the pooled ones (the old single scaler standardised patches wrongly).
    assert not torch.allclose(head.model.patch_mean, head.model.input_mean)
    assert not torch.allclose(head.model.tile_std, head.model.input_std)


def test_a_model_saved_with_one_scaler_loads_with_it_for_every_token_type(cache, tmp_path) -> None:
    feats = load_spot_features(cache, cache.samples())
    head = GeneDMLHead(GeneDMLSettings(**{**TINY, "epochs": 1})).fit(feats, _targets(len(feats)))
    head.save(tmp_path / "head")
    # As 0.2.0 saved it: only input_mean/input_std.
    state = {k: v for k, v in load_file(str(tmp_path / "head" / WEIGHTS)).items()
             if not k.startswith(("patch_", "tile_"))}
    save_file(state, str(tmp_path / "head" / WEIGHTS))
    old = load_head(tmp_path / "head")
    assert torch.equal(old.model.patch_mean, state["input_mean"]) and torch.equal(old.model.tile_std, state["input_std"])


def test_parse_bytes() -> None:
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2.5G") == 2_500_000_000
    assert parse_bytes(1000) == 1000 and parse_bytes(None) is None
    for bad in ("lots", "-1GB", "0", "8 XB", 0):
        with pytest.raises(ConfigError, match="--max-memory"):
            parse_bytes(bad)


def test_fit_streams_over_max_memory_and_says_so(cache, samples, tmp_path, caplog) -> None:
    ids = cache.samples()
    need = feature_bytes(cache, ids)
    by_id = {s.sample_id: s for s in samples}
    head = {**TINY, "epochs": 1}
    settings = FitSettings(model="genedml", genes=8, val_samples=[ids[-1]], max_memory=need // 2, head=head)
    with caplog.at_level("INFO", logger="genedml"):
        result = fit_model(cache, None, tmp_path / "streamed", settings, samples=by_id)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["features_streamed"] is True and config["head_config"]["batch_slides"] == 1
    assert "over --max-memory" in caplog.text and "batch_slides 0" in caplog.text
    in_memory = fit_model(cache, None, tmp_path / "memory", FitSettings(model="genedml", genes=8, val_samples=[ids[-1]],
                          max_memory=need * 2, head={**head, "batch_slides": 1}), samples=by_id)
    assert json.loads((in_memory.model_dir / "config.json").read_text())["features_streamed"] is False
    assert result.history["epochs"][0]["loss"] == in_memory.history["epochs"][0]["loss"]
    with pytest.raises(InputError, match="needs them all in memory"):
        fit_model(cache, None, tmp_path / "ridge", FitSettings(model="ridge", genes=8, max_memory=need // 2), samples=by_id)


def test_a_long_epoch_reports_its_steps(cache, caplog, monkeypatch) -> None:
    import genedml.heads.training as training

    monkeypatch.setattr(training, "STEP_REPORT_SECONDS", 0.0)
    feats = load_spot_features(cache, cache.samples())
    with caplog.at_level("INFO", logger="genedml"):
        GeneDMLHead(GeneDMLSettings(**{**TINY, "epochs": 1})).fit(feats, _targets(len(feats)))
    lines = [r.getMessage() for r in caplog.records if "of this epoch" in r.getMessage()]
    assert lines and lines[-1].startswith("genedml: step ") and "/" in lines[-1]
    done, expected = lines[-1].split("step ")[1].split(" of")[0].split("/")
    assert done == expected  # the count announced is the count taken


def test_a_head_without_patch_tokens_or_neighbours_saves_and_loads(tmp_path, samples) -> None:
    """0.3's first cut shared one tensor between the missing types' statistics: safetensors refused to save."""
    root = tmp_path / "cache"
    run_extraction(samples, load_backbone("tiny-cnn", random_init=True), root, ExtractSettings(scales=("local",)))
    feats = load_spot_features(FeatureCache(root), FeatureCache(root).samples())
    assert feats.local.shape[1] == 1 and not feats.has_neighbor
    head = GeneDMLHead(GeneDMLSettings(**{**TINY, "epochs": 1, "scales": ("local",)})).fit(feats, _targets(len(feats)))
    head.save(tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    assert torch.equal(loaded.model.tile_mean, head.model.input_mean)
    np.testing.assert_allclose(loaded.predict(feats), head.predict(feats), rtol=1e-6, atol=1e-6)
