"""One estimator shape for every head (ridge, bleep, triplex, genedml) and the registry that names them."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np

from genedml.errors import ConfigError, InputError, ModelDirError
from genedml.heads.features import SpotFeatures

HEAD_JSON = "head.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1

Progress = Callable[[int, dict[str, float], float], None]  # (epoch, loss parts, validation PCC)

HEADS: dict[str, type["Head"]] = {}
H = TypeVar("H", bound=type["Head"])


def register(name: str) -> Callable[[H], H]:
    """Class decorator: make a head available to `make_head(name)`."""

    def add(cls: H) -> H:
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


def make_head(name: str, **cfg: Any) -> "Head":
    """A fresh, unfitted head by registry name with settings `cfg` (unknown settings are an error)."""
    # Importing the implementations fills the registry; done here to keep `base` free of torch at import.
    from genedml.heads import baselines, gene_dml  # noqa: F401

    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](**cfg)


def available_heads() -> list[str]:
    """Names `make_head` accepts."""
    from genedml.heads import baselines, gene_dml  # noqa: F401

    return sorted(HEADS)


def accepted_settings(name: str) -> set[str]:
    """Setting names `make_head(name, ...)` accepts (lets a shared flag set be filtered per head)."""
    from genedml.heads import baselines, gene_dml  # noqa: F401

    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return {f.name for cls in HEADS[name].settings_classes() for f in fields(cls)}


def load_head(directory: str | Path) -> "Head":
    """Load any saved head; its kind is read from head.json."""
    from genedml.heads import baselines, gene_dml  # noqa: F401

    meta = read_head_json(directory)
    name = meta.get("head")
    if name not in HEADS:
        raise ModelDirError(f"{Path(directory) / HEAD_JSON} names head {name!r}, not one of {sorted(HEADS)}")
    return HEADS[name].load(directory)


def split_settings(cfg: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Split flat settings between config dataclasses by field name; unknown names raise ConfigError."""
    names = [{f.name for f in fields(c)} for c in classes]
    unknown = set(cfg) - set().union(*names)
    if unknown:
        valid = sorted(set().union(*names))
        raise ConfigError(f"unknown head setting(s) {sorted(unknown)}; valid settings: {valid}")
    return [{k: v for k, v in cfg.items() if k in n} for n in names]


def read_head_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / HEAD_JSON
    if not path.is_file():
        raise ModelDirError(f"{path} not found: not a saved head directory (run `genedml fit` first)")
    return json.loads(path.read_text())


def write_head_json(directory: str | Path, meta: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / HEAD_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_saved(head_cls: type["Head"], directory: str | Path) -> tuple[dict[str, Any], Path]:
    """head.json of a saved head (checked to be of `head_cls`) and the path of its weights file."""
    meta = read_head_json(directory)
    if meta.get("head") != head_cls.name:
        raise ModelDirError(f"{directory} holds a {meta.get('head')!r} head, not {head_cls.name!r}")
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ModelDirError(f"{weights} not found; the model directory is incomplete")
    return meta, weights


def check_targets(feats: SpotFeatures, y: np.ndarray, what: str = "train") -> np.ndarray:
    """Targets as float32 (N, G) matching the features row for row."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[0] != len(feats):
        raise InputError(f"{what} targets have shape {y.shape}; expected ({len(feats)}, n_genes), one row per spot")
    if not np.isfinite(y).all():
        bad = np.flatnonzero(~np.isfinite(y).all(axis=1))[:5]
        raise InputError(f"{what} targets contain NaN/inf (rows {bad.tolist()}...); normalise counts first")
    return y


class Head(ABC):
    """Estimator interface shared by all heads."""

    name: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def settings_classes(cls) -> tuple[type, ...]:
        """The config dataclasses whose fields are this head's settings."""

    @abstractmethod
    def fit(
        self,
        train: SpotFeatures,
        y_train: np.ndarray,
        val: SpotFeatures | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Fit on (train, y_train); select/early-stop on (val, y_val) when given. Returns the history."""

    @abstractmethod
    def predict(self, feats: SpotFeatures) -> np.ndarray:
        """Predicted targets (N, G) float32."""

    def embed_image(self, feats: SpotFeatures) -> np.ndarray | None:
        """L2-normalised retrieval query per spot, or None when the head has no joint space."""
        return None

    def embed_genes(self, y: np.ndarray) -> np.ndarray | None:
        """L2-normalised expression embedding per spot, or None when the head has no joint space."""
        return None

    def cluster_space(self, feats_or_y: SpotFeatures | np.ndarray) -> np.ndarray | None:
        """Points in the space the group pathway clusters, or None."""
        return None

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """All settings, flat and JSON-able; `make_head(name, **config())` rebuilds an unfitted twin."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write model.safetensors + head.json into `directory`."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> "Head":
        """Read a head written by `save`."""
