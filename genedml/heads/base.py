"""One estimator shape for every head (ridge, bleep, triplex, genedml), after scikit-learn's contract.

A head is built from one frozen settings dataclass (every parameter visible, nothing else), `fit` returns
the fitted head, and fitted state lives in attributes ending in `_` (`history_`, dimensions, weights), never
in the settings. The registry that names heads is `genedml.heads.registry`.
"""

from __future__ import annotations

import difflib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Self, get_type_hints

import numpy as np

from genedml.errors import ConfigError, InputError, ModelDirError
from genedml.heads.features import SpotFeatures
from genedml.jsonio import dumps
from genedml.typed import typed_value

HEAD_JSON = "head.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2 (genedml 0.2): settings and fitted state apart; reference attention/feed-forward layers

Progress = Callable[[int, dict[str, float], float], None]  # (epoch, loss parts, validation PCC)


def read_head_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / HEAD_JSON
    if not path.is_file():
        raise ModelDirError(f"{path} not found: not a saved head directory (run `genedml fit` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path} is not valid JSON ({exc}); the model directory is damaged") from None


def write_head_json(directory: str | Path, meta: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / HEAD_JSON).write_text(dumps({"format_version": FORMAT_VERSION, **meta}))


FITTED_KEYS_V1 = ("in_dim", "n_genes", "bank_size")  # format 1 kept fitted dimensions inside the settings


def read_saved(head_cls: type["Head"], directory: str | Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(settings dict, fitted-state dict, weights path) of a saved head checked to be of `head_cls`."""
    meta = read_head_json(directory)
    if meta.get("head") != head_cls.name:
        raise ModelDirError(f"{directory} holds a {meta.get('head')!r} head, not {head_cls.name!r}")
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise ModelDirError(f"{weights} not found; the model directory is incomplete")
    config = dict(meta.get("config", {}))
    fitted = dict(meta.get("fitted", {}))
    for key in FITTED_KEYS_V1:
        if key in config:
            fitted.setdefault(key, config.pop(key))
    fitted["history"] = meta.get("history", {})
    fitted["format_version"] = meta.get("format_version", 1)
    return config, fitted, weights


def setting_names(settings_cls: type) -> list[str]:
    """Field names of a settings dataclass, in declaration order."""
    return [f.name for f in fields(settings_cls)]


def unknown_setting(key: str, valid: list[str], where: str) -> ConfigError:
    """The error for a setting nobody accepts, naming the closest valid name."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return ConfigError(f"unknown setting {key!r} for {where}{hint} Valid settings: {', '.join(valid)}.")


def build_settings(settings_cls: type, values: Mapping[str, Any], where: str) -> Any:
    """`settings_cls(**values)` with each value checked against its annotated type (JSON lists become
    tuples); unknown keys, wrong types and out-of-range values → ConfigError naming the setting."""
    valid = setting_names(settings_cls)
    hints = get_type_hints(settings_cls)
    clean: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in valid:
            raise unknown_setting(key, valid, where)
        clean[key] = typed_value(value, hints[key], f"setting {key} of {where}")
    try:
        return settings_cls(**clean)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings for {where}: {exc}") from None


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
    """Estimator interface shared by all heads: `Head(settings).fit(...)` → fitted head."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type]  # the frozen settings dataclass of this head

    def __init__(self, settings: Any = None) -> None:
        if settings is None:
            settings = self.Settings()
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(settings).__name__}")
        self.settings = settings
        self.history_: dict[str, Any] = {}

    @abstractmethod
    def fit(
        self,
        train: SpotFeatures,
        y_train: np.ndarray,
        val: SpotFeatures | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> Self:
        """Fit on (train, y_train); select/early-stop on (val, y_val) when given. History in `history_`."""

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

    @classmethod
    def settings_from(cls, values: Mapping[str, Any]) -> Any:
        """This head's settings from a flat mapping; an unknown key is a ConfigError naming the closest one."""
        return build_settings(cls.Settings, values, f"the {cls.name} head")

    def config(self) -> dict[str, Any]:
        """The settings as a flat JSON-able dict; `head_settings(name, config())` rebuilds them."""
        out = asdict(self.settings)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write model.safetensors + head.json into `directory`."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> Self:
        """Read a head written by `save`."""
