"""The model directory written by `fit` and read by `predict`/`evaluate` (no pickle anywhere).

    MODEL_DIR/config.json          settings, gene panel, cache provenance, training summary
    MODEL_DIR/targets.json         TargetSpec: panel, normalisation, HEG/HVG lists
    MODEL_DIR/head/                the head (model.safetensors + head.json)
    MODEL_DIR/bank/                reference bank (gene embeddings + normalised expression) and FAISS index
    MODEL_DIR/prototypes.safetensors   group prototypes: centroids and mean expression profiles
    MODEL_DIR/curve.json, curve.png    training curve
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from genedml.errors import ModelDirError
from genedml.targets import TargetSpec

CONFIG = "config.json"
TARGETS = "targets.json"
HEAD_DIR = "head"
BANK_DIR = "bank"
INDEX_FILE = "index.faiss"  # the FAISS index inside BANK_DIR (fit writes it, predict reads it)
PROTOTYPES = "prototypes.safetensors"


@dataclass
class Prototypes:
    """K expression programs: centroid in the embedding space and mean normalised expression."""

    centroids: np.ndarray
    expression: np.ndarray
    sizes: np.ndarray

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """Nearest prototype (cosine) of each L2-normalised embedding."""
        c = self.centroids / np.maximum(np.linalg.norm(self.centroids, axis=1, keepdims=True), 1e-12)
        return np.argmax(embeddings @ c.T, axis=1).astype(np.int64)

    def save(self, path: Path) -> None:
        save_file({"centroids": self.centroids.astype(np.float32), "expression": self.expression.astype(np.float32),
                   "sizes": self.sizes.astype(np.int64)}, str(path))

    @classmethod
    def load(cls, path: Path) -> "Prototypes":
        t = load_file(str(path))
        return cls(t["centroids"], t["expression"], t["sizes"])


def fit_prototypes(embeddings: np.ndarray, expression: np.ndarray, k: int, seed: int) -> Prototypes:
    """K-means over the reference bank's gene embeddings, after training (k-means++ with a fixed seed)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(embeddings)))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    labels = km.labels_
    expr = np.stack([expression[labels == j].mean(axis=0) if (labels == j).any() else np.zeros(expression.shape[1]) for j in range(k)])
    return Prototypes(km.cluster_centers_.astype(np.float32), expr.astype(np.float32), np.bincount(labels, minlength=k))


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is not a genedml model directory (no {CONFIG}). Train one with `genedml fit`.")
    return json.loads(path.read_text())


def read_targets(model_dir: str | Path) -> TargetSpec:
    path = Path(model_dir) / TARGETS
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no {TARGETS}; the model directory is incomplete.")
    return TargetSpec.from_json(path.read_text())
