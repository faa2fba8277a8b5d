"""Ridge probes on the pooled local token: the HEST-Benchmark probe (fixed alpha) and a tuned-alpha variant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold, KFold
from sklearn.preprocessing import StandardScaler

from genedml.errors import ConfigError, ModelDirError
from genedml.heads.base import WEIGHTS, Head, Progress, check_targets, read_saved, write_head_json
from genedml.heads.features import SpotFeatures
from genedml.metrics import mean_gene_pcc


@dataclass(frozen=True)
class RidgeSettings:
    """HEST probe: StandardScaler → PCA(n_components) → Ridge(alpha) on the pooled local token.

    alpha None = the HEST value 100 / (n_features · n_genes), n_features counted after PCA (as HEST does).
    fit_intercept: HEST fits none, so its predictions are centred on 0 rather than on the genes' level; PCC
    is the same either way (the PCA scores are centred), but the predicted values are only expression with
    an intercept, so that is the default here and `genedml bench hest` sets False for parity.
    """

    n_components: int = 256
    alpha: float | None = None
    fit_intercept: bool = True
    alphas: tuple[float, ...] = tuple(np.logspace(-3, 5, 17).round(6).tolist())  # ridge-cv grid
    cv_folds: int = 5
    seed: int = 2021

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if not isinstance(self.n_components, int) or self.n_components < 1:
            raise ConfigError(f"ridge setting n_components must be an integer >= 1, got {self.n_components!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"ridge setting alpha must be > 0, got {self.alpha!r}")
        if not self.alphas or min(self.alphas) <= 0:
            raise ConfigError(f"ridge setting alphas must be positive numbers, got {list(self.alphas)}")
        if not isinstance(self.cv_folds, int) or self.cv_folds < 2:
            raise ConfigError(f"ridge setting cv_folds must be an integer >= 2, got {self.cv_folds!r}")


def _pooled(feats: SpotFeatures) -> np.ndarray:
    return np.asarray(feats.local[:, 0, :], dtype=np.float64)


def _ridge_path(z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge coefficients (A, k, G) for every alpha at once, from one SVD of z."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ y  # (r, G)
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # (A, r)
    return np.einsum("kr,ar,rg->akg", vt.T, shrink, uty)


class RidgeHead(Head):
    """Linear probe, fitted with scikit-learn's scaler/PCA and a closed-form ridge; predicts with numpy."""

    name = "ridge"
    Settings = RidgeSettings
    settings: RidgeSettings

    def __init__(self, settings: RidgeSettings | None = None) -> None:
        super().__init__(settings)
        self.arrays_: dict[str, np.ndarray] = {}

    def _project(self, x: np.ndarray, arrays: dict[str, np.ndarray] | None = None) -> np.ndarray:
        a = self.arrays_ if arrays is None else arrays
        return ((x - a["scaler_mean"]) / a["scaler_scale"] - a["pca_mean"]) @ a["pca_components"].T

    def _reduce(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Fit scaler + PCA on x; returns their arrays."""
        scaler = StandardScaler().fit(x)
        n = min(self.settings.n_components, x.shape[0], x.shape[1])
        pca = PCA(n_components=n, svd_solver="full").fit(scaler.transform(x))
        return {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
        }

    def _solve(self, z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients (A, k, G) and intercepts (A, G), one per alpha."""
        if not self.settings.fit_intercept:
            return _ridge_path(z, y, alphas), np.zeros((len(alphas), y.shape[1]))
        z_mean, y_mean = z.mean(axis=0), y.mean(axis=0)
        coef = _ridge_path(z - z_mean, y - y_mean, alphas)
        return coef, y_mean - np.einsum("k,akg->ag", z_mean, coef)

    def choose_alpha(self, x: np.ndarray, y: np.ndarray, feats: SpotFeatures) -> tuple[float, dict[str, Any]]:
        """The HEST alpha (or the configured one); overridden by ridge-cv."""
        n = min(self.settings.n_components, x.shape[0], x.shape[1])
        alpha = self.settings.alpha if self.settings.alpha is not None else 100.0 / (n * y.shape[1])
        return float(alpha), {}

    def fit(
        self,
        train: SpotFeatures,
        y_train: np.ndarray,
        val: SpotFeatures | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> Self:
        start = time.perf_counter()
        y = check_targets(train, y_train).astype(np.float64)
        x = _pooled(train)
        alpha, search = self.choose_alpha(x, y, train)
        arrays = self._reduce(x)
        coef, intercept = self._solve(self._project(x, arrays), y, np.array([alpha]))
        self.arrays_ = {**arrays, "coef": coef[0].T, "intercept": intercept[0]}  # coef (G, k) as sklearn
        val_pcc = None
        if val is not None:
            val_pcc = mean_gene_pcc(self.predict(val), check_targets(val, y_val, "validation"))
        if progress is not None:
            progress(0, {}, float("nan") if val_pcc is None else val_pcc)
        self.history_ = {"alpha": alpha, "val_pcc": val_pcc, "n_components": int(arrays["pca_components"].shape[0]),
                        **search, "seconds": time.perf_counter() - start}
        return self

    def predict(self, feats: SpotFeatures) -> np.ndarray:
        if not self.arrays_:
            raise ModelDirError(f"the {self.name} head is not fitted: call fit() or load() first")
        z = self._project(_pooled(feats))
        return (z @ self.arrays_["coef"].T + self.arrays_["intercept"]).astype(np.float32)

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_arrays({k: np.ascontiguousarray(v) for k, v in self.arrays_.items()}, str(path / WEIGHTS))
        write_head_json(path, {"head": self.name, "config": self.config(), "fitted": {}, "history": self.history_})

    @classmethod
    def load(cls, directory: str | Path) -> Self:
        config, fitted, weights = read_saved(cls, directory)
        head = cls(cls.settings_from(config))
        head.arrays_ = dict(load_arrays(str(weights)))
        head.history_ = fitted.get("history", {})
        return head


class RidgeCVHead(RidgeHead):
    """Ridge probe with alpha tuned by inner CV (GroupKFold over slides when ≥2, else shuffled KFold)."""

    name = "ridge-cv"

    def choose_alpha(self, x: np.ndarray, y: np.ndarray, feats: SpotFeatures) -> tuple[float, dict[str, Any]]:
        alphas = np.asarray(self.settings.alphas, dtype=np.float64)
        groups = feats.slide
        n_groups = len(np.unique(groups))
        if n_groups >= 2:
            splitter = GroupKFold(n_splits=min(self.settings.cv_folds, n_groups))
            splits = list(splitter.split(x, y, groups))
            scheme = f"GroupKFold({splitter.n_splits}) over slides"
        else:
            splitter = KFold(n_splits=min(self.settings.cv_folds, len(x)), shuffle=True, random_state=self.settings.seed)
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
