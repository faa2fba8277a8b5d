"""Heads on synthetic features: switches, masks, PEG order, learning a known signal, determinism, save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from genedml.ablations import ABLATIONS
from genedml.errors import ConfigError, InputError
from genedml.heads.base import setting_names
from genedml.heads.registry import HEADS, accepted_settings, head_settings, load_head, make_head
from genedml.heads.batch import BatchMaker
from genedml.heads.features import SpotFeatures
from genedml.heads.gene_dml import SCALES, GeneDMLModel, GeneDMLSettings
from genedml.heads.layers import PEG, GlobalEncoder, NeighborEncoder
from genedml.heads.training import WeightAverage

# The paper's three scales (the default leaves out the neighbour scale), so every encoder is exercised.
SMALL = dict(dim=32, neighbor_depth=1, neighbor_heads=2, neighbor_mlp_ratio=2, global_depth=2, global_heads=2,
             global_mlp_ratio=2, groups=4, scales=("local", "neighbor", "global"))
TRAIN = dict(lr=2e-3, batch_size=64, epochs=25, patience=10, device="cpu", min_epoch_steps=1)
SETTINGS: dict[str, dict[str, Any]] = {
    "genedml": {**SMALL, **TRAIN},
    "triplex": {**SMALL, **TRAIN},
    "bleep": {"proj_dim": 32, **TRAIN},
    "ridge": {},
    "ridge-cv": {},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny matrices: one thread avoids the synchronisation cost that dominates on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(n_slides: int = 4, side: int = 10, dim: int = 16, genes: int = 8, seed: int = 0):
    """Spots on square grids; a smooth latent field drives features and, nonlinearly, expression.

    Y = tanh(latent at the spot · W1) + 0.7·tanh(mean latent of its 3x3 neighbourhood · W2): part of the signal
    is visible only through the neighbour tiles. Off-grid tiles are masked and hold large random junk.
    """
    rng = np.random.default_rng(seed)
    mix, w_local, w_nb = rng.normal(size=(4, dim)), rng.normal(size=(4, genes)), rng.normal(size=(4, genes))
    local, tiles, masks, ys, slides, grids = [], [], [], [], [], []
    offsets = np.arange(-2, 3)
    for s in range(n_slides):
        z = rng.normal(size=(side + 4, side + 4, 4))
        z = (z + np.roll(z, 1, 0) + np.roll(z, 1, 1)) / np.sqrt(3)
        feat = z @ mix + 0.3 * rng.normal(size=z.shape[:2] + (dim,))
        for r in range(side):
            for c in range(side):
                rr, cc = r + 2, c + 2
                block = feat[rr - 2 : rr + 3, cc - 2 : cc + 3].reshape(25, dim).copy()
                valid = ((0 <= r + offsets[:, None]) & (r + offsets[:, None] < side)
                         & (0 <= c + offsets[None, :]) & (c + offsets[None, :] < side)).ravel()
                block[~valid] = 5 * rng.normal(size=(int((~valid).sum()), dim))
                around = z[rr - 1 : rr + 2, cc - 1 : cc + 2].reshape(9, 4).mean(0)
                ys.append(np.tanh(z[rr, cc] @ w_local) + 0.7 * np.tanh(around @ w_nb))
                local.append(np.stack([feat[rr, cc], feat[rr, cc] + 0.1 * rng.normal(size=dim)]))
                tiles.append(block), masks.append(valid), slides.append(s), grids.append((c, r))
    local_arr = np.asarray(local, np.float32)
    n = len(ys)
    feats = SpotFeatures(
        local=local_arr,
        slide=np.asarray(slides),
        grid=np.asarray(grids),
        sample_ids=[f"slide{i}" for i in range(n_slides)],
        barcodes=np.array([f"spot{i}" for i in range(n)]),
        local_aug=(local_arr[:, None] + 0.05 * rng.normal(size=(n, 8) + local_arr.shape[1:])).astype(np.float32),
        neighbor=np.asarray(tiles, np.float32),
        neighbor_mask=np.asarray(masks),
    )
    return feats, np.asarray(ys, np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    feats, y = synthetic()
    train, val = np.flatnonzero(feats.slide < 3), np.flatnonzero(feats.slide == 3)
    return {"feats": feats, "y": y, "train": feats.take(train), "y_train": y[train],
            "val": feats.take(val), "y_val": y[val]}


def pcc(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over genes of np.corrcoef (independent of the package's own metric)."""
    return float(np.mean([np.corrcoef(pred[:, j], y[:, j])[0, 1] for j in range(y.shape[1])]))


