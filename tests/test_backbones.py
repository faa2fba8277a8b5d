"""Backbone registry, weight resolution and the encode API, with tiny / random-init / statistics backbones only."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from genedml.backbones import get_spec, list_specs, load_backbone
from genedml.backbones import registry as registry_module
from genedml.backbones.adapters import ADAPTERS, adapt_state_dict
from genedml.backbones.attn_pool import AttentionalPool
from genedml.backbones.token_cells import cell_bounds, cell_membership, cell_sizes, pool_cells
from genedml.backbones.catalog import CATALOG
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
    # CONCH v1 was trained at 448 px with patch 16 (28 × 28 grid + CLS); CONCH v1.5's trunk is ViT-L/16.
    "conch-v1": {"pos_embed": (1, 785, 768), "blocks.11.mlp.fc1.weight": (3072, 768)},
    "conch-v1.5": {"pos_embed": (1, 785, 1024), "blocks.23.ls1.gamma": (1024,)},
    "virchow": {"pos_embed": (1, 257, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280),
                "blocks.0.mlp.fc2.weight": (1280, 3416)},
    # transformers' Dinov2 SwiGLU hidden = (int(4·d·2/3) + 7) // 8 · 8: 2048 for d = 768, 2736 for d = 1024.
    "hibou-b": {"reg_token": (1, 4, 768), "blocks.11.mlp.fc1.weight": (4096, 768),
                "blocks.0.mlp.fc2.weight": (768, 2048)},
    "hibou-l": {"reg_token": (1, 4, 1024), "blocks.23.mlp.fc1.weight": (5472, 1024),
                "blocks.0.mlp.fc2.weight": (1024, 2736)},
    "kaiko-vitl14": {"pos_embed": (1, 1369, 1024), "reg_token": (1, 4, 1024)},  # 518 px checkpoint grid
    "kaiko-vitb8": {"pos_embed": (1, 785, 768)},
    "midnight12k": {"blocks.39.mlp.fc1.weight": (8192, 1536), "blocks.0.mlp.fc2.weight": (1536, 4096)},
    "lunit-vits8": {"pos_embed": (1, 785, 384)},
    "gpfm": {"pos_embed": (1, 257, 1024)},
}
# What docs/backbones.md records for every registered encoder: dim, pooling, input size, mean, std.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
RECORDED = {
    "uni": (1024, "cls", 224, IMAGENET), "uni2-h": (1536, "cls", 224, IMAGENET),
    "virchow2": (2560, "cls+mean", 224, IMAGENET), "hoptimus0": (1536, "cls", 224, HOPTIMUS),
    "hoptimus1": (1536, "cls", 224, HOPTIMUS), "gigapath": (1536, "cls", 224, IMAGENET),
    "resnet50-trunc": (1024, "avg", 224, IMAGENET),
    "conch-v1.5": (768, "attn", 448, IMAGENET), "conch-v1": (512, "attn", 448, OPENAI),
    "phikon": (768, "cls", 224, IMAGENET), "phikon-v2": (1024, "cls", 224, IMAGENET),
    "virchow": (2560, "cls+mean", 224, IMAGENET), "hibou-b": (768, "cls", 224, HIBOU),
    "hibou-l": (1024, "cls", 224, HIBOU), "kaiko-vits16": (384, "cls", 224, HALF),
    "kaiko-vits8": (384, "cls", 224, HALF), "kaiko-vitb16": (768, "cls", 224, HALF),
    "kaiko-vitb8": (768, "cls", 224, HALF), "kaiko-vitl14": (1024, "cls", 224, HALF),
    "midnight12k": (3072, "cls+mean", 224, HALF), "lunit-vits16": (384, "cls", 224, LUNIT),
    "lunit-vits8": (384, "cls", 224, LUNIT), "h0-mini": (768, "cls", 224, HOPTIMUS),
    "gpfm": (1024, "cls", 224, IMAGENET),
    "ctranspath": (768, "cls", 224, IMAGENET), "musk": (1024, "cls", 384, HALF),
    "keep": (768, "cls", 224, IMAGENET), "openmidnight": (1536, "cls", 224, IMAGENET),
    "genbio-pathfm": (4608, "cls", 224, ((0.697, 0.575, 0.728), (0.188, 0.240, 0.187))),
}
UNAVAILABLE = ("ctranspath", "musk", "keep", "openmidnight", "genbio-pathfm")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "backbones.md"


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


@pytest.mark.parametrize("name", [s.name for s in list_specs() if s.kind == "timm" and not s.unavailable_reason])
def test_every_buildable_spec_builds_on_meta_with_its_published_dim(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):
        encoder = TimmEncoder(spec)
        x = torch.zeros(2, 3, spec.input_size, spec.input_size)
        pooled, grid = encoder(x), encoder.tokens(x, 3)
    assert tuple(pooled.shape) == (2, spec.dim) and tuple(grid.shape) == (2, 10, spec.dim)
    if spec.state_dict_adapter:
        assert spec.state_dict_adapter in ADAPTERS


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_spec_dim_pooling_input_size_and_normalisation_match_the_record(name: str) -> None:
    spec = get_spec(name)
    dim, pooling, size, (mean, std) = RECORDED[name]
    assert (spec.dim, spec.pooling, spec.input_size, spec.mean, spec.std) == (dim, pooling, size, mean, std)
    if name in {s.name for s in CATALOG}:  # the newer encoders name where each fact comes from
        assert "Sources:" in spec.description


def test_unbuildable_specs_say_why_and_refuse_to_load() -> None:
    unavailable = [s.name for s in list_specs() if s.unavailable_reason]
    assert sorted(unavailable) == sorted(UNAVAILABLE)
    for name in unavailable:
        with pytest.raises(GenedmlError, match="cannot build it: .{20,}"):
            load_backbone(name, random_init=True)
    with pytest.raises(GenedmlError, match="must say why"):
        BackboneSpec("bad", "resnet18", {}, dim=8, unavailable_reason="  ")
    with pytest.raises(GenedmlError, match="pool_kwargs"):
        BackboneSpec("bad", "vit_tiny_patch16_224", {}, dim=8, pooling="attn")


def test_backbones_command_lists_every_spec_and_why_some_cannot_be_built() -> None:
    env = {**os.environ, "COLUMNS": "1000", "GENEDML_WEIGHTS_DIR": "", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "genedml", "backbones"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    listing = out.stdout + out.stderr  # the CLI's rich console may write to either stream
    for spec in list_specs():
        assert f" {spec.name} " in listing, spec.name
    assert listing.count("cannot be built") == len(UNAVAILABLE) and "timm_ctp" in listing
    rows = {row["name"]: row for row in backbone_rows()}
    assert not rows["musk"]["buildable"] and "BEiT-3" in rows["musk"]["unavailable_reason"]


def test_docs_table_lists_every_spec_with_its_dim() -> None:
    lines = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    cells = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[1:-1]] for line in lines}
    for spec in list_specs():
        if spec.random_init_only:
            continue
        assert spec.name in cells, spec.name
        assert cells[spec.name][2].split()[0] == str(spec.dim), spec.name
        assert cells[spec.name][-1].lower().startswith("no" if spec.unavailable_reason else "yes"), spec.name


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


# --- checkpoint layouts: attentional pooling (CONCH) and transformers (Phikon, Hibou, Midnight) ----------------

TINY_TRUNK = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def register_tiny(monkeypatch, name: str, **fields) -> BackboneSpec:
    spec = BackboneSpec(name, "vit_tiny_patch16_224", {**TINY_TRUNK, **fields.pop("kwargs", {})}, precision="fp32",
                        input_size=32, **fields)
    monkeypatch.setitem(registry_module._REGISTRY, spec.name, spec)
    return spec


def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded noise (LayerNorm/LayerScale too, so no identity hides a wrong map)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for param in module.parameters():
            param.data = torch.randn_like(param) * 0.2
    return module.eval()


def test_token_cells_partition_the_map_and_pool_like_adaptive_pooling_when_the_grid_divides_it() -> None:
    for size, grid in ((14, 3), (14, 4), (16, 4), (7, 2), (7, 4), (28, 5)):
        members = cell_membership(size, size, grid, "cpu")
        assert torch.equal(members.sum(0), torch.ones(size * size, dtype=torch.long))  # each token in one cell
        assert members.sum(1).tolist() == cell_sizes(size, size, grid)
    fmap = torch.randn(2, 5, 16, 16)
    torch.testing.assert_close(pool_cells(fmap, 4), torch.nn.functional.adaptive_avg_pool2d(fmap, 4).flatten(2).transpose(1, 2))
    assert cell_sizes(14, 14, 4)[:4] == [9, 12, 9, 12]  # bands of 3, 4, 3, 4 rows and columns
    with pytest.raises(ValueError, match="cannot split"):
        cell_bounds(3, 4)


def test_attention_pool_restricted_to_a_group_equals_pooling_that_group_alone() -> None:
    pool = seeded(AttentionalPool(16, 24, heads=4, bias=True), 0)
    tokens = torch.randn(2, 10, 24)
    groups = torch.zeros(2, 10, dtype=torch.bool)
    groups[0, :4], groups[1, 4:] = True, True
    with torch.no_grad():
        grouped = pool(tokens, groups)
        assert torch.allclose(grouped[:, 0], pool(tokens[:, :4])[:, 0], atol=1e-5)
        assert torch.allclose(grouped[:, 1], pool(tokens[:, 4:])[:, 0], atol=1e-5)


def _coca_reference(trunk, mha, query, ln_q, ln_k, ln_out, x):
    """CONCH v1's contrastive pooling written out from its description: LN'd query attends over LN'd tokens."""
    tokens = ln_k(trunk.forward_features(x))
    q = ln_q(query)[None].expand(x.shape[0], -1, -1)
    return ln_out(mha(q, tokens, tokens, need_weights=False)[0][:, 0])


