"""The Gene-DML model (method.md §1.2–1.3): scale encoders, fusion, gene encoder, the dual-pathway losses.

Every part is a switch of `GeneDMLSettings`, so the paper's ablations are one field each. The same model with
objective="triplex" (contrastive pathways off, per-branch heads, MSE + distillation) is the TRIPLEX baseline
on identical encoders (`genedml.heads.triplex`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genedml.errors import ConfigError
from genedml.heads.batch import Batch
from genedml.heads.features import SpotFeatures, StreamedSpots
from genedml.heads.layers import FusionEncoder, GlobalEncoder, NeighborEncoder, ProjectionHead, feed_forward
from genedml.heads.losses import GroupForm, group_loss, instance_loss, regression_loss, triplex_loss
from genedml.heads.training import NeuralHead, TrainSettings
from genedml.log import log

SCALES = ("local", "neighbor", "global")
# The default leaves out the paper's neighbour scale. On her2st he-stats features it lowered accuracy in 17 of
# 18 fold-seed pairs, and fits took 3-4x longer. On random ResNet18 features and a synthetic cohort the
# evidence was mixed (benchmarks/RESULTS.md, "genedml 0.5"). scales=SCALES is the authors' model.
DEFAULT_SCALES = ("local", "global")
# The reference runs the scale encoders at the backbone width. On random-init ResNet18 (D = 512) that global
# encoder fitted patient-specific appearance: C2-C6 -> B4 scored 0.19-0.30 over five seeds (mean 0.241) against
# ridge-cv 0.282; at width 128 it scored 0.277 and on three sections 0.285 instead of 0.244. Backbones of at
# most 128 dimensions (he-stats) are untouched (benchmarks/RESULTS.md, "genedml 0.6").
DEFAULT_ENCODER_DIM = 128
# Dropout on the backbone features where they enter the head. On random-init ResNet18 (D = 512), trained on
# patient C and tested on patient B, p = 0.7 raised the default head from 0.270 to 0.293 (3 seeds) and the
# worst seed from 0.245 to 0.292; the MLP baseline gained as much. On he-stats (32 hand-crafted statistics)
# p = 0.5 lowered it from 0.327 to 0.314: few channels that each carry their own information lose it.
# So "auto" drops features only from backbones at least AUTO_INPUT_DROPOUT_MIN_WIDTH wide (every learned
# embedding we support; benchmarks/RESULTS.md, "genedml 0.8").
AUTO_INPUT_DROPOUT = 0.7
AUTO_INPUT_DROPOUT_MIN_WIDTH = 256
# The weights of the two contrastive terms (the paper: instance 1, group λ = 0.8). At 0.1 the regression term
# leads and the contrastive terms act as a regulariser. On her2st, random-init
# ResNet18, C2-C6 -> B4: 0.293 -> 0.308 at CPU sizes (MLP 0.300), 0.296 -> 0.305 at paper sizes; he-stats
# 0.327 -> 0.334; within a patient 0.267 -> 0.272 (ResNet18, seed 2021) and level (he-stats); three sections
# level at paper sizes and -0.004 at CPU sizes.
# Both pathways off: 0.270 (benchmarks/RESULTS.md, "genedml 0.9").
DEFAULT_CONTRASTIVE_WEIGHT = 0.1


@dataclass(frozen=True)
class GeneDMLSettings(TrainSettings):
    """Architecture, objective and optimisation. Defaults follow the paper (HER2ST settings) except the named
    deviations: `scales`, `encoder_dim`, `input_dropout`, the contrastive weights (and training's `average_weights`)."""

    scales: tuple[str, ...] = DEFAULT_SCALES  # the paper: SCALES (a named deviation, see DEFAULT_SCALES)
    objective: Literal["genedml", "triplex"] = "genedml"
    instance: bool = True  # multi-scale instance-level pathway
    group: bool = True  # cross-level instance-group pathway
    group_form: GroupForm = "reference"
    groups: int = 18  # K of the per-batch k-means
    lambda_group: float = DEFAULT_CONTRASTIVE_WEIGHT  # λ (the paper: 0.8; a named deviation)
    instance_weight: float = DEFAULT_CONTRASTIVE_WEIGHT  # weight of the instance term (the paper's loss has 1)
    tau: float = 0.07  # instance temperature τ
    tau_group: float = 0.07  # group temperature τ_g
    kmeans_iters: int = 10
    triplex_alpha: float = 0.3
    triplex_detach_teacher: bool = True
    dim: int = 512  # width after the shared fc
    # The widest the scale encoders run. A backbone wider than this gets a shared Linear(D → encoder_dim) first,
    # so the neighbour and global encoders (their activations are the bulk of a step's memory and time at
    # D = 1,024–1,536) run at that width; a narrower backbone runs at its own width D. 0 = always at D, as the
    # reference model. 128 is a named deviation (see DEFAULT_ENCODER_DIM).
    encoder_dim: int = DEFAULT_ENCODER_DIM
    neighbor_depth: int = 4
    neighbor_heads: int = 4
    neighbor_mlp_ratio: float = 4.0
    neighbor_dropout: float = 0.3
    global_depth: int = 5
    global_heads: int = 8
    global_mlp_ratio: float = 4.0
    global_dropout: float = 0.3
    # Slides with more spots than this attend within windows of global_window x global_window grid cells
    # instead of exactly (memory); the exact path is used wherever it fits.
    global_window_above: int = 20_000
    global_window: int = 64
    fusion_depth: int = 1
    fusion_heads: int = 1
    fusion_mlp_ratio: float = 2.0  # 512 → 1024
    fusion_dropout: float = 0.1
    gene_dropout: float = 0.3  # in the gene encoder's projection head
    gene_ff_dropout: float = 0.1  # in the gene encoder's feed-forward
    regression_hidden_ratio: float = 3.0  # 512 → 1536
    regression_dropout: float = 0.1
    # Dropout on the backbone features where they enter every scale (local tokens, neighbour tiles, the global
    # scale's slide tokens), training only. "auto" = AUTO_INPUT_DROPOUT for backbones at least
    # AUTO_INPUT_DROPOUT_MIN_WIDTH wide, 0 for narrower ones (a named deviation); 0 = the reference model.
    input_dropout: float | str = "auto"
    # Weight each cached local token by the backbone tokens it stands for (cache attribute
    # local_token_weights): proportional attention in fusion and weighted means, so a compact cache keeps the
    # local patch's share of f that the reference model's 197 local tokens have.
    local_token_weighting: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        scales = self.scales if isinstance(self.scales, (tuple, list)) else (self.scales,)
        object.__setattr__(self, "scales", tuple(scales))
        unknown = set(self.scales) - set(SCALES)
        if unknown or not self.scales:
            raise ConfigError(f"scales must be a non-empty subset of {list(SCALES)}, got {list(self.scales)}")
        if self.objective not in ("genedml", "triplex"):
            raise ConfigError(f"objective must be 'genedml' or 'triplex', got {self.objective!r}")
        if self.objective == "triplex" and (self.instance or self.group):
            raise ConfigError("objective 'triplex' has no contrastive terms: set instance=False and group=False")
        if self.group_form not in ("reference", "cld"):
            raise ConfigError(f"group_form must be 'reference' or 'cld', got {self.group_form!r}")
        for name in ("groups", "kmeans_iters", "dim", "neighbor_heads", "global_heads", "fusion_heads",
                     "neighbor_depth", "global_depth", "fusion_depth"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"head setting {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lambda_group", "instance_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"head setting {name} must be a number >= 0, got {value!r}")
        for name in ("tau", "tau_group"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"head setting {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("neighbor_dropout", "global_dropout", "fusion_dropout", "gene_dropout", "gene_ff_dropout", "regression_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"head setting {name} must be in [0, 1), got {getattr(self, name)!r}")
        p = self.input_dropout
        if p != "auto" and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ConfigError(f"head setting input_dropout must be 'auto' or a number in [0, 1), got {p!r}")
        if isinstance(self.encoder_dim, bool) or not isinstance(self.encoder_dim, int) or self.encoder_dim < 0:
            raise ConfigError(f"head setting encoder_dim must be an integer >= 0 (0 = always the backbone width), got {self.encoder_dim!r}")
        for name in ("neighbor_heads", "global_heads"):
            if self.encoder_dim and self.encoder_dim % getattr(self, name):
                raise ConfigError(f"encoder_dim {self.encoder_dim} is not divisible by {name} {getattr(self, name)}")
        if self.dim % self.fusion_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by fusion_heads {self.fusion_heads}")

    @property
    def needs_gene_encoder(self) -> bool:
        return self.instance or self.group


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens (dim 1) of the valid ones, each counted `weights` times when given."""
    w = valid.to(x.dtype)
    if weights is not None:
        w = w * weights.to(x.dtype)
    w = w[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-6)


class GeneDMLModel(nn.Module):
    """Scale encoders → shared fc → fusion → regression head; gene encoder and cluster head for the losses."""

    def __init__(self, cfg: GeneDMLSettings, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.cfg = cfg
        e, g = cfg.dim, n_genes
        # A shared projection before the scale encoders when the backbone is wider than encoder_dim.
        d = self.encoder_width(cfg, in_dim)
        for scale, heads in (("neighbor", cfg.neighbor_heads), ("global", cfg.global_heads)):
            if scale in cfg.scales and d % heads:
                raise ConfigError(f"the {scale} encoder runs at width {d} (min of the backbone's {in_dim} and encoder_dim "
                                  f"{cfg.encoder_dim}), which is not divisible by {scale}_heads {heads}")
        self.input_proj = nn.Linear(in_dim, d) if d != in_dim else nn.Identity()
        self.input_dropout = nn.Dropout(self.input_dropout_rate(cfg, in_dim))  # no parameters: saved keys stay
        if "neighbor" in cfg.scales:
            self.neighbor_encoder = NeighborEncoder(
                d, cfg.neighbor_depth, cfg.neighbor_heads, cfg.neighbor_mlp_ratio, cfg.neighbor_dropout
            )
        if "global" in cfg.scales:
            self.global_encoder = GlobalEncoder(
                d, cfg.global_depth, cfg.global_heads, cfg.global_mlp_ratio, cfg.global_dropout,
                window=cfg.global_window, window_above=cfg.global_window_above,
            )
        self._global_cache: dict[int, torch.Tensor] | None = None
        self.fc = nn.Linear(d, e)
        self.fusion = FusionEncoder(e, cfg.fusion_depth, cfg.fusion_heads, int(e * cfg.fusion_mlp_ratio), cfg.fusion_dropout)
        hidden = int(e * cfg.regression_hidden_ratio)
        p = cfg.regression_dropout
        self.regression = nn.Sequential(
            nn.Linear(e, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, e), nn.ReLU(), nn.Dropout(p), nn.Linear(e, g)
        )
        if cfg.needs_gene_encoder:
            self.gene_encoder = nn.Sequential(ProjectionHead(g, e, cfg.gene_dropout), feed_forward(e, 2 * e, cfg.gene_ff_dropout))
        if cfg.group:
            self.cluster_head = nn.Linear(e, e)
        if cfg.objective == "triplex":
            self.branch_heads = nn.ModuleDict(
                {s: nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, g)) for s in cfg.scales}
            )

    @staticmethod
    def input_dropout_rate(cfg: GeneDMLSettings, in_dim: int) -> float:
        """The input dropout probability: the setting, or for "auto" the width-dependent default."""
        if cfg.input_dropout == "auto":
            return AUTO_INPUT_DROPOUT if in_dim >= AUTO_INPUT_DROPOUT_MIN_WIDTH else 0.0
        return float(cfg.input_dropout)

    @staticmethod
    def encoder_width(cfg: GeneDMLSettings, in_dim: int) -> int:
        """The width the scale encoders run at: min(D, encoder_dim), or D when encoder_dim is 0."""
        return min(in_dim, cfg.encoder_dim) if cfg.encoder_dim else in_dim

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features → encoder width, with input dropout in training."""
        return self.input_proj(self.input_dropout(features))

    @contextlib.contextmanager
    def reuse_global_tokens(self) -> Iterator[None]:
        """Within the block, eval passes encode each slide's global scale once (keyed by slide index)."""
        self._global_cache = {}
        try:
            yield
        finally:
            self._global_cache = None

    # -- encoders -------------------------------------------------------------------------------------------
    def _global_tokens(self, batch: Batch) -> torch.Tensor:
        """Encode every slide of the batch once (all its spots), then pick the batch's spots → (B, D).

        In eval mode inside `reuse_global_tokens()`, a slide is encoded once for all the batches of a pass.
        """
        encoded = []
        for i, (tokens, grid) in enumerate(zip(batch.slide_tokens, batch.slide_grid)):
            key = batch.slide_ids[i] if batch.slide_ids else None
            if self._global_cache is not None and key is not None and not self.training:
                if key not in self._global_cache:
                    self._global_cache[key] = self.global_encoder(self._project(tokens), grid)
                encoded.append(self._global_cache[key])
            else:
                encoded.append(self.global_encoder(self._project(tokens), grid))
        out = encoded[0].new_empty(len(batch), encoded[0].shape[-1])
        for i, enc in enumerate(encoded):
            rows = torch.nonzero(batch.slot == i).squeeze(1)
            out = out.index_copy(0, rows, enc[batch.slide_pos[rows]])
        return out

    def encode_scales(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per scale: tokens after fc (B, L, E) and their validity (B, L)."""
        out = {}
        if "local" in self.cfg.scales:
            tokens = self.fc(self._project(batch.local))
            out["local"] = (tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        if "neighbor" in self.cfg.scales:
            valid = batch.neighbor_mask
            tokens = self.fc(self.neighbor_encoder(self._project(batch.neighbor), valid))
            if valid is None:
                valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            out["neighbor"] = (tokens, valid)
        if "global" in self.cfg.scales:
            tokens = self.fc(self._global_tokens(batch))[:, None]
            out["global"] = (tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        return out

    def encode_genes(self, y: torch.Tensor) -> torch.Tensor:
        """g: L2-normalised gene embedding (B, E)."""
        return F.normalize(self.gene_encoder(y), dim=-1)

    def forward(self, batch: Batch, y: torch.Tensor | None = None) -> dict[str, Any]:
        """Outputs: pred (B, G); f (B, E) the mean of all fused tokens; emb[scale] (B, E) the L2-normalised
        mean of that scale's *fused* tokens (t, n, gl of the paper); pooled[scale] the pre-fusion means (the
        TRIPLEX branches); g when y is given.

        Masked (off-image) neighbour tiles stay out of fusion and out of every mean (the reference code
        averages them in); a local token that stands for several backbone tokens is weighted by that count.
        """
        scales = self.encode_scales(batch)
        tokens = torch.cat([t for t, _ in scales.values()], dim=1)
        valid = torch.cat([v for _, v in scales.values()], dim=1)
        weights = self._token_weights(batch, scales)
        fused = self.fusion(tokens, valid, weights)
        f = _masked_mean(fused, valid, weights)
        out: dict[str, Any] = {"f": f, "pred": self.regression(f), "pooled": {}, "emb": {}}
        start = 0
        for name, (t, v) in scales.items():
            part = slice(start, start + t.shape[1])
            start = part.stop
            w = None if weights is None else weights[..., part]
            out["emb"][name] = F.normalize(_masked_mean(fused[:, part], v, w), dim=-1)
            if self.cfg.objective == "triplex":
                out["pooled"][name] = _masked_mean(t, v, w)
        if y is not None and self.cfg.needs_gene_encoder:
            out["g"] = self.encode_genes(y)
        return out

    def _token_weights(self, batch: Batch, scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """(L,) backbone tokens per fused token: the cache's local-token weights, 1 for every other token."""
        if batch.token_weights is None or "local" not in scales or not self.cfg.local_token_weighting:
            return None
        parts = [batch.token_weights if name == "local" else torch.ones(t.shape[1], device=t.device)
                 for name, (t, _) in scales.items()]
        return torch.cat(parts).to(scales["local"][0].dtype)

    # -- objective ------------------------------------------------------------------------------------------
    def loss(self, out: dict[str, Any], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (only the parts that are switched on appear)."""
        if self.cfg.objective == "triplex":
            branches = [self.branch_heads[s](out["pooled"][s]) for s in self.cfg.scales]
            total, parts = triplex_loss(out["pred"], branches, y, self.cfg.triplex_alpha, self.cfg.triplex_detach_teacher)
        else:
            parts, _ = self.loss_terms(out, y)
            weights = self.term_weights()
            total = None
            for name, term in parts.items():  # unweighted terms enter as they are (no ×1 node: same gradients)
                weighted = weights[name] * term if name in weights else term
                total = weighted if total is None else total + weighted
        return total, {name: float(value.detach()) for name, value in parts.items()}

    def loss_terms(self, out: dict[str, Any], y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The Gene-DML objective's unweighted terms (regression, then instance and group when switched on; the
        loss is their sum, each times its `term_weights` entry if it has one) and the group loss's per-batch
        clusterings (empty without it)."""
        cfg = self.cfg
        terms = {"regression": regression_loss(out["pred"], y)}
        clusters: dict[str, torch.Tensor] = {}
        if cfg.instance:
            terms["instance"] = instance_loss(list(out["emb"].values()), out["g"], cfg.tau)
        if cfg.group:
            u = self.cluster_space_of(out["f"])
            v = self.cluster_space_of(out["g"])
            terms["group"], clusters = group_loss(
                out["f"], out["g"], u, v, cfg.groups, cfg.tau_group, cfg.group_form, cfg.kmeans_iters
            )
        return terms, clusters

    def term_weights(self) -> dict[str, float]:
        """Weights of the weighted terms of `loss_terms` (λ for the group term, `instance_weight` for the instance
        term when it is not 1); regression has weight 1."""
        weights = {"group": self.cfg.lambda_group}
        if self.cfg.instance_weight != 1.0:  # weight 1 adds no ×1 node, so the paper's loss stays bit-identical
            weights["instance"] = self.cfg.instance_weight
        return weights

    def cluster_space_of(self, x: torch.Tensor) -> torch.Tensor:
        """h(x) = L2normalise(Linear(x)), the cluster head shared by both modalities."""
        return F.normalize(self.cluster_head(x), dim=-1)

    @staticmethod
    def image_embedding(out: dict[str, Any]) -> torch.Tensor:
        """Retrieval query: normalised mean of the L2-normalised post-fusion scale embeddings t, n, gl.

        The instance loss aligns each of t, n, gl with g by cosine; the mean of unit vectors maximises the
        average cosine to g over the scales, so it is the query that lives in g's space. f is not aligned
        with g by that loss (and is not normalised), so it would be a poor query.
        """
        return F.normalize(torch.stack(list(out["emb"].values())).mean(dim=0), dim=-1)


class GeneDMLHead(NeuralHead):
    """Gene-DML as an estimator: `GeneDMLHead(GeneDMLSettings(...)).fit(...)`, then predict/embed."""

    name = "genedml"
    Settings = GeneDMLSettings
    settings: GeneDMLSettings

    def __init__(self, settings: GeneDMLSettings | None = None) -> None:
        super().__init__(settings)

    def build(self, in_dim: int, n_genes: int) -> nn.Module:
        return GeneDMLModel(self.settings, in_dim, n_genes)

    def fit(self, train: SpotFeatures | StreamedSpots, y_train: np.ndarray, *args: Any, **kwargs: Any) -> GeneDMLHead:
        rate = GeneDMLModel.input_dropout_rate(self.settings, int(train.dim))
        if self.settings.input_dropout == "auto" and rate > 0:  # say so: the authors' model has no such dropout
            log.info("%s: input dropout %.1f on the %d backbone channels in training (input_dropout=auto; "
                     "input_dropout=0 is the authors' model)", self.name, rate, int(train.dim))
        return super().fit(train, y_train, *args, **kwargs)

    def needs_neighbor(self) -> bool:
        return "neighbor" in self.settings.scales

    def batch_loss(self, batch: Batch, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        model = self._model()
        return model.loss(model(batch, y), y)

    def predict_batch(self, batch: Batch) -> torch.Tensor:
        return self._model()(batch)["pred"]

    def embed_image(self, feats: SpotFeatures) -> np.ndarray | None:
        """Normalised mean of the normalised scale embeddings (see `GeneDMLModel.image_embedding`)."""
        if not self.settings.instance:
            return None
        return self._batches(feats, lambda b: GeneDMLModel.image_embedding(self._model()(b)))

    def embed_genes(self, y: np.ndarray) -> np.ndarray | None:
        """g, the L2-normalised gene embedding (None without a gene encoder)."""
        if not self.settings.needs_gene_encoder:
            return None
        model = self._model()
        model.eval()
        with torch.no_grad():
            return model.encode_genes(self.scale_targets(y)).cpu().numpy()

    def cluster_space(self, feats_or_y: SpotFeatures | np.ndarray) -> np.ndarray | None:
        """u = h(f) for features, v = h(g) for targets (None without the group pathway)."""
        if not self.settings.group:
            return None
        model = self._model()
        if isinstance(feats_or_y, (SpotFeatures, StreamedSpots)):
            return self._batches(feats_or_y, lambda b: model.cluster_space_of(model(b)["f"]))
        model.eval()
        with torch.no_grad():
            g = model.encode_genes(self.scale_targets(feats_or_y))
            return model.cluster_space_of(g).cpu().numpy()