@pytest.fixture(scope="module")
def fitted(data: dict[str, Any]) -> dict[str, Any]:
    heads = {}
    for name, settings in SETTINGS.items():
        head = make_head(name, settings)
        head.fit(data["train"], data["y_train"], data["val"], data["y_val"])
        heads[name] = head
    return heads


def one_batch_parts(settings: dict[str, Any], data: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Build a genedml model for `settings` and run one training batch with backward."""
    head = make_head("genedml", {**SMALL, **TRAIN, **settings})
    torch.manual_seed(0)
    head.model = head.build(data["train"].dim, data["y_train"].shape[1])
    head.model.train()
    batch = BatchMaker(data["train"], "cpu", head.needs_neighbor()).make(np.arange(40), torch.Generator().manual_seed(0))
    loss, parts = head.batch_loss(batch, torch.from_numpy(data["y_train"][:40]))
    loss.backward()
    return head.model, parts


# -------------------------------------------------------------------------------------------- switches


def test_full_model_has_every_loss_part_and_no_dead_parameters(data: dict[str, Any]) -> None:
    model, parts = one_batch_parts({}, data)
    assert {"regression", "instance", "group"} <= set(parts)
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize(
    "settings, absent_parts, absent_modules",
    [
        ({"instance": False}, {"instance"}, set()),
        ({"group": False}, {"group"}, {"cluster_head"}),
        ({"instance": False, "group": False}, {"instance", "group"}, {"cluster_head", "gene_encoder"}),
        ({"scales": ("local", "global")}, set(), {"neighbor_encoder"}),
        ({"scales": ("local", "neighbor")}, set(), {"global_encoder"}),
    ],
)
def test_ablation_switches_remove_terms_and_parameters(
    data: dict[str, Any], settings: dict, absent_parts: set, absent_modules: set
) -> None:
    model, parts = one_batch_parts(settings, data)
    assert not absent_parts & set(parts)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert not absent_modules & names
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []  # what remains is all trained


def test_instance_off_means_no_retrieval_embedding(data: dict[str, Any]) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 1, "instance": False})
    head.fit(data["train"], data["y_train"])
    assert head.embed_image(data["val"]) is None
    assert head.embed_genes(data["y_val"]) is not None  # the group pathway still has a gene encoder


def test_local_only_ignores_neighbour_and_global_inputs(data: dict[str, Any]) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 1, "scales": ("local",)})
    head.fit(data["train"], data["y_train"])
    val = data["val"]
    before = head.predict(val)
    val2 = val.take(np.arange(len(val)))
    val2.tiles = val.tiles + 1.0
    val2.slide_tokens = {k: v + 1.0 for k, v in val.slide_tokens.items()}
    np.testing.assert_array_equal(head.predict(val2), before)


def test_triplex_objective_has_distillation_and_no_contrastive_terms(data: dict[str, Any]) -> None:
    head = make_head("triplex", {**SMALL, **TRAIN, "epochs": 1})
    history = head.fit(data["train"], data["y_train"]).history_
    parts = set(history["epochs"][0])
    assert {"fusion", "branch", "distill"} <= parts and not {"instance", "group"} & parts
    assert head.embed_image(data["val"]) is None and head.embed_genes(data["y_val"]) is None


def test_group_pathway_runs_in_cld_form_with_k_above_batch(data: dict[str, Any]) -> None:
    _, parts = one_batch_parts({"group_form": "cld", "groups": 1000}, data)
    assert np.isfinite(parts["group"])


# ------------------------------------------------------------------------------------------- encoders


def test_peg_returns_tokens_in_input_order() -> None:
    gen = torch.Generator().manual_seed(0)
    cells = torch.randperm(49, generator=gen)[:30]
    grid = torch.stack([cells % 7, cells // 7], dim=1)
    tokens = torch.randn(30, 8, generator=gen)
    torch.manual_seed(0)
    peg, encoder = PEG(8), GlobalEncoder(8, depth=2, heads=2).eval()
    perm = torch.randperm(30, generator=gen)
    torch.testing.assert_close(peg(tokens[perm], grid[perm]), peg(tokens, grid)[perm])
    torch.testing.assert_close(encoder(tokens[perm], grid[perm]), encoder(tokens, grid)[perm])


def test_peg_mixes_only_grid_neighbours() -> None:
    grid = torch.tensor([[0, 0], [1, 0], [5, 5]])
    tokens = torch.randn(3, 4)
    peg = PEG(4)
    moved = tokens.clone()
    moved[2] += 10.0  # far away on the grid: must not change spots 0 and 1
    torch.testing.assert_close(peg(moved, grid)[:2], peg(tokens, grid)[:2])
    moved = tokens.clone()
    moved[1] += 10.0  # adjacent to spot 0
    assert not torch.allclose(peg(moved, grid)[0], peg(tokens, grid)[0])


def test_peg_rejects_pixel_coordinates() -> None:
    with pytest.raises(InputError, match="array"):
        PEG(2)(torch.randn(2, 2), torch.tensor([[0, 0], [9000, 9000]]))


def test_neighbour_mask_hides_masked_tiles() -> None:
    torch.manual_seed(0)
    enc = NeighborEncoder(8, depth=2, heads=2, mlp_ratio=2).eval()
    with torch.no_grad():
        enc.rel_bias.normal_()
    tiles = torch.randn(3, 25, 8)
    valid = torch.rand(3, 25) > 0.4
    valid[:, 12] = True
    changed = tiles.clone()
    changed[~valid] = torch.randn(int((~valid).sum()), 8) * 100
    out, out2 = enc(tiles, valid), enc(changed, valid)
    torch.testing.assert_close(out[valid], out2[valid])
    unmasked = enc(changed, torch.ones_like(valid))
    assert not torch.allclose(unmasked[valid], out[valid])  # the mask is what makes the difference
    assert torch.isfinite(enc(tiles, torch.zeros_like(valid))).all()  # all-masked rows stay finite


def test_neighbour_mask_hides_masked_tiles_in_full_model(fitted: dict, data: dict[str, Any]) -> None:
    val = data["val"]
    changed = val.take(np.arange(len(val)))
    masked_rows = np.unique(val.neighbor_index[~val.neighbor_mask])
    used_rows = np.unique(val.neighbor_index[val.neighbor_mask])
    only_masked = np.setdiff1d(masked_rows, used_rows)
    assert len(only_masked) > 0
    changed.tiles = val.tiles.copy()
    changed.tiles[only_masked] = -7.0  # tiles that only masked slots point at
    assert not np.array_equal(changed.tiles, val.tiles)
    np.testing.assert_allclose(fitted["genedml"].predict(changed), fitted["genedml"].predict(val), atol=1e-5)


def test_global_scale_sees_the_whole_slide_for_a_subset(fitted: dict, data: dict[str, Any]) -> None:
    val = data["val"]
    rows = np.arange(0, len(val), 7)
    np.testing.assert_allclose(fitted["genedml"].predict(val.take(rows)), fitted["genedml"].predict(val)[rows],
                               atol=1e-5)


def test_training_samples_one_dihedral_view_per_spot(data: dict[str, Any]) -> None:
    feats = data["train"]
    batch = BatchMaker(feats, "cpu").make(np.arange(50), torch.Generator().manual_seed(1))
    local = batch.local.numpy()
    views = [int(np.flatnonzero([np.array_equal(local[i], feats.local_aug[i, v]) for v in range(8)])[0])
             for i in range(50)]
    assert len(set(views)) > 3
    eval_batch = BatchMaker(feats, "cpu").make(np.arange(50))
    np.testing.assert_array_equal(eval_batch.local.numpy(), feats.local[:50])


def test_missing_neighbour_features_raise(data: dict[str, Any]) -> None:
    feats = data["train"].take(np.arange(10))
    feats.tiles = feats.neighbor_index = None
    with pytest.raises(InputError, match="neighbour"):
        make_head("genedml", {**SMALL, **TRAIN, "epochs": 1}).fit(feats, data["y_train"][:10])


def test_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="neighbour_depth"):
        make_head("genedml", {"neighbour_depth": 2})
    with pytest.raises(ConfigError, match="unknown head"):
        make_head("nope")


def test_accepted_settings_match_the_shared_flag_names() -> None:
    assert {"scales", "instance", "group", "groups", "lambda_group", "tau", "tau_group", "group_form",
            "epochs", "patience", "batch_size", "lr", "seed"} <= accepted_settings("genedml")
    assert "tau" not in accepted_settings("bleep") and "temperature" in accepted_settings("bleep")
    assert {"alpha", "seed"} <= accepted_settings("ridge") and "epochs" not in accepted_settings("ridge")


# ----------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", ["genedml", "triplex", "ridge", "ridge-cv", "bleep"])
def test_heads_learn_nonlinear_synthetic_signal(fitted: dict, data: dict[str, Any], name: str) -> None:
    assert pcc(fitted[name].predict(data["val"]), data["y_val"]) > 0.5


def test_shuffled_targets_control_stays_near_zero(data: dict[str, Any]) -> None:
    shuffled = data["y_train"][np.random.default_rng(3).permutation(len(data["y_train"]))]
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 10})
    head.fit(data["train"], shuffled)  # no validation: nothing to select a lucky epoch with
    # Chance spread on 100 spots x 8 correlated genes is about ±0.2; real learning gives > 0.8.
    assert abs(pcc(head.predict(data["val"]), data["y_val"])) < 0.35


def test_weight_average_is_the_running_mean_and_training_weights_come_back() -> None:
    model = torch.nn.Linear(2, 1)
    average, seen = WeightAverage(), []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(value)
        with average.swapped_in(model):
            assert torch.allclose(model.weight, torch.full_like(model.weight, np.mean(seen)))
        assert torch.equal(model.weight, torch.full_like(model.weight, value))  # training goes on from its own weights


@pytest.mark.parametrize("average", [True, False])
def test_fit_keeps_the_mean_of_the_epoch_end_weights(data: dict[str, Any], average: bool) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 3, "average_weights": average})
    ends: list[list[torch.Tensor]] = []
    head.fit(data["train"], data["y_train"], progress=lambda *_: ends.append([p.detach().clone() for p in head.model.parameters()]))
    expected = [torch.stack(ps).mean(0) for ps in zip(*ends)] if average else ends[-1]
    kept = list(head.model.parameters())
    assert all(torch.allclose(k, e, atol=1e-6) for k, e in zip(kept, expected, strict=True))
    assert not all(torch.allclose(k, e, atol=1e-6) for k, e in zip(kept, ends[0 if not average else -1], strict=True))


def test_average_weights_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="average_weights"):
        make_head("genedml", {"average_weights": "yes"})


def test_history_and_progress(data: dict[str, Any]) -> None:
    calls = []
    head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 2})
    history = head.fit(data["train"], data["y_train"], data["val"], data["y_val"],
                       progress=lambda e, parts, p: calls.append((e, set(parts), p))).history_
    assert [c[0] for c in calls] == [0, 1] and {"loss", "regression", "instance", "group"} <= calls[0][1]
    assert history["best_epoch"] in (0, 1) and history["seconds"] > 0
    assert history["best_val_pcc"] == max(c[2] for c in calls)


def test_embeddings_are_unit_norm(fitted: dict, data: dict[str, Any]) -> None:
    for name in ("genedml", "bleep"):
        img, genes = fitted[name].embed_image(data["val"]), fitted[name].embed_genes(data["y_val"])
        assert img.shape == genes.shape == (len(data["val"]), img.shape[1])
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(genes, axis=1), 1.0, rtol=1e-5)
    u = fitted["genedml"].cluster_space(data["val"])
    v = fitted["genedml"].cluster_space(data["y_val"])
    assert u.shape == v.shape and fitted["ridge"].embed_image(data["val"]) is None


def test_ridge_matches_sklearn_pipeline(fitted: dict, data: dict[str, Any]) -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = data["train"].local[:, 0].astype(np.float64)
    n_comp = min(256, *x.shape)
    alpha = 100 / (n_comp * data["y_train"].shape[1])
    pipe = make_pipeline(StandardScaler(), PCA(n_comp, svd_solver="full"), Ridge(alpha=alpha))
    pipe.fit(x, data["y_train"])
    expected = pipe.predict(data["val"].local[:, 0].astype(np.float64))
    np.testing.assert_allclose(fitted["ridge"].predict(data["val"]), expected, rtol=1e-4, atol=1e-4)
    assert fitted["ridge"].history_["alpha"] == pytest.approx(alpha)
    # HEST's probe (no intercept) differs only by the training mean: the same PCC, centred predictions.
    hest = make_head("ridge", {"fit_intercept": False}).fit(data["train"], data["y_train"])
    shift = fitted["ridge"].predict(data["val"]) - hest.predict(data["val"])
    np.testing.assert_allclose(shift, np.broadcast_to(data["y_train"].mean(0), shift.shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ridge", "ridge-cv"])
def test_ridge_predictions_are_at_the_level_of_the_targets(name: str) -> None:
    """0.2 wrote ridge predictions centred on 0 (no intercept) while the targets sit at log1p ≈ 3: MSE 10×."""
    feats, y = synthetic()
    y = y + 3.0
    head = make_head(name, {}).fit(feats, y)
    pred = head.predict(feats)
    assert abs(pred.mean() - y.mean()) < 0.05 * abs(y.mean())
    assert ((pred - y) ** 2).mean() < ((y - y.mean(0)) ** 2).mean()  # better than the training mean


def test_ridge_cv_tunes_alpha_over_slides(fitted: dict) -> None:
    history = fitted["ridge-cv"].history_
    assert history["cv"].startswith("GroupKFold(3)")
    assert history["alpha"] == history["cv_alphas"][int(np.argmax(history["cv_pcc"]))]


# --------------------------------------------------------------------------------- reproducibility


def test_fit_twice_gives_identical_predictions(data: dict[str, Any]) -> None:
    preds = []
    for _ in range(2):
        head = make_head("genedml", {**SMALL, **TRAIN, "epochs": 3})
        head.fit(data["train"], data["y_train"], data["val"], data["y_val"])
        preds.append(head.predict(data["val"]))
    np.testing.assert_array_equal(preds[0], preds[1])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_save_load_gives_identical_predictions(fitted: dict, data: dict[str, Any], name: str, tmp_path: Path) -> None:
    head = fitted[name]
    head.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "model.safetensors"]
    for loaded in (HEADS[name].load(tmp_path), load_head(tmp_path)):
        assert type(loaded) is type(head) and loaded.config() == head.config()
        np.testing.assert_array_equal(loaded.predict(data["val"]), head.predict(data["val"]))
    assert make_head(name, head.config()).config() == head.config()


def test_encoder_dim_projects_before_the_scale_encoders(data: dict[str, Any]) -> None:
    model, parts = one_batch_parts({"encoder_dim": 4}, data)
    assert model.input_proj.weight.shape == (4, data["train"].dim)
    assert model.neighbor_encoder.norm.normalized_shape == (4,) and model.global_encoder.norm.normalized_shape == (4,)
    assert model.fc.in_features == 4 and {"regression", "instance", "group"} <= set(parts)
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    narrow, _ = one_batch_parts({}, data)  # default cap 128 > D = 16: the encoders at the backbone width
    assert not any(name.startswith("input_proj") for name in narrow.state_dict())
    for bad in (-1, 1.5, True, 3):  # 3: not divisible by the 2 heads of SMALL
        with pytest.raises(ConfigError, match="encoder_dim"):
            make_head("genedml", {**SMALL, "encoder_dim": bad})


def test_the_long_fit_warning_suggests_only_the_cpu_sizes_not_in_use(caplog: pytest.LogCaptureFixture) -> None:
    from genedml.heads.training import CPU_SIZES

    with caplog.at_level("WARNING", logger="genedml"):
        make_head("genedml", {})._warn_if_long(60.0, torch.device("cpu"))
    assert "--head-option dim=128" in caplog.text and "global_depth=2" in caplog.text
    assert "neighbor_" not in caplog.text  # the default head has no neighbour encoder to shrink
    caplog.clear()
    with caplog.at_level("WARNING", logger="genedml"):
        make_head("genedml", {"scales": ["local", "neighbor", "global"]})._warn_if_long(60.0, torch.device("cpu"))
    assert "neighbor_depth=1" in caplog.text and "global_depth=2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="genedml"):
        make_head("genedml", {"scales": ["local"]})._warn_if_long(60.0, torch.device("cpu"))  # the cv MLP row
    assert "--head-option dim=128." in caplog.text and "global_" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="genedml"):
        make_head("genedml", CPU_SIZES)._warn_if_long(60.0, torch.device("cpu"))
    assert "may take up to" in caplog.text and "--head-option" not in caplog.text  # 0.2 repeated the sizes in use


@pytest.mark.parametrize("instance_weight, lambda_group", [(1.0, 0.8), (0.25, 0.2), (0.0, 0.0)])
def test_loss_is_regression_plus_weighted_contrastive_terms(data: dict[str, Any], instance_weight: float, lambda_group: float) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "instance_weight": instance_weight, "lambda_group": lambda_group})
    torch.manual_seed(0)
    model = head.build(data["train"].dim, data["y_train"].shape[1])
    model.eval()  # no dropout: the two forward passes below see the same network
    batch = BatchMaker(data["train"], "cpu", True).make(np.arange(40), torch.Generator().manual_seed(0))
    y = torch.from_numpy(data["y_train"][:40])
    out = model(batch, y)
    total, parts = model.loss(out, y)
    expected = parts["regression"] + instance_weight * parts["instance"] + lambda_group * parts["group"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)


def test_default_contrastive_weights_are_0_1_and_cv_rows_restore_the_papers() -> None:
    model = GeneDMLModel(GeneDMLSettings(**SMALL), in_dim=64, n_genes=8)
    assert model.term_weights() == {"group": 0.1, "instance": 0.1}  # a named deviation (the paper: λ 0.8, instance 1)
    paper = head_settings("genedml", ABLATIONS["paper-loss-weights"].overrides)
    assert GeneDMLModel(paper, in_dim=64, n_genes=8).term_weights() == {"group": 0.8}  # the paper's instance term has no ×1 node


def test_the_paper_scales_row_spells_out_every_scale_of_the_head() -> None:
    # genedml.ablations lists the scales by name (it must not import torch); drift would drop or misname a scale.
    assert tuple(ABLATIONS["paper-scales"].overrides["scales"]) == SCALES


def test_the_authors_cv_row_undoes_every_named_deviation() -> None:
    authors = head_settings("genedml", ABLATIONS["authors"].overrides)
    assert authors.scales == ("local", "neighbor", "global") and authors.encoder_dim == 0
    assert authors.input_dropout == 0 and authors.instance_weight == 1.0 and authors.lambda_group == 0.8
    assert authors.average_weights is False
    default = head_settings("genedml")
    # Every other setting is the default's: the row differs from the default in the named deviations only.
    changed = {k for k in setting_names(type(default)) if getattr(default, k) != getattr(authors, k)}
    assert changed == {"scales", "encoder_dim", "input_dropout", "instance_weight", "lambda_group", "average_weights"}


@pytest.mark.parametrize("bad", [{"instance_weight": -0.1}, {"lambda_group": -1}, {"instance_weight": "x"}, {"lambda_group": True}])
def test_negative_or_non_numeric_term_weights_are_refused(bad: dict[str, Any]) -> None:
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=rf"{name} (must be a number >= 0|of the genedml head takes a number)"):
        make_head("genedml", {**SMALL, **bad})


def test_default_genedml_leaves_out_the_neighbour_scale_and_triplex_keeps_it(data: dict[str, Any]) -> None:
    head = make_head("genedml", {k: v for k, v in {**SMALL, **TRAIN, "epochs": 1}.items() if k != "scales"})
    assert head.settings.scales == ("local", "global") and not head.needs_neighbor()
    feats = data["train"].take(np.arange(60))
    feats.tiles = feats.neighbor_index = feats.neighbor_mask = None  # a cache extracted with --scales local
    head.fit(feats, data["y_train"][:60])
    assert head.predict(feats).shape == (60, data["y_train"].shape[1])
    assert make_head("triplex").settings.scales == ("local", "neighbor", "global")


def test_default_encoder_width_is_capped_at_128_and_zero_keeps_the_backbone_width() -> None:
    wide = GeneDMLModel(GeneDMLSettings(**SMALL), in_dim=512, n_genes=8)
    assert wide.input_proj.weight.shape == (128, 512) and wide.global_encoder.norm.normalized_shape == (128,)
    assert isinstance(GeneDMLModel(GeneDMLSettings(**SMALL), in_dim=96, n_genes=8).input_proj, torch.nn.Identity)
    reference = GeneDMLModel(GeneDMLSettings(**SMALL, encoder_dim=0), in_dim=512, n_genes=8)  # the authors' width
    assert isinstance(reference.input_proj, torch.nn.Identity) and reference.global_encoder.norm.normalized_shape == (512,)
    assert make_head("triplex").settings.encoder_dim == make_head("genedml").settings.encoder_dim == 128
    # The MLP baseline stays the plain local MLP at the backbone width; cv's full-width row is the authors' width.
    assert ABLATIONS["mlp"].overrides["encoder_dim"] == 0 and ABLATIONS["full-width"].overrides == {"encoder_dim": 0}


def test_an_encoder_width_the_heads_do_not_divide_is_a_config_error_before_training() -> None:
    settings = GeneDMLSettings(**{**SMALL, "global_heads": 4})  # the cap 128 divides, a 30-d backbone does not
    with pytest.raises(ConfigError, match="width 30 .* not divisible by global_heads 4"):
        GeneDMLModel(settings, in_dim=30, n_genes=8)


def test_input_dropout_drops_backbone_features_of_every_scale_in_training_only(data: dict[str, Any]) -> None:
    head = make_head("genedml", {**SMALL, **TRAIN, "input_dropout": 0.5})
    torch.manual_seed(0)
    model = head.build(data["train"].dim, data["y_train"].shape[1])
    plain = make_head("genedml", {**SMALL, **TRAIN}).build(data["train"].dim, data["y_train"].shape[1])
    assert model.state_dict().keys() == plain.state_dict().keys()  # models saved without the option still load
    seen: list[torch.Tensor] = []
    model.input_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    batch = BatchMaker(data["train"], "cpu", True).make(np.arange(40), torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        first, second = model(batch)["pred"], model(batch)["pred"]
    torch.testing.assert_close(first, second)  # no dropout in eval
    originals = seen[:3]
    seen.clear()
    model.train()
    model(batch)
    assert len(seen) == 3  # local tokens, neighbour tiles and the global scale's slide tokens
    for original, dropped in zip(originals, seen):
        kept = original != 0  # masked neighbour tiles are zero already
        zero = float((dropped[kept] == 0).float().mean())
        assert 0.4 < zero < 0.6, zero
        survivors = dropped != 0
        torch.testing.assert_close(dropped[survivors], 2 * original[survivors])


@pytest.mark.parametrize("bad", [1.0, -0.1, "often", True])
def test_input_dropout_outside_zero_to_one_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match="input_dropout"):
        make_head("genedml", {"input_dropout": bad})


def test_auto_input_dropout_drops_only_wide_backbone_features() -> None:
    from genedml.heads.gene_dml import AUTO_INPUT_DROPOUT, AUTO_INPUT_DROPOUT_MIN_WIDTH

    cfg = GeneDMLSettings(**SMALL)
    assert cfg.input_dropout == "auto"
    wide = GeneDMLModel(cfg, AUTO_INPUT_DROPOUT_MIN_WIDTH, 8)
    narrow = GeneDMLModel(cfg, AUTO_INPUT_DROPOUT_MIN_WIDTH - 1, 8)
    assert wide.input_dropout.p == AUTO_INPUT_DROPOUT > 0 and narrow.input_dropout.p == 0
    assert GeneDMLModel(GeneDMLSettings(**SMALL, input_dropout=0), 512, 8).input_dropout.p == 0


def test_fit_says_when_auto_input_dropout_is_on(caplog: pytest.LogCaptureFixture) -> None:
    from genedml.heads.gene_dml import AUTO_INPUT_DROPOUT_MIN_WIDTH

    for dim, said in ((AUTO_INPUT_DROPOUT_MIN_WIDTH, True), (16, False)):
        feats, y = synthetic(n_slides=2, side=4, dim=dim)
        caplog.clear()
        with caplog.at_level("INFO", logger="genedml"):
            make_head("genedml", {**SMALL, **TRAIN, "epochs": 1}).fit(feats, y)
        assert ("input dropout 0.7" in caplog.text) == said, caplog.text