def test_conch_v1_checkpoint_maps_exactly_onto_trunk_and_attention_pool(monkeypatch, tmp_path) -> None:
    import timm

    spec = register_tiny(monkeypatch, "test-conch-v1", dim=16, pooling="attn", pool_kwargs={"heads": 4, "bias": True},
                         state_dict_adapter="conch-v1")
    trunk = seeded(timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_TRUNK), 1)
    mha = seeded(torch.nn.MultiheadAttention(16, 4, kdim=48, vdim=48, batch_first=True), 2)
    query, ln_q, ln_k, ln_out = (seeded(m, i) for i, m in enumerate(
        (torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, 16))]), torch.nn.LayerNorm(16),
         torch.nn.LayerNorm(48), torch.nn.LayerNorm(16)), start=3))
    checkpoint = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    checkpoint.update({f"visual.attn_pool_contrast.attn.{k}": v for k, v in mha.state_dict().items()})
    checkpoint.update({"visual.attn_pool_contrast.query": query[0].data,
                       **{f"visual.attn_pool_contrast.ln_q.{k}": v for k, v in ln_q.state_dict().items()},
                       **{f"visual.attn_pool_contrast.ln_k.{k}": v for k, v in ln_k.state_dict().items()},
                       **{f"visual.ln_contrast.{k}": v for k, v in ln_out.state_dict().items()},
                       "visual.proj_contrast": torch.randn(16, 16), "text.token_embedding.weight": torch.randn(9, 4),
                       "visual.attn_pool_caption.query": torch.randn(3, 16), "logit_scale": torch.ones(())})
    weights = tmp_path / "pytorch_model.bin"
    torch.save(checkpoint, weights)
    backbone = load_backbone(spec.name, weights=weights)
    x = backbone.preprocess(patches(2, size=32, seed=11))
    with torch.no_grad():
        expected = _coca_reference(trunk, mha, query[0], ln_q, ln_k, ln_out, x)
    assert torch.allclose(backbone.encode(patches(2, size=32, seed=11))[:, 0], expected, atol=1e-5)
    assert tuple(backbone.encode(patches(1, size=32), token_grid=2).shape) == (1, 5, 16)


