"""Public pathology patch encoders beyond the originals in registry.py: one declarative spec each.

Every number here was read from the code that HEST-Benchmark, TRIDENT, kaiko-ai/eva or the model's own
repository runs (named in each description); where a fact could not be confirmed from such a source the
description says "unconfirmed". docs/backbones.md tabulates the same facts with their sources. Specs whose
checkpoints use the Hugging Face transformers (or CONCH's) key layout name a state-dict adapter
(adapters.py) that maps them exactly onto the timm model; specs genedml cannot build set
``unavailable_reason`` and are listed all the same.
"""

from __future__ import annotations

from genedml.backbones.spec import HOPTIMUS_MEAN, HOPTIMUS_STD, BackboneSpec

HALF = (0.5, 0.5, 0.5)  # kaiko (Midnight, ViT-S/B/L) and timm's "inception" normalisation (MUSK)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}


def _kaiko(name: str, label: str, arch: str, dim: int, kwargs: dict | None = None, registers: int = 0) -> BackboneSpec:
    """kaiko.ai DINO/DINOv2 ViTs: stock timm architectures, timm-layout weights (1aurent's hub copies)."""
    return BackboneSpec(
        name, arch, {"img_size": 224, **(kwargs or {})}, dim=dim, mean=HALF, std=HALF, precision="fp32",
        hub_id=f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", num_register_tokens=registers,
        description=f"kaiko.ai {label} on TCGA (Aben et al. 2024), stock timm {arch}; CLS token = {dim}; "
                    "mean/std 0.5, resize+crop 224. Sources: kaiko-ai/towards_large_pathology_fms hubconf.py "
                    "and README, TRIDENT KaikoInferenceEncoder, eva.",
    )


