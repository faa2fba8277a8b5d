"""Backbone registry, weight resolution and the encode API, with tiny / random-init / statistics backbones only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from genedml.backbones import get_spec, list_specs, load_backbone
from genedml.backbones import registry as registry_module
from genedml.backbones.doctor import backbone_rows, environment_report
from genedml.backbones.registry import BackboneSpec
from genedml.backbones.stats import HE_STATS_FEATURES, HEStats
from genedml.backbones.timm_encoder import TimmEncoder
from genedml.errors import (
    GenedmlError,
    MissingWeightsError,
    UnknownBackboneError,
    WeightsMismatchError,
)

TINY_VIT_KWARGS = {"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}
# Published checkpoint tensor shapes (timm layout) that pin each big spec's kwargs to the real model.
KNOWN_SHAPES = {
    "uni": {"pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024)},
    "uni2-h": {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536),
               "blocks.0.mlp.fc2.weight": (1536, 4096)},
    "virchow2": {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280),
                 "blocks.0.mlp.fc2.weight": (1280, 3416)},
    "hoptimus0": {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536)},
    "hoptimus1": {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536)},
    "gigapath": {"pos_embed": (1, 197, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536),
                 "patch_embed.proj.weight": (1536, 3, 16, 16)},
    "resnet50-trunc": {"layer3.5.conv3.weight": (1024, 256, 1, 1)},
}


def patches(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny-vit state dict with weights drawn from `seed` (distinct files are distinguishable)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.clone() for k, v in TimmEncoder(get_spec("tiny-vit")).model.state_dict().items()}


@pytest.fixture
def hub_spec(monkeypatch: pytest.MonkeyPatch) -> BackboneSpec:
    """A tiny ViT registered like a real backbone: needs weights, has a hub id for the cache lookup."""
    spec = BackboneSpec("test-hub-vit", "vit_tiny_patch16_224", TINY_VIT_KWARGS, dim=64, precision="fp32",
                        hub_id="genedml-test/tiny-vit")
    monkeypatch.setitem(registry_module._REGISTRY, spec.name, spec)
    return spec


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No weights dir and an empty HF cache, so only what a test puts there can be found."""
    monkeypatch.delenv("GENEDML_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay out a warm HF cache entry (refs/main → snapshot) as huggingface_hub writes it."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def weights_equal(backbone, state: dict[str, torch.Tensor]) -> bool:
    loaded = backbone.encoder.model.state_dict()
    return all(torch.equal(loaded[k], v) for k, v in state.items())


# --- registry -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(KNOWN_SHAPES))
def test_big_spec_dims_and_shapes_match_published_architectures(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no init of a 1B-parameter model
        encoder = TimmEncoder(spec)
        tokens = encoder.tokens(torch.zeros(1, 3, spec.input_size, spec.input_size), 2)
    assert tuple(tokens.shape) == (1, 5, spec.dim)
    shapes = {k: tuple(v.shape) for k, v in encoder.model.state_dict().items()}
    for key, shape in KNOWN_SHAPES[name].items():
        assert shapes.get(key) == shape, (name, key)


def test_builtin_registry_has_expected_backbones() -> None:
    names = [spec.name for spec in list_specs()]
    for name in ("uni", "uni2-h", "virchow2", "hoptimus0", "hoptimus1", "gigapath", "resnet50-trunc",
                 "tiny-vit", "tiny-cnn", "he-stats"):
        assert name in names
    assert get_spec("virchow2").dim == 2560 and get_spec("virchow2").pooling == "cls+mean"
    assert get_spec("gigapath").resize == 256
    assert get_spec("hoptimus1").mean == (0.707223, 0.578729, 0.703617)
    assert all(get_spec(n).random_init_only for n in ("tiny-vit", "tiny-cnn", "he-stats"))
    assert "no biology" in get_spec("tiny-vit").description


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-cnn", "he-stats", "timm:resnet18"])
def test_small_backbones_encode_token_grids(name: str) -> None:
    backbone = load_backbone(name, random_init=name.startswith("timm:"))
    batch = patches(2)
    for grid in (0, 2, 4):
        tokens = backbone.encode(batch, token_grid=grid)
        assert tokens.dtype == torch.float32
        assert tuple(tokens.shape) == (2, 1 + grid * grid, backbone.dim)
        assert torch.isfinite(tokens).all()
    assert get_spec("timm:resnet18").dim == 512


def test_unknown_backbone_lists_known_names_and_timm_form() -> None:
    with pytest.raises(UnknownBackboneError) as err:
        get_spec("unii")
    message = str(err.value)
    assert "'uni'" in message and "gigapath" in message and "timm:<architecture>" in message
    with pytest.raises(UnknownBackboneError, match="not a timm architecture"):
        get_spec("timm:no_such_net")


def test_spec_validation_and_duplicate_registration() -> None:
    with pytest.raises(GenedmlError, match="pooling"):
        BackboneSpec("bad", "resnet18", {}, dim=8, pooling="max")
    with pytest.raises(GenedmlError, match="already registered"):
        registry_module.register(get_spec("uni"))


def test_wrong_registered_dim_is_reported_with_both_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BackboneSpec("test-wrong-dim", "vit_tiny_patch16_224", TINY_VIT_KWARGS, dim=65, precision="fp32",
                        random_init_only=True)
    monkeypatch.setitem(registry_module._REGISTRY, spec.name, spec)
    with pytest.raises(GenedmlError, match="64-d.*dim=65"):
        load_backbone(spec.name)


# --- weight resolution ----------------------------------------------------------------------------------

def test_weight_resolution_order(hub_spec, clean_env, tmp_path, monkeypatch) -> None:
    explicit, env_state, hub_state = tiny_state(1), tiny_state(2), tiny_state(3)
    explicit_file = tmp_path / "explicit.safetensors"
    save_file(explicit, str(explicit_file))
    env_root = tmp_path / "weights"
    (env_root / hub_spec.name).mkdir(parents=True)
    torch.save(env_state, env_root / hub_spec.name / "pytorch_model.bin")
    monkeypatch.setenv("GENEDML_WEIGHTS_DIR", str(env_root))
    cached = put_in_hf_cache(clean_env, hub_spec.hub_id, hub_state)

    first = load_backbone(hub_spec.name, weights=explicit_file)
    assert weights_equal(first, explicit) and first.provenance()["weights_path"] == str(explicit_file)
    second = load_backbone(hub_spec.name)
    assert weights_equal(second, env_state)
    monkeypatch.delenv("GENEDML_WEIGHTS_DIR")
    third = load_backbone(hub_spec.name)
    assert weights_equal(third, hub_state) and third.weights_path == cached
    cached.unlink()
    with pytest.raises(MissingWeightsError):
        load_backbone(hub_spec.name)


def test_missing_weights_error_names_both_places(hub_spec, clean_env, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GENEDML_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(MissingWeightsError) as err:
        load_backbone(hub_spec.name)
    message = str(err.value)
    assert str(tmp_path / "weights" / hub_spec.name) in message
    assert "--weights" in message and "--random-init" in message and "genedml doctor" in message
    assert hub_spec.hub_id in message


def test_real_backbone_without_weights_fails_fast(clean_env) -> None:
    with pytest.raises(MissingWeightsError, match="uni.*GENEDML_WEIGHTS_DIR/uni"):
        load_backbone("uni")


def test_safetensors_pth_and_folder_load_identically(hub_spec, clean_env, tmp_path) -> None:
    state = tiny_state(4)
    st_file, pth_file = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(state, str(st_file))
    # A DataParallel-style checkpoint nested under "state_dict": the prefix is stripped on load.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth_file)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    save_file(state, str(folder / "model.safetensors"))
    batch = patches(2, seed=5)
    features = [load_backbone(hub_spec.name, weights=w).encode(batch, 2) for w in (st_file, pth_file, folder)]
    assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])


def test_provenance_records_file_sha256(hub_spec, clean_env, tmp_path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(tiny_state(6), str(weights))
    record = load_backbone(hub_spec.name, weights=weights).provenance()
    assert record["weights"] == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["arch"] == "vit_tiny_patch16_224" and record["dim"] == 64 and "note" not in record


def test_mismatched_state_dict_names_the_keys(hub_spec, clean_env, tmp_path) -> None:
    state = tiny_state(7)
    state["blocks.0.attn.extra_weight"] = torch.zeros(3)
    del state["norm.bias"]
    weights = tmp_path / "bad.safetensors"
    save_file(state, str(weights))
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone(hub_spec.name, weights=weights)
    message = str(err.value)
    assert "norm.bias" in message and "blocks.0.attn.extra_weight" in message and str(weights) in message


def test_truncated_resnet_ignores_dropped_stages_and_classifier(monkeypatch, clean_env, tmp_path) -> None:
    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8}
    spec = BackboneSpec("test-trunc", "resnet18", kwargs, dim=32, pooling="avg", precision="fp32",
                        truncate="layer3")
    monkeypatch.setitem(registry_module._REGISTRY, spec.name, spec)
    import timm

    full = timm.create_model("resnet18", pretrained=False, num_classes=10, channels=(8, 16, 32, 64), stem_width=8)
    weights = tmp_path / "full.pth"
    torch.save(full.state_dict(), weights)
    backbone = load_backbone(spec.name, weights=weights)
    assert torch.equal(backbone.encoder.model.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    assert tuple(backbone.encode(patches(1), 2).shape) == (1, 5, 32)


# --- encode semantics -----------------------------------------------------------------------------------

def test_random_init_is_seeded_and_labelled() -> None:
    before = torch.random.get_rng_state()
    first, second = load_backbone("tiny-vit"), load_backbone("tiny-vit", random_init=True)
    assert torch.equal(torch.random.get_rng_state(), before)  # loading leaves the caller's RNG alone
    batch = patches(3, seed=8)
    assert torch.equal(first.encode(batch, 2), second.encode(batch, 2))
    record = first.provenance()
    assert record["weights"] == "random-init" and "no biology" in record["note"]
    assert record["weights_path"] is None and record["pooling"] == "cls"


def test_preprocess_normalises_with_spec_mean_std() -> None:
    backbone = load_backbone("tiny-vit")
    batch = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
    batch[..., 0], batch[..., 1], batch[..., 2] = 255, 128, 0
    x = backbone.preprocess(batch)
    assert tuple(x.shape) == (1, 3, 224, 224) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(backbone.spec.mean)) / torch.tensor(
        backbone.spec.std)
    assert torch.allclose(x[0, :, 100, 100], expected, atol=1e-6)
    with pytest.raises(GenedmlError, match="uint8"):
        backbone.preprocess(batch.float())


def test_preprocess_resize_then_centre_crop() -> None:
    from genedml.backbones.transforms import preprocess

    spec = get_spec("gigapath")
    image = patches(1, size=256, seed=9)
    cropped = preprocess(image, spec)  # 256 is already the resize target: a pure centre crop
    direct = (image[:, 16:240, 16:240].permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.allclose(cropped, direct, atol=1e-6)
    assert tuple(preprocess(patches(1, size=224), spec).shape) == (1, 3, 224, 224)


def test_cls_plus_mean_excludes_registers(monkeypatch) -> None:
    spec = BackboneSpec("test-reg-vit", "vit_tiny_patch16_224", {**TINY_VIT_KWARGS, "reg_tokens": 4}, dim=128,
                        pooling="cls+mean", precision="fp32", num_register_tokens=4, random_init_only=True)
    monkeypatch.setitem(registry_module._REGISTRY, spec.name, spec)
    backbone = load_backbone(spec.name)
    batch = patches(2, seed=10)
    tokens = backbone.encode(batch, 2)
    with torch.inference_mode():
        features = backbone.encoder.model.forward_features(backbone.preprocess(batch))
    cls, patch_tokens = features[:, 0], features[:, 5:]
    assert patch_tokens.shape[1] == 196
    assert torch.allclose(tokens[:, 0], torch.cat([cls, patch_tokens.mean(1)], -1), atol=1e-5)
    # Cells keep the CLS ⊕ mean layout; 14 × 14 patches split evenly into 2 × 2, so cells average to token 0.
    assert torch.allclose(tokens[:, 1:, :64], cls[:, None].expand(-1, 4, -1))
    assert torch.allclose(tokens[:, 1:].mean(1), tokens[:, 0], atol=1e-5)


def test_he_stats_respond_to_haematoxylin_and_eosin() -> None:
    backbone = load_backbone("he-stats")
    purple, pink = (80, 50, 140), (240, 150, 200)  # nuclei-rich vs stroma/cytoplasm-like colours
    batch = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    batch[0] = torch.tensor(purple, dtype=torch.uint8)
    batch[1, :, :112] = torch.tensor(purple, dtype=torch.uint8)
    batch[1, :, 112:] = torch.tensor(pink, dtype=torch.uint8)
    tokens = backbone.encode(batch, 2)
    hema, eosin = HE_STATS_FEATURES.index("hema_mean"), HE_STATS_FEATURES.index("eosin_mean")
    dark = HE_STATS_FEATURES.index("dark_fraction")
    # Grid cells are row-major: cells 1 and 3 are the right (pink) half of patch 1.
    purple_cell, pink_cell = tokens[1, 1], tokens[1, 2]
    assert purple_cell[hema] > 2 * pink_cell[hema]
    assert pink_cell[eosin] / pink_cell[hema] > purple_cell[eosin] / purple_cell[hema]
    # Colour statistics of a uniform cell equal those of the uniform patch (gradients see the purple|pink edge).
    colour = [i for i, name in enumerate(HE_STATS_FEATURES) if "grad" not in name]
    assert torch.allclose(purple_cell[colour], tokens[0, 0, colour], atol=1e-5)
    assert tokens[1, 1, HE_STATS_FEATURES.index("grad_mean")] > tokens[0, 0, HE_STATS_FEATURES.index("grad_mean")]
    assert purple_cell[dark] == 1.0 and pink_cell[dark] == 0.0
    assert len(HE_STATS_FEATURES) == HEStats.dim == backbone.dim == 32


def test_he_stats_uneven_grid_matches_whole_patch_for_uniform_image() -> None:
    tokens = HEStats().tokens(torch.full((1, 3, 224, 224), 0.6), 3)  # 224 / 3: uneven cells, looped path
    assert tuple(tokens.shape) == (1, 10, 32)
    assert torch.allclose(tokens[0, 1:], tokens[0, :1].expand(9, -1), atol=1e-6)


def test_he_stats_take_no_weights(tmp_path) -> None:
    with pytest.raises(GenedmlError, match="no weights"):
        load_backbone("he-stats", weights=tmp_path / "x.pt")
    assert load_backbone("he-stats").provenance()["weights"] == "not-learned"


# --- doctor ---------------------------------------------------------------------------------------------

def test_doctor_rows_show_where_weights_are(clean_env, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "weights" / "uni"
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setenv("GENEDML_WEIGHTS_DIR", str(tmp_path / "weights"))
    rows = {row["name"]: row for row in backbone_rows()}
    assert rows["uni"]["weights_found"] and str(folder / "pytorch_model.bin") in rows["uni"]["weights"]
    assert not rows["gigapath"]["weights_found"] and rows["gigapath"]["weights"] == "missing"
    assert rows["tiny-vit"]["weights"] == "random-init only"
    report = environment_report()
    assert report["GENEDML_WEIGHTS_DIR"] == str(tmp_path / "weights") and report["faiss_gpus"] >= 0
    assert {"torch", "timm", "cuda_available", "faiss", "zarr", "anndata", "HF_HUB_OFFLINE"} <= set(report)
