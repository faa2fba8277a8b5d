"""Baseline heads on the same features: HEST ridge probe (fixed and tuned alpha), BLEEP, TRIPLEX."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold, KFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from genedml.errors import ModelDirError
from genedml.heads.base import (
    WEIGHTS,
    Head,
    Progress,
    check_targets,
    read_saved,
    register,
    split_settings,
    write_head_json,
)
from genedml.heads.batch import Batch
from genedml.heads.features import SpotFeatures
from genedml.heads.gene_dml import GeneDMLHead
from genedml.heads.layers import ProjectionHead
from genedml.heads.losses import instance_loss
from genedml.heads.training import NeuralHead, mean_gene_pcc

# --------------------------------------------------------------------------------------------------- ridge


@dataclass
class RidgeConfig:
    """HEST probe: StandardScaler → PCA(n_components) → Ridge(alpha, no intercept) on the pooled local token.

    alpha None = the HEST value 100 / (n_features · n_genes), n_features counted after PCA (as HEST does).
    """

    n_components: int = 256
    alpha: float | None = None
    fit_intercept: bool = False
    alphas: tuple[float, ...] = tuple(np.logspace(-3, 5, 17).round(6).tolist())  # ridge-cv grid
    cv_folds: int = 5
    seed: int = 2021


def _pooled(feats: SpotFeatures) -> np.ndarray:
    return np.asarray(feats.local[:, 0, :], dtype=np.float64)


def _ridge_path(z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge coefficients (A, k, G) for every alpha at once, from one SVD of z."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ y  # (r, G)
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # (A, r)
    return np.einsum("kr,ar,rg->akg", vt.T, shrink, uty)


@register("ridge")
class RidgeHead(Head):
    """Linear probe, fitted with scikit-learn's scaler/PCA and a closed-form ridge; predicts with numpy."""

    @classmethod
    def settings_classes(cls) -> tuple[type, ...]:
        return (RidgeConfig,)

    def __init__(self, **cfg: Any) -> None:
        (settings,) = split_settings(cfg, RidgeConfig)
        if "alphas" in settings:
            settings["alphas"] = tuple(float(a) for a in settings["alphas"])
        self.cfg = RidgeConfig(**settings)
        self.arrays: dict[str, np.ndarray] = {}
        self.history: dict[str, Any] = {}

    def _project(self, x: np.ndarray, arrays: dict[str, np.ndarray] | None = None) -> np.ndarray:
        a = self.arrays if arrays is None else arrays
        return ((x - a["scaler_mean"]) / a["scaler_scale"] - a["pca_mean"]) @ a["pca_components"].T

    def _reduce(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Fit scaler + PCA on x; returns their arrays."""
        scaler = StandardScaler().fit(x)
        n = min(self.cfg.n_components, x.shape[0], x.shape[1])
        pca = PCA(n_components=n, svd_solver="full").fit(scaler.transform(x))
        return {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
        }

    def _solve(self, z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients (A, k, G) and intercepts (A, G), one per alpha."""
        if not self.cfg.fit_intercept:
            return _ridge_path(z, y, alphas), np.zeros((len(alphas), y.shape[1]))
        z_mean, y_mean = z.mean(axis=0), y.mean(axis=0)
        coef = _ridge_path(z - z_mean, y - y_mean, alphas)
        return coef, y_mean - np.einsum("k,akg->ag", z_mean, coef)

    def choose_alpha(self, x: np.ndarray, y: np.ndarray, feats: SpotFeatures) -> tuple[float, dict[str, Any]]:
        """The HEST alpha (or the configured one); overridden by ridge-cv."""
        n = min(self.cfg.n_components, x.shape[0], x.shape[1])
        alpha = self.cfg.alpha if self.cfg.alpha is not None else 100.0 / (n * y.shape[1])
        return float(alpha), {}

    def fit(
        self,
        train: SpotFeatures,
        y_train: np.ndarray,
        val: SpotFeatures | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        y = check_targets(train, y_train).astype(np.float64)
        x = _pooled(train)
        alpha, search = self.choose_alpha(x, y, train)
        arrays = self._reduce(x)
        coef, intercept = self._solve(self._project(x, arrays), y, np.array([alpha]))
        self.arrays = {**arrays, "coef": coef[0].T, "intercept": intercept[0]}  # coef (G, k) as sklearn
        val_pcc = None
        if val is not None:
            val_pcc = mean_gene_pcc(self.predict(val), check_targets(val, y_val, "validation"))
        if progress is not None:
            progress(0, {}, float("nan") if val_pcc is None else val_pcc)
        self.history = {"alpha": alpha, "val_pcc": val_pcc, "n_components": int(arrays["pca_components"].shape[0]),
                        **search, "seconds": time.perf_counter() - start}
        return self.history

    def predict(self, feats: SpotFeatures) -> np.ndarray:
        if not self.arrays:
            raise ModelDirError(f"the {self.name} head is not fitted: call fit() or load() first")
        z = self._project(_pooled(feats))
        return (z @ self.arrays["coef"].T + self.arrays["intercept"]).astype(np.float32)

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["alphas"] = list(self.cfg.alphas)
        return out

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_arrays({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(path / WEIGHTS))
        write_head_json(path, {"head": self.name, "config": self.config(), "history": self.history})

    @classmethod
    def load(cls, directory: str | Path) -> "RidgeHead":
        meta, weights = read_saved(cls, directory)
        head = cls(**meta["config"])
        head.arrays = dict(load_arrays(str(weights)))
        head.history = meta.get("history", {})
        return head


@register("ridge-cv")
class RidgeCVHead(RidgeHead):
    """Ridge probe with alpha tuned by inner CV (GroupKFold over slides when ≥2, else shuffled KFold)."""

    def choose_alpha(self, x: np.ndarray, y: np.ndarray, feats: SpotFeatures) -> tuple[float, dict[str, Any]]:
        alphas = np.asarray(self.cfg.alphas, dtype=np.float64)
        groups = feats.slide
        n_groups = len(np.unique(groups))
        if n_groups >= 2:
            splitter = GroupKFold(n_splits=min(self.cfg.cv_folds, n_groups))
            splits = list(splitter.split(x, y, groups))
            scheme = f"GroupKFold({splitter.n_splits}) over slides"
        else:
            splitter = KFold(n_splits=min(self.cfg.cv_folds, len(x)), shuffle=True, random_state=self.cfg.seed)
            splits = list(splitter.split(x))
            scheme = f"KFold({splitter.n_splits}), one slide"
        scores = np.zeros(len(alphas))
        for fit_rows, held_rows in splits:
            arrays = self._reduce(x[fit_rows])
            coef, intercept = self._solve(self._project(x[fit_rows], arrays), y[fit_rows], alphas)
            z_held = self._project(x[held_rows], arrays)
            for a in range(len(alphas)):
                pred = z_held @ coef[a] + intercept[a]
                scores[a] += np.nan_to_num(mean_gene_pcc(pred, y[held_rows]), nan=-1.0) / len(splits)
        best = int(np.argmax(scores))
        return float(alphas[best]), {"cv": scheme, "cv_alphas": alphas.tolist(), "cv_pcc": scores.tolist()}


# --------------------------------------------------------------------------------------------------- BLEEP


@dataclass
class BleepConfig:
    """BLEEP: projection heads for the pooled local token and the expression; soft-target CLIP loss.

    BLEEP itself trains unnormalised 256-d projections with temperature 1; `normalize=True` uses cosine logits.
    (Named `temperature`, not `tau`, so the Gene-DML instance τ of a shared flag set does not leak in.)
    Prediction = mean expression of the top_k training spots by cosine (the bank is stored with the head).
    """

    in_dim: int = 1024
    n_genes: int = 250
    proj_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    normalize: bool = False
    top_k: int = 50
    bank_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BleepModel(nn.Module):
    """Two projection heads; the retrieval bank (keys = normalised expression embeddings, values = Y)."""

    def __init__(self, cfg: BleepConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_proj = ProjectionHead(cfg.in_dim, cfg.proj_dim, cfg.dropout)
        self.gene_proj = ProjectionHead(cfg.n_genes, cfg.proj_dim, cfg.dropout)
        self.register_buffer("bank_keys", torch.zeros(cfg.bank_size, cfg.proj_dim))
        self.register_buffer("bank_values", torch.zeros(cfg.bank_size, cfg.n_genes))

    def image(self, batch: Batch) -> torch.Tensor:
        return self.image_proj(batch.local[:, 0])

    def retrieve(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Mean of the values of the top-k keys by cosine similarity."""
        sims = F.normalize(query, dim=-1) @ keys.T
        top = sims.topk(min(self.cfg.top_k, len(keys)), dim=-1).indices
        return values[top].mean(dim=1)


@register("bleep")
class BleepHead(NeuralHead):
    model_config_cls = BleepConfig

    def build(self, in_dim: int, n_genes: int) -> nn.Module:
        self.model_cfg.in_dim, self.model_cfg.n_genes = int(in_dim), int(n_genes)
        return BleepModel(self.model_cfg)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.model_cfg.normalize else x

    def batch_loss(self, batch: Batch, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        model = self._model()
        loss = instance_loss([self._embed(model.image(batch))], self._embed(model.gene_proj(y)), self.model_cfg.temperature)
        return loss, {"instance": float(loss.detach())}

    def _keys(self, y: np.ndarray) -> torch.Tensor:
        model = self._model()
        model.eval()
        with torch.no_grad():
            return F.normalize(model.gene_proj(self.genes_tensor(y)), dim=-1)

    def predict_batch(self, batch: Batch) -> torch.Tensor:
        model = self._model()
        if len(model.bank_keys) == 0:
            raise ModelDirError("the bleep head has no reference bank: fit it first")
        return model.retrieve(model.image(batch), model.bank_keys, model.bank_values)

    def fit(self, train: SpotFeatures, y_train: np.ndarray, val: SpotFeatures | None = None,
            y_val: np.ndarray | None = None, *, progress: Progress | None = None) -> dict[str, Any]:
        self.model_cfg.bank_size = 0
        self._train_y = check_targets(train, y_train)
        return super().fit(train, y_train, val, y_val, progress=progress)

    def validation_pcc(self, val: SpotFeatures, y_val: np.ndarray) -> float:
        # Retrieval against the current embeddings of the training spots.
        self.after_fit(None, self._train_y)  # type: ignore[arg-type]
        return super().validation_pcc(val, y_val)

    def after_fit(self, train: SpotFeatures, y_train: np.ndarray) -> None:
        model = self._model()
        model.bank_keys = self._keys(y_train)
        model.bank_values = self.genes_tensor(y_train)
        self.model_cfg.bank_size = len(y_train)

    def embed_image(self, feats: SpotFeatures) -> np.ndarray | None:
        return self._batches(feats, lambda b: F.normalize(self._model().image(b), dim=-1))

    def embed_genes(self, y: np.ndarray) -> np.ndarray | None:
        return self._keys(y).cpu().numpy()


# --------------------------------------------------------------------------------------------------- TRIPLEX


@register("triplex")
class TriplexHead(GeneDMLHead):
    """TRIPLEX objective on the Gene-DML encoders: MSE(fusion) + per-branch MSE and distillation, α = 0.3."""

    def __init__(self, **cfg: Any) -> None:
        cfg = {"objective": "triplex", "instance": False, "group": False, **cfg}
        super().__init__(**cfg)