def test_conch_v1_5_checkpoint_maps_pooler_and_resamples_224_grid(monkeypatch, tmp_path) -> None:
    import timm

    # Checkpoint trunk at a 2 × 2 grid (16 px), model at 4 × 4 (32 px): the DINO-rule resampling must run.
    spec = register_tiny(monkeypatch, "test-conch-v15", dim=16, pooling="attn", kwargs={"init_values": 1.0},
                         pool_kwargs={"heads": 4, "bias": False}, state_dict_adapter="conch-v1.5")
    small = seeded(timm.create_model("vit_tiny_patch16_224", num_classes=0, init_values=1.0,
                                     **{**TINY_TRUNK, "img_size": 16}), 1)
    to_q, to_kv, to_out = (seeded(torch.nn.Linear(i, o, bias=False), s)
                           for s, (i, o) in enumerate(((16, 16), (48, 32), (16, 16)), start=2))
    ln_q, ln_k, ln_out = (seeded(torch.nn.LayerNorm(d), s) for s, d in ((5, 16), (6, 48), (7, 16)))
    query = torch.randn(1, 16)
    checkpoint = {f"trunk.{k}": v for k, v in small.state_dict().items()}
    checkpoint.update({"attn_pool_contrast.query": query, "attn_pool_contrast.to_q.weight": to_q.weight.data,
                       "attn_pool_contrast.to_kv.weight": to_kv.weight.data,
                       "attn_pool_contrast.to_out.weight": to_out.weight.data,
                       **{f"attn_pool_contrast.ln_q.{k}": v for k, v in ln_q.state_dict().items()},
                       **{f"attn_pool_contrast.ln_k.{k}": v for k, v in ln_k.state_dict().items()},
                       **{f"ln_contrast.{k}": v for k, v in ln_out.state_dict().items()}})
    weights = tmp_path / "pytorch_model_vision.bin"
    torch.save(checkpoint, weights)
    backbone = load_backbone(spec.name, weights=weights)
    model = backbone.encoder.model
    assert torch.equal(model.pos_embed[:, 0], small.pos_embed[:, 0]) and model.pos_embed.shape[1] == 17
    x = backbone.preprocess(patches(2, size=32, seed=12))
    with torch.no_grad():  # the einsum pooler of CONCH v1.5, written out: k and v are the halves of to_kv
        tokens = ln_k(model.forward_features(x))
        k, v = to_kv(tokens).chunk(2, -1)
        q = to_q(ln_q(query)).view(1, 4, 4)
        k, v = k.view(2, -1, 4, 4), v.view(2, -1, 4, 4)
        attn = (torch.einsum("qhd,bnhd->bhqn", q, k) * 4 ** -0.5).softmax(-1)
        expected = ln_out(to_out(torch.einsum("bhqn,bnhd->bqhd", attn, v).flatten(2))[:, 0])
    assert torch.allclose(backbone.encode(patches(2, size=32, seed=12))[:, 0], expected, atol=1e-5)


