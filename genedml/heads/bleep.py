"""BLEEP (NeurIPS 2023) on the pooled local token: CLIP-style projections, prediction by top-k retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genedml.errors import ConfigError, ModelDirError
from genedml.heads.base import Progress, check_targets
from genedml.heads.batch import Batch
from genedml.heads.features import SpotFeatures
from genedml.heads.layers import ProjectionHead
from genedml.heads.losses import instance_loss
from genedml.heads.training import NeuralHead, TrainSettings



@dataclass(frozen=True)
class BleepSettings(TrainSettings):
    """BLEEP: projection heads for the pooled local token and the expression; soft-target CLIP loss.

    BLEEP itself trains unnormalised 256-d projections with temperature 1; `normalize=True` uses cosine logits.
    (Named `temperature`, not `tau`, so the Gene-DML instance τ of a shared flag set does not leak in.)
    Prediction = mean expression of the top_k training spots by cosine (the bank is stored with the head).
    """

    proj_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    normalize: bool = False
    top_k: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.proj_dim, int) or self.proj_dim < 1:
            raise ConfigError(f"bleep setting proj_dim must be an integer >= 1, got {self.proj_dim!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"bleep setting top_k must be an integer >= 1, got {self.top_k!r}")
        if not self.temperature > 0:
            raise ConfigError(f"bleep setting temperature must be > 0, got {self.temperature!r}")


class BleepModel(nn.Module):
    """Two projection heads; the retrieval bank (keys = normalised expression embeddings, values = Y)."""

    def __init__(self, cfg: BleepSettings, in_dim: int, n_genes: int, bank_size: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_proj = ProjectionHead(in_dim, cfg.proj_dim, cfg.dropout)
        self.gene_proj = ProjectionHead(n_genes, cfg.proj_dim, cfg.dropout)
        self.register_buffer("bank_keys", torch.zeros(bank_size, cfg.proj_dim))
        self.register_buffer("bank_values", torch.zeros(bank_size, n_genes))

    def image(self, batch: Batch) -> torch.Tensor:
        return self.image_proj(batch.local[:, 0])

    def retrieve(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Mean of the values of the top-k keys by cosine similarity."""
        sims = F.normalize(query, dim=-1) @ keys.T
        top = sims.topk(min(self.cfg.top_k, len(keys)), dim=-1).indices
        return values[top].mean(dim=1)


class BleepHead(NeuralHead):
    """BLEEP as an estimator; predictions are retrievals from the training spots' bank."""

    name = "bleep"
    Settings = BleepSettings
    settings: BleepSettings

    def __init__(self, settings: BleepSettings | None = None) -> None:
        super().__init__(settings)
        self.bank_size_ = 0

    def build(self, in_dim: int, n_genes: int) -> nn.Module:
        return BleepModel(self.settings, in_dim, n_genes, self.bank_size_)

    def fitted_state(self) -> dict[str, Any]:
        return {**super().fitted_state(), "bank_size": self.bank_size_}

    def restore_fitted(self, fitted: dict[str, Any]) -> None:
        super().restore_fitted(fitted)
        self.bank_size_ = int(fitted.get("bank_size", 0))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.settings.normalize else x

    def batch_loss(self, batch: Batch, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        model = self._model()
        loss = instance_loss([self._embed(model.image(batch))], self._embed(model.gene_proj(y)), self.settings.temperature)
        return loss, {"instance": float(loss.detach())}

    def _keys(self, y: np.ndarray) -> torch.Tensor:
        model = self._model()
        model.eval()
        with torch.no_grad():
            return F.normalize(model.gene_proj(self.scale_targets(y)), dim=-1)

    def predict_batch(self, batch: Batch) -> torch.Tensor:
        model = self._model()
        if len(model.bank_keys) == 0:
            raise ModelDirError("the bleep head has no reference bank: fit it first")
        return model.retrieve(model.image(batch), model.bank_keys, model.bank_values)

    def fit(self, train: SpotFeatures, y_train: np.ndarray, val: SpotFeatures | None = None,
            y_val: np.ndarray | None = None, *, progress: Progress | None = None) -> Self:
        self.bank_size_ = 0
        self._train_y = check_targets(train, y_train)
        return super().fit(train, y_train, val, y_val, progress=progress)

    def validation_pcc(self, val: SpotFeatures, y_val: np.ndarray) -> float:
        # Retrieval against the current embeddings of the training spots.
        self.after_fit(None, self._train_y)  # type: ignore[arg-type]
        return super().validation_pcc(val, y_val)

    def after_fit(self, train: SpotFeatures, y_train: np.ndarray) -> None:
        model = self._model()
        model.bank_keys = self._keys(y_train)
        model.bank_values = self.scale_targets(y_train)
        self.bank_size_ = len(y_train)

    def embed_image(self, feats: SpotFeatures) -> np.ndarray | None:
        return self._batches(feats, lambda b: F.normalize(self._model().image(b), dim=-1))

    def embed_genes(self, y: np.ndarray) -> np.ndarray | None:
        return self._keys(y).cpu().numpy()