CATALOG: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        "conch-v1.5", "vit_large_patch16_224", {"img_size": 448, "patch_size": 16, "init_values": 1.0},
        dim=768, input_size=448, pooling="attn", pool_kwargs={"heads": 8, "bias": False}, precision="fp16",
        hub_id="MahmoodLab/conchv1_5", hub_filename="pytorch_model_vision.bin", state_dict_adapter="conch-v1.5",
        description="CONCH v1.5 (TITAN's patch encoder): ViT-L/16 (LayerScale init 1.0) at 448 px, then an "
                    "attentional pooler (1 query, 8 heads, 768-d, no biases) + LayerNorm = 768. Sources: TRIDENT "
                    "conchv1_5.py + Conchv15InferenceEncoder (ImageNet mean/std, 448 resize+crop), TITAN "
                    "finetune.py (feature_dim 768).",
    ),
    BackboneSpec(
        "conch-v1", "vit_base_patch16_224", {"img_size": 448, "patch_size": 16},
        dim=512, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, input_size=448, pooling="attn",
        pool_kwargs={"heads": 8, "bias": True}, precision="fp32", hub_id="MahmoodLab/conch",
        state_dict_adapter="conch-v1",
        description="CONCH v1 image tower: timm ViT-B/16 at 448 px + contrastive attentional pooler (1 query, "
                    "8 heads, 512-d) + LayerNorm, without the image-text projection (encode_image("
                    "proj_contrast=False), the HEST/TRIDENT setting) = 512; OpenAI CLIP mean/std. Sources: "
                    "mahmoodlab/CONCH conch_ViT-B-16.json, coca_model.py, vision_tower.py; HEST/TRIDENT "
                    "ConchInferenceEncoder. CONCH resizes bicubic, genedml bilinear (antialiased).",
    ),
    BackboneSpec(
        "phikon", "vit_base_patch16_224", {"img_size": 224},
        dim=768, precision="fp32", hub_id="owkin/phikon", state_dict_adapter="transformers-vit",
        description="Phikon (Owkin, iBOT ViT-B/16 on TCGA), published as a transformers ViTModel; CLS token of "
                    "last_hidden_state = 768; ImageNet mean/std. Sources: HEST/TRIDENT PhikonInferenceEncoder, "
                    "owkin/phikon config.json. LayerNorm eps: timm's 1e-6 (owkin's PR #2 says Phikon was "
                    "trained with it) where the hub config's main branch has 1e-12: a ~1e-6 relative difference "
                    "from transformers' features.",
    ),
    BackboneSpec(
        "phikon-v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5},
        dim=1024, precision="fp32", hub_id="owkin/phikon-v2", state_dict_adapter="transformers-vit",
        description="Phikon-v2 (Owkin, DINOv2 ViT-L/16 on PANCAN-XL, no registers), a transformers Dinov2Model; "
                    "CLS token = 1024; ImageNet mean/std, resize+crop 224. Sources: TRIDENT "
                    "Phikonv2InferenceEncoder, HEST, eva replicate_evaluations.md (IN_FEATURES 1024). "
                    "Unconfirmed: config.json (plain GELU MLP assumed; its image_size is handled either way).",
    ),
    BackboneSpec(
        "virchow", "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **SWIGLU},
        dim=2560, pooling="cls+mean", precision="fp16", hub_id="paige-ai/Virchow",
        description="Virchow (Paige, v1), ViT-H/14, SwiGLU, no registers; CLS ⊕ mean of patch tokens = 2560; "
                    "ImageNet mean/std. Sources: TRIDENT/HEST VirchowInferenceEncoder.",
    ),
    BackboneSpec(
        "hibou-b", "vit_base_patch14_reg4_dinov2", {"img_size": 224, "mlp_ratio": 5.33334, **SWIGLU},
        dim=768, mean=HIBOU_MEAN, std=HIBOU_STD, precision="fp32", hub_id="histai/hibou-b",
        num_register_tokens=4, state_dict_adapter="transformers-vit",
        description="Hibou-B (HistAI), DINOv2 ViT-B/14 with 4 registers and SwiGLU (hidden 2048), transformers "
                    "custom code; CLS token (pooler_output) = 768; Hibou mean/std. Sources: histai/hibou-b "
                    "config.json (image_size 224, use_swiglu_ffn, num_register_tokens 4), TRIDENT constants, "
                    "eva. Unconfirmed: the custom modeling file's key names (assumed those of transformers' "
                    "Dinov2WithRegisters).",
    ),
    BackboneSpec(
        "hibou-l", "vit_large_patch14_reg4_dinov2", {"img_size": 224, "mlp_ratio": 5.34375, **SWIGLU},
        dim=1024, mean=HIBOU_MEAN, std=HIBOU_STD, precision="fp32", hub_id="histai/hibou-L",
        num_register_tokens=4, state_dict_adapter="transformers-vit",
        description="Hibou-L (HistAI), DINOv2 ViT-L/14 with 4 registers, transformers custom code; CLS token = "
                    "1024; Hibou mean/std. Sources: TRIDENT HibouLInferenceEncoder, HEST, eva. Unconfirmed: "
                    "SwiGLU FFN (hidden 2736) and 224-px config assumed from Hibou-B's config.json and the "
                    "HistAI build_model defaults.",
    ),
    _kaiko("kaiko-vits16", "DINO ViT-S/16", "vit_small_patch16_224", 384),
    _kaiko("kaiko-vits8", "DINO ViT-S/8", "vit_small_patch8_224", 384),
    _kaiko("kaiko-vitb16", "DINO ViT-B/16", "vit_base_patch16_224", 768),
    _kaiko("kaiko-vitb8", "DINO ViT-B/8", "vit_base_patch8_224", 768),
    # Built at 518 px like the checkpoint's position grid (37 × 37) and run at 224 by timm's resampling, as in
    # kaiko's hubconf and TRIDENT.
    _kaiko("kaiko-vitl14", "DINOv2 ViT-L/14 (4 registers)", "vit_large_patch14_reg4_dinov2", 1024,
           kwargs={"img_size": 518, "dynamic_img_size": True}, registers=4),
    BackboneSpec(
        "midnight12k", "vit_giant_patch14_dinov2", {"img_size": 224},
        dim=3072, mean=HALF, std=HALF, pooling="cls+mean", precision="fp16", hub_id="kaiko-ai/midnight",
        state_dict_adapter="transformers-vit",
        description="Midnight-12k (kaiko.ai), DINOv2 ViT-g/14 on TCGA, transformers Dinov2Model, no registers; "
                    "CLS ⊕ mean of patch tokens = 3072 (the model card's classification embedding; TRIDENT's "
                    "default is CLS only, 1536); mean/std 0.5. Sources: kaiko-ai/Midnight README, TRIDENT "
                    "Midnight12kInferenceEncoder and docs. Unconfirmed: SwiGLU FFN (DINOv2 ViT-g design).",
    ),
    BackboneSpec(
        "lunit-vits16", "vit_small_patch16_224", {"img_size": 224},
        dim=384, mean=LUNIT_MEAN, std=LUNIT_STD, precision="fp32",
        description="Lunit DINO ViT-S/16 on TCGA (Kang et al. 2023), stock timm ViT-S/16; CLS token; Lunit "
                    "mean/std. Weights: dino_vit_small_patch16_ep200.torch from lunit-io/benchmark-ssl-"
                    "pathology releases (no hub copy confirmed). Sources: that README, eva lunit.py.",
    ),
    BackboneSpec(
        "lunit-vits8", "vit_small_patch8_224", {"img_size": 224},
        dim=384, mean=LUNIT_MEAN, std=LUNIT_STD, precision="fp32", hub_id="1aurent/vit_small_patch8_224.lunit_dino",
        description="Lunit DINO ViT-S/8 on TCGA, stock timm ViT-S/8; CLS token; Lunit mean/std. Sources: "
                    "TRIDENT LunitS8InferenceEncoder, eva lunit.py, lunit-io/benchmark-ssl-pathology README.",
    ),
    BackboneSpec(
        "h0-mini", "vit_base_patch14_reg4_dinov2", {"img_size": 224, **SWIGLU},
        dim=768, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, precision="fp16", hub_id="bioptimus/H0-mini",
        num_register_tokens=4,
        description="H0-mini (Bioptimus), ViT-B/14 with 4 registers distilled from H-optimus-0, SwiGLU; CLS "
                    "token = 768 (HEST/TRIDENT default; CLS ⊕ mean = 1536 is the alternative). Sources: "
                    "TRIDENT/HEST H0MiniInferenceEncoder, eva bioptimus.py. Unconfirmed: mlp_ratio (timm "
                    "default 4 assumed; the hub config.json was not readable here) and mean/std (H-optimus "
                    "values, as third-party code uses).",
    ),
    BackboneSpec(
        "gpfm", "vit_large_patch14_dinov2", {"img_size": 224, "init_values": 1e-5},
        dim=1024, precision="fp16", hub_id="majiabo/GPFM", hub_filename="GPFM.pth",
        description="GPFM (Ma et al.), DINOv2 ViT-L/14 at 224 px; CLS token = 1024; ImageNet mean/std. "
                    "Sources: TRIDENT GPFMInferenceEncoder and docs. TRIDENT unpickles GPFM.pth "
                    "(weights_only=False); genedml reads tensors only and reports a file it cannot read.",
    ),
    # --- listed for comparison, not buildable offline by genedml --------------------------------------
    BackboneSpec(
        "ctranspath", "swin_tiny_patch4_window7_224+ConvStem", {}, dim=768, precision="fp32",
        unavailable_reason="CTransPath's Swin-T uses a convolutional patch-embedding stem that only the "
                           "timm_ctp fork (timm 0.5.4) defines; stock timm cannot build it.",
        description="CTransPath (Wang et al. 2022; CHIEF weights in TRIDENT), 768-d. Sources: TRIDENT "
                    "CTransPathInferenceEncoder and docs, HEST.",
    ),
    BackboneSpec(
        "musk", "musk_large_patch16_384", {}, dim=1024, mean=HALF, std=HALF, input_size=384, precision="fp16",
        unavailable_reason="MUSK is a BEiT-3 vision-language model whose architecture is registered by the "
                           "`musk` package (lilab-stanford/MUSK), not by timm.",
        description="MUSK (Xiang et al. 2025), vision CLS = 1024 at 384 px, inception (0.5) mean/std. Sources: "
                    "TRIDENT MuskInferenceEncoder and docs.",
    ),
    BackboneSpec(
        "keep", "KEEP (transformers remote code)", {}, dim=768, precision="fp16",
        unavailable_reason="KEEP is loaded with transformers AutoModel(trust_remote_code=True), i.e. model code "
                           "downloaded from its hub repository; genedml runs no remote code.",
        description="KEEP (knowledge-enhanced vision-language pathology model), 768-d image embedding. Sources: "
                    "TRIDENT KeepInferenceEncoder and docs.",
    ),
    BackboneSpec(
        "openmidnight", "dinov2_vitg14_reg", {}, dim=1536, precision="fp16", num_register_tokens=4,
        unavailable_reason="OpenMidnight is built with torch.hub code from facebookresearch/dinov2 (original "
                           "DINOv2 key layout, a checkpoint-defined pos_embed); genedml has no adapter for it yet.",
        description="OpenMidnight (SophontAI), DINOv2 ViT-g/14 with registers, 1536-d; ImageNet mean/std. "
                    "Sources: TRIDENT OpenMidnightInferenceEncoder and docs.",
    ),
    BackboneSpec(
        "genbio-pathfm", "GenBio-PathFM (custom)", {}, dim=4608, mean=(0.697, 0.575, 0.728),
        std=(0.188, 0.240, 0.187), precision="bf16",
        unavailable_reason="GenBio-PathFM's architecture is defined by its own inference code (TRIDENT's "
                           "model_zoo/genbio_pathfm), not by timm.",
        description="GenBio-PathFM, 4608-d. Sources: TRIDENT GenBioPathFMInferenceEncoder and docs.",
    ),
)
