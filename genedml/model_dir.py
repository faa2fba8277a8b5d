"""The model directory written by `fit` and read by `predict`/`evaluate` (no pickle anywhere).

    MODEL_DIR/config.json          settings, gene panel, cache provenance, training summary
    MODEL_DIR/targets.json         TargetSpec: panel, normalisation, HEG/HVG lists
    MODEL_DIR/head/                the head (model.safetensors + head.json)
    MODEL_DIR/bank/                reference bank (gene embeddings + normalised expression) and FAISS index
    MODEL_DIR/prototypes.safetensors   group prototypes: centroids and mean expression profiles
    MODEL_DIR/curve.json, curve.png    training curve
    MODEL_DIR/MANIFEST.json        every file's size and SHA-256, written last (see genedml.atomic_dir)

`fit` writes the whole directory under a staging name and renames it into place, so a reader sees a complete
old or a complete new model; `open_model_dir` refuses a directory whose files differ from its manifest.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load_file, save_file

from genedml.atomic_dir import MANIFEST, check_destination, read_manifest, resolve_dir, staged_dir, verify_dir
from genedml.errors import ModelDirError
from genedml.log import log
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


WHAT = "genedml model directory"
READ_BY_PREDICT = (CONFIG, TARGETS, PROTOTYPES, HEAD_DIR + "/", BANK_DIR + "/")


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / MANIFEST).is_file()


def check_model_out(out: str | Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, exists without `overwrite`, is another kind of folder, or is not writable."""
    check_destination(Path(out), overwrite, is_model_dir, WHAT)


@contextlib.contextmanager
def staged_model_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder to write a model into; renamed to `out` (with a manifest) when the block succeeds."""
    with staged_dir(Path(out), overwrite, is_model_dir, WHAT) as stage:
        yield stage


def open_model_dir(model_dir: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(the directory to read, its verified manifest): refuses a missing, damaged or mixed model directory."""
    path = resolve_dir(Path(model_dir))
    if not (path / CONFIG).is_file():
        raise ModelDirError(f"{model_dir} is not a genedml model directory (no {CONFIG}). Train one with `genedml fit`.")
    manifest = verify_dir(path, watched=lambda name: name.startswith(READ_BY_PREDICT))
    if manifest is None:
        log.warning("%s has no %s (written by an older genedml): its files cannot be checked for consistency; "
                    "refit it to get one", model_dir, MANIFEST)
    return path, manifest


def manifest_id(model_dir: Path) -> str | None:
    """The id of the model directory's manifest (changes whenever the directory is replaced)."""
    manifest = read_manifest(model_dir)
    return None if manifest is None else str(manifest.get("id"))


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is not a genedml model directory (no {CONFIG}). Train one with `genedml fit`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON ({exc}); the model directory is damaged.") from None


def read_targets(model_dir: str | Path) -> TargetSpec:
    path = Path(model_dir) / TARGETS
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no {TARGETS}; the model directory is incomplete.")
    try:
        return TargetSpec.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(f"{path} is unreadable ({exc}); the model directory is damaged.") from None