def test_conch_v1_5_spec_reads_its_vision_file_from_the_hub_cache(clean_env) -> None:
    spec = get_spec("conch-v1.5")
    cached = put_in_hf_cache(clean_env, spec.hub_id, {"x": torch.zeros(1)})
    (cached.parent / spec.hub_filename).write_bytes(cached.read_bytes())
    cached.unlink()
    from genedml.backbones.weights import find_weights, missing_weights_message

    assert find_weights(spec).path.name == "pytorch_model_vision.bin"
    assert "pytorch_model_vision.bin" in missing_weights_message(spec)


def test_unknown_adapter_and_foreign_checkpoint_are_reported() -> None:
    with pytest.raises(GenedmlError, match="unknown state-dict adapter"):
        adapt_state_dict("nope", {}, torch.nn.Identity())
    with pytest.raises(WeightsMismatchError, match="not a CONCH v1 checkpoint"):
        adapt_state_dict("conch-v1", {"blocks.0.x": torch.zeros(1)}, torch.nn.Identity())


# transformers is not a genedml dependency: these run only where it is installed.
V4_NAMES = (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
            ("mlp.down_proj", "mlp.weights_out"))


def as_published(state: dict[str, torch.Tensor], vit: bool) -> dict[str, torch.Tensor]:
    """transformers 5 in-memory names → the 4.x names the published checkpoints were saved with."""
    out = {}
    for key, value in state.items():
        key = key.replace("layers.", "encoder.layer.", 1) if key.startswith("layers.") else key
        for new, old in V4_NAMES:
            key = key.replace(new, old)
        if vit:
            key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[key] = value
    for key in [k for k in out if "mlp.gate_proj" in k]:
        out[key.replace("gate_proj", "weights_in")] = torch.cat([out.pop(key), out.pop(key.replace("gate", "up"))])
    return out


