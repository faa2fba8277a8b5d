"""`BackboneSpec`: what a backbone is, as plain data (architecture, kwargs, normalisation, pooling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping

from genedml.errors import GenedmlError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pooling = Literal["cls", "cls+mean", "avg", "attn"]
Precision = Literal["fp16", "bf16", "fp32"]
Kind = Literal["timm", "stats"]
POOLINGS = ("cls", "cls+mean", "avg", "attn")
ATTN_POOL_KEYS = frozenset({"heads", "bias"})
PRECISIONS = ("fp16", "bf16", "fp32")
KINDS = ("timm", "stats")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build, feed and pool one frozen backbone.

    pooling: "cls" = CLS token; "cls+mean" = CLS ⊕ mean of patch tokens (registers excluded; dim doubles);
    "avg" = mean of the spatial features (CNN feature map, or ViT patch tokens); "attn" = a learned
    single-query attention pooler + LayerNorm over all tokens (CONCH; ``pool_kwargs`` = heads, bias; ``dim`` is
    the pooler's width).
    resize: shorter side resized to this, then centre-cropped to ``input_size`` (None: resized straight to
    ``input_size`` only when the patch has another size).
    truncate: for ResNets, the last stage kept (e.g. "layer3"); later stages and the classifier are dropped.
    state_dict_adapter: name of a function in `adapters.ADAPTERS` that maps the published checkpoint's keys
    (e.g. Hugging Face transformers layout) onto the timm model; None = the file is in timm layout already.
    hub_filename: the weights file in the ``hub_id`` repository when it is not model.safetensors or
    pytorch_model.bin.
    unavailable_reason: set for an encoder genedml lists but cannot build (needs code beyond timm); loading it
    raises with this text.
    """

    name: str
    arch: str
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    dim: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    resize: int | None = None
    pooling: Pooling = "cls"
    precision: Precision = "fp16"
    hub_id: str | None = None
    kind: Kind = "timm"
    truncate: str | None = None
    num_register_tokens: int = 0
    description: str = ""
    random_init_only: bool = False
    pool_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    state_dict_adapter: str | None = None
    hub_filename: str | None = None
    unavailable_reason: str | None = None

    def __post_init__(self) -> None:
        # Read-only kwargs: a frozen spec must not be mutated through its dict.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "pool_kwargs", MappingProxyType(dict(self.pool_kwargs)))
        problems = []
        if not self.name or self.name != self.name.strip():
            problems.append(f"name {self.name!r} must be a non-empty string without surrounding spaces")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling {self.pooling!r} not in {POOLINGS}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} not in {PRECISIONS}")
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} not in {KINDS}")
        if not (isinstance(self.dim, int) and self.dim > 0):
            problems.append(f"dim must be a positive int, got {self.dim!r}")
        if self.resize is not None and self.resize < self.input_size:
            problems.append(f"resize {self.resize} is smaller than input_size {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            problems.append(f"mean/std must be 3 values with std > 0, got {self.mean} / {self.std}")
        if self.pooling == "attn" and set(self.pool_kwargs) != ATTN_POOL_KEYS:
            problems.append(f"pooling 'attn' needs pool_kwargs with exactly {sorted(ATTN_POOL_KEYS)}")
        if self.pooling != "attn" and self.pool_kwargs:
            problems.append("pool_kwargs are only used by pooling 'attn'")
        if self.unavailable_reason is not None and not self.unavailable_reason.strip():
            problems.append("unavailable_reason, when set, must say why")
        if problems:
            raise GenedmlError(f"invalid backbone spec '{self.name}': " + "; ".join(problems) + ".")

    @property
    def weights_dirname(self) -> str:
        """Folder name under $GENEDML_WEIGHTS_DIR (':' is not portable in folder names)."""
        return self.name.replace(":", "_")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for provenance records."""
        return {
            "name": self.name, "arch": self.arch, "kwargs": dict(self.kwargs), "dim": self.dim,
            "mean": list(self.mean), "std": list(self.std), "input_size": self.input_size,
            "resize": self.resize, "pooling": self.pooling, "precision": self.precision, "hub_id": self.hub_id,
            "kind": self.kind, "truncate": self.truncate, "num_register_tokens": self.num_register_tokens,
            "random_init_only": self.random_init_only, "pool_kwargs": dict(self.pool_kwargs) or None,
            "state_dict_adapter": self.state_dict_adapter, "hub_filename": self.hub_filename,
            "unavailable_reason": self.unavailable_reason,
        }
