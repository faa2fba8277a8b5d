"""Training loop and save/load shared by the neural heads (method.md §1.4).

Adam, StepLR(20, 0.95), batch 512, up to 200 epochs, early stopping on the validation mean per-gene PCC with
patience 20 and the best weights restored. Without a validation set every epoch is run and the last weights
are kept (the toolkit carves the validation split from the training samples; selecting on the test fold, as
the reference code does, is optimistic).
"""

from __future__ import annotations

import contextlib
import time
from abc import abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genedml.errors import ModelDirError
from genedml.heads.base import WEIGHTS, Head, Progress, check_targets, read_saved, split_settings, write_head_json
from genedml.heads.batch import Batch, BatchMaker
from genedml.heads.features import SpotFeatures


@dataclass
class TrainConfig:
    """Optimisation settings; JSON round-trip via to_dict/from_dict."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    step_size: int = 20
    gamma: float = 0.95
    batch_size: int = 512
    eval_batch_size: int = 1024
    epochs: int = 200
    patience: int = 20
    seed: int = 2021
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def mean_gene_pcc(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over genes of Pearson r across spots; genes constant in y or pred are left out (NaN if all)."""
    p = pred - pred.mean(axis=0)
    t = y - y.mean(axis=0)
    denom = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    ok = denom > 1e-12
    if not ok.any():
        return float("nan")
    return float(((p * t).sum(axis=0)[ok] / denom[ok]).mean())


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU (cheap there); left as is on GPU, where it needs a cuBLAS workspace."""
    if device.type != "cpu":
        yield
        return
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


class NeuralHead(Head):
    """A head backed by an nn.Module trained with `TrainConfig`. Subclasses build the model and the loss."""

    model_config_cls: type

    @classmethod
    def settings_classes(cls) -> tuple[type, ...]:
        return (cls.model_config_cls, TrainConfig)

    def __init__(self, **cfg: Any) -> None:
        model_cfg, train_cfg = split_settings(cfg, *self.settings_classes())
        self.model_cfg = self.model_config_cls(**model_cfg)
        self.train_cfg = TrainConfig(**train_cfg)
        self.model: nn.Module | None = None
        self.history: dict[str, Any] = {}

    # -- subclass hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def build(self, in_dim: int, n_genes: int) -> nn.Module:
        """The model for D-dimensional features and G genes (also sets the config's dims)."""

    @abstractmethod
    def batch_loss(self, batch: Batch, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its named parts on one training batch."""

    @abstractmethod
    def predict_batch(self, batch: Batch) -> torch.Tensor:
        """Predictions (B, G) for one batch in eval mode."""

    def needs_neighbor(self) -> bool:
        return False

    def after_fit(self, train: SpotFeatures, y_train: np.ndarray) -> None:
        """Hook run after the best weights are restored (e.g. store a retrieval bank)."""

    # -- shared machinery -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self._model().parameters()).device

    def _model(self) -> nn.Module:
        if self.model is None:
            raise ModelDirError(f"the {self.name} head is not fitted: call fit() or load() first")
        return self.model

    def _batches(self, feats: SpotFeatures, fn: Any) -> np.ndarray:
        """Apply fn(batch) over feats in eval mode, in order, and stack the numpy results."""
        model = self._model()
        model.eval()
        maker = BatchMaker(feats, self.device, self.needs_neighbor(), self._scaler())
        size = self.train_cfg.eval_batch_size
        with torch.no_grad():
            parts = [fn(maker.make(np.arange(i, min(i + size, len(feats))))).float().cpu().numpy()
                     for i in range(0, len(feats), size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def predict(self, feats: SpotFeatures) -> np.ndarray:
        return self._batches(feats, self.predict_batch)

    def validation_pcc(self, val: SpotFeatures, y_val: np.ndarray) -> float:
        return mean_gene_pcc(self.predict(val), y_val)

    def fit(
        self,
        train: SpotFeatures,
        y_train: np.ndarray,
        val: SpotFeatures | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        cfg = self.train_cfg
        y_train = check_targets(train, y_train)
        if val is not None:
            y_val = check_targets(val, y_val, "validation")
        device = cfg.torch_device()
        start = time.perf_counter()
        with deterministic(device):
            torch.manual_seed(cfg.seed)
            self.model = self._with_scaler(self.build(train.dim, y_train.shape[1]), train).to(device)
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
            generator = torch.Generator().manual_seed(cfg.seed)
            maker = BatchMaker(train, device, self.needs_neighbor(), self._scaler())
            targets = torch.from_numpy(y_train).to(device)
            epochs: list[dict[str, Any]] = []
            best = {"epoch": -1, "pcc": -np.inf, "state": None}
            for epoch in range(cfg.epochs):
                parts = self._train_epoch(maker, targets, optimizer, generator)
                scheduler.step()
                pcc = self.validation_pcc(val, y_val) if val is not None else float("nan")
                epochs.append({"epoch": epoch, **parts, "val_pcc": pcc})
                if progress is not None:
                    progress(epoch, parts, pcc)
                if val is None or (np.isfinite(pcc) and pcc > best["pcc"]):
                    best = {"epoch": epoch, "pcc": pcc, "state": self._snapshot()}
                elif epoch - best["epoch"] >= cfg.patience:
                    break
            if best["state"] is not None:
                self.model.load_state_dict(best["state"])
            self.after_fit(train, y_train)
        self.history = {
            "epochs": epochs,
            "best_epoch": best["epoch"],
            "best_val_pcc": None if val is None else float(best["pcc"]),
            "selection": "validation mean per-gene PCC" if val is not None else "last epoch (no validation set)",
            "seconds": time.perf_counter() - start,
        }
        return self.history

    @staticmethod
    def _with_scaler(model: nn.Module, train: SpotFeatures) -> nn.Module:
        """Per-dimension standardisation of backbone features, fitted on the training spots' pooled tokens.

        Foundation-model features are roughly centred, but others (CNN activations, colour statistics) differ
        by orders of magnitude between dimensions; the statistics live in the state dict so they are saved.
        """
        pooled = torch.from_numpy(np.asarray(train.local[:, 0, :], dtype=np.float64))
        mean, std = pooled.mean(0), pooled.std(0)
        std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))  # constant dims
        model.register_buffer("input_mean", mean.float())
        model.register_buffer("input_std", std.float())
        return model

    def _scaler(self) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._model()
        return model.input_mean, model.input_std

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._model().state_dict().items()}

    def _train_epoch(
        self, maker: BatchMaker, targets: torch.Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> dict[str, float]:
        model = self._model()
        model.train()
        order = torch.randperm(len(targets), generator=generator).numpy()
        sums: dict[str, float] = {}
        for i in range(0, len(order), self.train_cfg.batch_size):
            index = order[i : i + self.train_cfg.batch_size]
            batch = maker.make(index, generator)
            loss, parts = self.batch_loss(batch, targets[torch.from_numpy(index).to(targets.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            parts = {"loss": float(loss.detach()), **parts}
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value * len(index)
        return {name: total / len(order) for name, total in sums.items()}

    # -- persistence ----------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Model and training settings in one flat dict (field names do not collide)."""
        return {**self.model_cfg.to_dict(), **self.train_cfg.to_dict()}

    def save(self, directory: str | Path) -> None:
        model = self._model()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        write_head_json(path, {"head": self.name, "config": self.config(), "history": self.history})

    @classmethod
    def load(cls, directory: str | Path) -> "NeuralHead":
        meta, weights = read_saved(cls, directory)
        head = cls(**meta["config"])
        model = head.build(head.model_cfg.in_dim, head.model_cfg.n_genes)
        model.register_buffer("input_mean", torch.zeros(head.model_cfg.in_dim))
        model.register_buffer("input_std", torch.ones(head.model_cfg.in_dim))
        try:
            model.load_state_dict(load_file(str(weights)))
        except RuntimeError as err:
            raise ModelDirError(f"{weights} does not match the head config in {directory}: {err}") from err
        head.model = model.to(head.train_cfg.torch_device())
        head.history = meta.get("history", {})
        return head

    # -- embedding helpers ----------------------------------------------------------------------------------
    def genes_tensor(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(self.device)