def transformers_case(kind: str):
    """(transformers model, genedml spec fields) pairs for a ViT, a DINOv2 (SwiGLU) and a DINOv2 with registers."""
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=8, layer_norm_eps=1e-6)
    if kind == "vit":
        config = transformers.ViTConfig(image_size=32, intermediate_size=192, **common)
        return transformers.ViTModel(config, add_pooling_layer=False), dict(kwargs={})
    if kind == "dinov2-swiglu":  # checkpoint grid 8 × 8 (64 px), run at 32 px: the position grid is resampled
        config = transformers.Dinov2Config(image_size=64, use_swiglu_ffn=True, **common)
        return transformers.Dinov2Model(config), dict(kwargs={"init_values": 1.0, "mlp_ratio": 128 * 2 / 48,
                                                              "mlp_layer": "SwiGLUPacked", "act_layer": "silu"})
    config = transformers.Dinov2WithRegistersConfig(image_size=32, num_register_tokens=4, **common)
    return transformers.Dinov2WithRegistersModel(config), dict(
        kwargs={"init_values": 1.0, "reg_tokens": 4, "no_embed_class": True}, num_register_tokens=4)


@pytest.mark.parametrize("layout", ["published", "transformers-5"])
@pytest.mark.parametrize("kind", ["vit", "dinov2-swiglu", "dinov2-registers"])
def test_transformers_checkpoints_give_transformers_features(kind, layout, monkeypatch, tmp_path) -> None:
    hf_model, fields = transformers_case(kind)
    seeded(hf_model, 3)
    spec = register_tiny(monkeypatch, f"test-hf-{kind}", dim=48, state_dict_adapter="transformers-vit", **fields)
    state = hf_model.state_dict()
    if layout == "published":
        state = as_published(state, vit=kind == "vit")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    backbone = load_backbone(spec.name, weights=weights)
    batch = patches(2, size=32, seed=13)
    with torch.no_grad():
        hidden = hf_model(pixel_values=backbone.preprocess(batch)).last_hidden_state
    assert torch.allclose(backbone.encode(batch)[:, 0], hidden[:, 0], atol=1e-5)
    tokens = backbone.encoder.model.forward_features(backbone.preprocess(batch))
    assert torch.allclose(tokens, hidden, atol=1e-5)  # every token, registers included, not just the CLS


# Published hub configs (owkin/phikon, histai/hibou-b config.json) and, marked "assumed", the configs the
# specs infer where config.json could not be read (see docs/backbones.md).
HF_CONFIGS = {
    "phikon": ("ViTModel", "ViTConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                             intermediate_size=3072, image_size=224, patch_size=16)),
    "phikon-v2": ("Dinov2Model", "Dinov2Config", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                      patch_size=16, image_size=224)),  # assumed
    "hibou-b": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=224,
                     num_register_tokens=4, use_swiglu_ffn=True)),
    "hibou-l": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",  # assumed from hibou-b
                dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224,
                     num_register_tokens=4, use_swiglu_ffn=True)),
    "midnight12k": ("Dinov2Model", "Dinov2Config", dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                                        patch_size=14, image_size=518, use_swiglu_ffn=True)),  # assumed
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_full_size_transformers_checkpoints_fit_their_specs(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    model_cls, config_cls, config = HF_CONFIGS[name]
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only, no memory
        hf_model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
        encoder = TimmEncoder(spec)
    state = adapt_state_dict(spec.state_dict_adapter, dict(hf_model.state_dict()), encoder.model)
    expected = {k: tuple(v.shape) for k, v in encoder.model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
