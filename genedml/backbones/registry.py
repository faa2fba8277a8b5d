"""The backbone registry: one frozen `BackboneSpec` per name, plus `timm:<arch>` for any timm architecture.

Adding a backbone is adding a spec; special behaviour (registers, truncation, resize, a checkpoint key layout,
an attentional pooling head, "cannot be built here") is a field, not a subclass. Specs are plain data
(JSON-able kwargs; layer classes and state-dict adapters named by string) so they can be recorded in a feature
cache's provenance verbatim. The public pathology encoders beyond the originals live in `catalog.py`.
"""

from __future__ import annotations

import difflib

from genedml.backbones.spec import (  # noqa: F401  (re-exported: the registry is where users look)
    IMAGENET_MEAN,
    IMAGENET_STD,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    Pooling,
    Precision,
    Kind,
    POOLINGS,
    ATTN_POOL_KEYS,
    PRECISIONS,
    KINDS,
    TIMM_PREFIX,
    BackboneSpec,
)
from genedml.errors import GenedmlError, UnknownBackboneError

_REGISTRY: dict[str, BackboneSpec] = {}
_DERIVED: dict[str, BackboneSpec] = {}  # timm:<arch> specs, built once per process


def register(spec: BackboneSpec, *, replace: bool = False) -> BackboneSpec:
    """Add `spec` to the registry; re-registering a name needs ``replace=True``."""
    if spec.name.startswith(TIMM_PREFIX):
        raise GenedmlError(f"backbone names starting with '{TIMM_PREFIX}' are reserved for timm architectures.")
    if spec.name in _REGISTRY and not replace:
        raise GenedmlError(f"backbone '{spec.name}' is already registered; pass replace=True to override it.")
    _REGISTRY[spec.name] = spec
    return spec


def list_specs() -> list[BackboneSpec]:
    """The registered specs, in registration order (derived `timm:` specs are not listed)."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    """The spec called `name`, or a derived spec for ``timm:<arch>``; unknown names raise with the choices."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        if name not in _DERIVED:
            _DERIVED[name] = _timm_spec(name[len(TIMM_PREFIX):])
        return _DERIVED[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"unknown backbone '{name}'.{hint} Known: {', '.join(_REGISTRY)}; "
        f"or '{TIMM_PREFIX}<architecture>' for any timm model (e.g. '{TIMM_PREFIX}resnet18', random init "
        "unless you give weights). `genedml backbones` lists them."
    )


def _timm_spec(arch: str) -> BackboneSpec:
    """Derive a spec for a bare timm architecture: dim and token layout from a forward on the meta device."""
    import timm
    import torch

    if not timm.is_model(arch):
        similar = timm.list_models(f"*{arch}*")[:10]
        hint = f" Similar timm names: {', '.join(similar)}." if similar else ""
        raise UnknownBackboneError(
            f"'{arch}' is not a timm architecture.{hint} Known registry names: {', '.join(_REGISTRY)}."
        )
    cfg = timm.models.get_pretrained_cfg(arch)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    # The meta device gives shapes without allocating or initialising any weights.
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        out = model.forward_features(torch.zeros(1, 3, size, size))
    if out.ndim == 4:
        pooling, dim, registers = "avg", int(out.shape[1]), 0
    else:
        has_cls = bool(getattr(model, "cls_token", None) is not None)
        prefix = int(getattr(model, "num_prefix_tokens", int(has_cls)))
        pooling = "cls" if has_cls and getattr(model, "global_pool", "token") == "token" else "avg"
        dim, registers = int(out.shape[-1]), prefix - int(has_cls)
    return BackboneSpec(
        name=TIMM_PREFIX + arch, arch=arch, kwargs={}, dim=dim,
        mean=tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN,
        std=tuple(cfg.std) if cfg is not None else IMAGENET_STD,
        input_size=size, pooling=pooling, precision="bf16",
        hub_id=cfg.hf_hub_id if cfg is not None else None, num_register_tokens=registers,
        description=f"timm architecture {arch} (default pretrained tag's hub id for the warm-cache lookup).",
    )


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}
_GIANT_MLP = 2.66667 * 2  # SwiGLUPacked hidden 8192 for embed 1536 (DINOv2's 2/3, align-8 rule)

for _spec in (
    BackboneSpec(
        "uni", "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024, hub_id="MahmoodLab/UNI",
        description="UNI (Chen et al. 2024), ViT-L/16 on 100k WSIs; CLS token. Gene-DML's backbone.",
    ),
    BackboneSpec(
        "uni2-h", "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
         "embed_dim": 1536, "mlp_ratio": _GIANT_MLP, "no_embed_class": True, "reg_tokens": 8,
         "dynamic_img_size": True, **_SWIGLU},
        dim=1536, precision="bf16", hub_id="MahmoodLab/UNI2-h", num_register_tokens=8,
        description="UNI2-h, ViT-H/14 with 8 registers, SwiGLU; CLS token.",
    ),
    BackboneSpec(
        "virchow2", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
         "dynamic_img_size": True, **_SWIGLU},
        dim=2560, pooling="cls+mean", hub_id="paige-ai/Virchow2", num_register_tokens=4,
        description="Virchow2 (Paige), ViT-H/14 with 4 registers; CLS ⊕ mean of patch tokens = 2560.",
    ),
    *(
        BackboneSpec(
            name, "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            dim=1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hub_id=hub, num_register_tokens=4,
            description=f"{label} (Bioptimus), ViT-g/14 with 4 registers; CLS token; own mean/std.",
        )
        for name, hub, label in (("hoptimus0", "bioptimus/H-optimus-0", "H-optimus-0"),
                                 ("hoptimus1", "bioptimus/H-optimus-1", "H-optimus-1"))
    ),
    BackboneSpec(
        "gigapath", "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334},
        dim=1536, resize=256, hub_id="prov-gigapath/prov-gigapath",
        description="Prov-GigaPath tile encoder, ViT-g/16; resize 256 then centre-crop 224; CLS token.",
    ),
    BackboneSpec(
        "resnet50-trunc", "resnet50", {}, dim=1024, pooling="avg", truncate="layer3",
        hub_id="timm/resnet50.tv_in1k",
        description="ImageNet ResNet-50 cut after layer3 + global average pool (HEST/TRIDENT baseline).",
    ),
    BackboneSpec(
        "tiny-vit", "vit_tiny_patch16_224",
        {"img_size": 224, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2},
        dim=64, precision="fp32", random_init_only=True,
        description="Tiny ViT (patch 16, embed 64, depth 2) for tests, the demo and speed checks; random "
                    "init carries no biology.",
    ),
    BackboneSpec(
        "tiny-cnn", "resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16},
        dim=128, pooling="avg", precision="fp32", random_init_only=True,
        description="Narrow ResNet-18 (widths 16-128) for tests and speed checks; random init carries no "
                    "biology.",
    ),
    BackboneSpec(
        "he-stats", "he-stats", {}, dim=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pooling="avg",
        precision="fp32", kind="stats", random_init_only=True,
        description="Non-learned baseline: RGB/optical-density/H&E-stain (Ruifrok) colour statistics, "
                    "dark-pixel fraction and gradient texture per patch or grid cell; needs no weights.",
    ),
):
    register(_spec)

from genedml.backbones.catalog import CATALOG  # noqa: E402  (after the original specs: registration order)

for _spec in CATALOG:
    register(_spec)
