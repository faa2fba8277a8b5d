"""Training loop and save/load shared by the neural heads (method.md §1.4).

Adam, StepLR(20, 0.95), batch 512, up to 200 epochs, early stopping on the validation mean per-gene PCC with
patience 20 and the best weights restored. Without a validation set every epoch is run and the last weights
are kept (the toolkit carves the validation split from the training samples; selecting on the test fold, as
the reference code does, is optimistic). By default (`average_weights`, a named deviation) the weights that
are validated, selected and kept are the running mean of the epoch-end weights rather than the last ones.
"""

from __future__ import annotations

import contextlib
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Self

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genedml.devices import check_device, resolve_device
from genedml.errors import ConfigError, ModelDirError
from genedml.heads.base import FORMAT_VERSION, WEIGHTS, Head, Progress, check_targets, read_saved, write_head_json
from genedml.heads.batch import Batch, BatchMaker
from genedml.heads.features import SpotFeatures, StreamedSpots, slide_parts
from genedml.heads.scaling import TOKEN_TYPES, FeatureScaler, token_moments
from genedml.log import log
from genedml.metrics import mean_gene_pcc


TARGET_SCALINGS = ("standardize", "center", "none")
STEP_REPORT_SECONDS = 60.0  # within an epoch longer than this, a progress line per interval
# Encoder sizes that make the multi-scale heads practical on a CPU (README "Sizes and time"; benchmarks use them).
CPU_SIZES = {"dim": 128, "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2, "global_mlp_ratio": 1.0}
# State-dict buffer prefixes of the feature statistics, one per token type (genedml.heads.scaling.TOKEN_TYPES).
# Models saved by 0.2.0 hold only `input_*` (one set for every type); loading fills the others from it.
SCALER_BUFFERS = ("input", "patch", "tile")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by the neural heads (each head's settings extend this class)."""

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
    # An epoch is at least this many optimiser steps (several shuffled passes over a small training set), so
    # epochs, patience and the StepLR schedule keep the meaning they have on the paper's cohorts (≈ 25 steps
    # per epoch at batch 512); with one or two steps per epoch the paper's settings stop before learning.
    min_epoch_steps: int = 25
    # Targets are centred and scaled per gene with training statistics ("standardize"), only centred
    # ("center": the same as starting the output bias at the training means), or used as given ("none").
    target_scaling: str = "standardize"
    # "auto": fp16 autocast with a gradient scaler on CUDA (as the authors train), fp32 on CPU.
    precision: str = "auto"
    # 0 = the authors' sampling (each batch drawn from all training spots). N > 0 = slide-aware batches: each
    # batch comes from at most N slides, so a step encodes at most N whole slides at the global scale
    # (cohorts of many large slides); every spot is still seen once per pass.
    batch_slides: int = 0
    # Validate, select and keep the running uniform mean of the epoch-end weights (stochastic weight averaging
    # from epoch 0) instead of the last weights. A named deviation from the reference: trained on one patient's
    # sections, the last weights keep improving on a validation section of that patient while they get worse on
    # other patients, and early stopping cannot see it; the averaged weights drift far less (her2st C -> B4,
    # random ResNet18, seed 2023: 0.173 -> 0.238; benchmarks/RESULTS.md, "genedml 0.7"). False = the reference.
    average_weights: bool = True

    def __post_init__(self) -> None:
        if self.target_scaling not in TARGET_SCALINGS:
            raise ConfigError(f"head setting target_scaling must be one of {', '.join(TARGET_SCALINGS)}, got {self.target_scaling!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"head setting precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.average_weights, bool):
            raise ConfigError(f"head setting average_weights must be true or false, got {self.average_weights!r}")
        if not isinstance(self.batch_slides, int) or self.batch_slides < 0:
            raise ConfigError(f"head setting batch_slides must be an integer >= 0, got {self.batch_slides!r}")
        positive_ints = ("step_size", "batch_size", "eval_batch_size", "epochs", "patience", "min_epoch_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"head setting {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"head setting lr must be > 0, got {self.lr!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"head setting gamma must be in (0, 1], got {self.gamma!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"head setting weight_decay must be >= 0, got {self.weight_decay!r}")
        check_device(self.device, "head setting device")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, "head setting device")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype for training on `device`, or None for plain fp32."""
        if device.type != "cuda":
            return None  # CPU stays fp32: bf16 autocast is slower on the CPUs we measured and loses accuracy
        return {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)


def batch_order(slide: np.ndarray, batch_size: int, batch_slides: int, generator: torch.Generator) -> list[np.ndarray]:
    """One shuffled pass over all spots as a list of batches (row indices); every spot exactly once.

    batch_slides = 0: uniform shuffling over all spots (the authors' sampling). batch_slides = N: slides are
    shuffled and taken N at a time; the spots of each group are shuffled and cut into batches, so no batch
    spans more than N slides (a batch may be short at the end of a group). The short last batch is kept, as
    in the authors' loader: on three her2st sections it is 33 spots beside 512, yet cutting each pass into
    equal batches instead scored lower or level in every fold within a patient (benchmarks/RESULTS.md, "genedml
    0.9", "equal batches instead of a short last one").
    """
    if batch_slides <= 0:
        order = torch.randperm(len(slide), generator=generator).numpy()
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    slides = np.unique(slide)
    slides = slides[torch.randperm(len(slides), generator=generator).numpy()]
    batches = []
    for g in range(0, len(slides), batch_slides):
        rows = np.flatnonzero(np.isin(slide, slides[g : g + batch_slides]))
        rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


class WeightAverage:
    """Running uniform mean of a model's parameters at the ends of epochs (stochastic weight averaging).

    `swapped_in` updates the mean with the current parameters and puts the mean in their place for the duration
    of the block (validation, snapshot), then restores the parameters training goes on from. Buffers (feature
    and target statistics, a retrieval bank) are left as they are; the model has no batch-norm statistics, so
    the mean needs no recalibration.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        params = [p.detach() for p in model.parameters()]
        if not self.mean:
            self.mean = [p.clone() for p in params]
            return
        for mean, value in zip(self.mean, params, strict=True):
            mean.lerp_(value, 1.0 / self.count)  # mean += (value - mean) / count

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        self.update(model)
        params = list(model.parameters())
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, mean in zip(params, self.mean, strict=True):
                p.copy_(mean)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, current, strict=True):
                    p.copy_(value)


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

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.model: nn.Module | None = None
        self.in_dim_: int | None = None
        self.n_genes_: int | None = None

    # -- subclass hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def build(self, in_dim: int, n_genes: int) -> nn.Module:
        """A fresh model for D-dimensional features and G genes."""

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

    def _batches(self, feats: SpotFeatures | StreamedSpots, fn: Any) -> np.ndarray:
        """Apply fn(batch) over feats in eval mode, in order, and stack the numpy results.

        Streamed features are read and evaluated one slide at a time (rows are in slide order)."""
        model = self._model()
        model.eval()
        size = self.settings.eval_batch_size
        reuse = getattr(model, "reuse_global_tokens", contextlib.nullcontext)
        groups = slide_parts(feats) if isinstance(feats, StreamedSpots) else [(np.arange(len(feats)), feats)]
        parts = []
        for _, group in groups:
            maker = BatchMaker(group, self.device, self.needs_neighbor(), self._scaler())
            with torch.no_grad(), reuse():  # per group: slide indices restart in each streamed part
                parts += [fn(maker.make(np.arange(i, min(i + size, len(group))))).float().cpu().numpy()
                          for i in range(0, len(group), size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def predict(self, feats: SpotFeatures | StreamedSpots) -> np.ndarray:
        """Predictions in the targets' scale (the model works on scaled targets; see `target_scaling`)."""
        model = self._model()
        scaled = self._batches(feats, self.predict_batch)
        return (scaled * model.target_std.cpu().numpy() + model.target_mean.cpu().numpy()).astype(np.float32)

    def validation_pcc(self, val: SpotFeatures | StreamedSpots, y_val: np.ndarray) -> float:
        """Mean over validation slides of the slide's mean per-gene PCC (the authors' selection metric)."""
        pred = self.predict(val)
        per_slide = [mean_gene_pcc(pred[val.slide == s], y_val[val.slide == s]) for s in np.unique(val.slide)]
        finite = [p for p in per_slide if np.isfinite(p)]
        return float(np.mean(finite)) if finite else float("nan")

    def scale_targets(self, y: np.ndarray) -> torch.Tensor:
        """Targets (N, G) as the model sees them (centred/scaled with the training statistics)."""
        model = self._model()
        y = torch.from_numpy(np.asarray(y, dtype=np.float32)).to(self.device)
        return (y - model.target_mean) / model.target_std

    def fit(
        self,
        train: SpotFeatures | StreamedSpots,
        y_train: np.ndarray,
        val: SpotFeatures | StreamedSpots | None = None,
        y_val: np.ndarray | None = None,
        *,
        progress: Progress | None = None,
    ) -> Self:
        """Train; `StreamedSpots` are read a slide group at a time (needs `batch_slides` >= 1), with the same
        batches, views and statistics as the in-memory features, so both give the same model for a seed."""
        cfg = self.settings
        if isinstance(train, StreamedSpots) and cfg.batch_slides < 1:
            raise ConfigError("training from streamed features needs slide-aware batches: set batch_slides >= 1")
        y_train = check_targets(train, y_train)
        if val is not None:
            y_val = check_targets(val, y_val, "validation")
        device = cfg.torch_device()
        start = time.perf_counter()
        with deterministic(device):
            torch.manual_seed(cfg.seed)
            self.in_dim_, self.n_genes_ = int(train.dim), int(y_train.shape[1])
            model = self.build(self.in_dim_, self.n_genes_)
            self.model = self._with_target_scaler(self._with_scaler(model, train), y_train).to(device)
            optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
            amp = cfg.autocast_dtype(device)
            grad_scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
            generator = torch.Generator().manual_seed(cfg.seed)
            maker = None if isinstance(train, StreamedSpots) else BatchMaker(train, device, self.needs_neighbor(), self._scaler())
            targets = self.scale_targets(y_train)
            passes = self.passes_per_epoch(len(train))
            epochs: list[dict[str, Any]] = []
            best = {"epoch": -1, "pcc": -np.inf, "state": None}
            average = WeightAverage() if cfg.average_weights else None
            for epoch in range(cfg.epochs):
                parts, steps_per_epoch = self._train_epoch(train, maker, targets, optimizer, generator, passes, amp, grad_scaler)
                if epoch == 0:
                    self._warn_if_long(time.perf_counter() - start, device)
                scheduler.step()
                with contextlib.nullcontext() if average is None else average.swapped_in(self.model):
                    pcc = self.validation_pcc(val, y_val) if val is not None else float("nan")
                    if val is None or (np.isfinite(pcc) and pcc > best["pcc"]):
                        best = {"epoch": epoch, "pcc": pcc, "state": self._snapshot()}
                epochs.append({"epoch": epoch, **parts, "val_pcc": pcc})
                if progress is not None:
                    progress(epoch, parts, pcc)
                if val is not None and epoch - best["epoch"] >= cfg.patience:  # patience >= 1: never the best epoch
                    break
            if best["state"] is not None:
                self.model.load_state_dict(best["state"])
            self.after_fit(train, y_train)
        self.history_ = {
            "epochs": epochs,
            "best_epoch": best["epoch"],
            "best_val_pcc": None if val is None else float(best["pcc"]),
            "selection": ("validation: mean over slides of the per-slide mean gene PCC" if val is not None
                          else "last epoch (no validation set)"),
            "weights": ("running mean of the epoch-end weights up to the selected epoch" if cfg.average_weights
                        else "the weights at the end of the selected epoch"),
            "steps_per_epoch": steps_per_epoch,
            "passes_per_epoch": passes,
            "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
            "target_scaling": cfg.target_scaling,
            "seconds": time.perf_counter() - start,
        }
        return self

    def _warn_if_long(self, first_epoch_seconds: float, device: torch.device) -> None:
        """After the first epoch: say how long the whole fit may take when that is more than half an hour."""
        worst = first_epoch_seconds * self.settings.epochs
        if worst > 1800:
            # Suggest only the CPU sizes this run does not already use, of the scales it encodes (the hint is noise
            # otherwise: the default head and the MLP have no neighbour encoder).
            scales = getattr(self.settings, "scales", ("neighbor", "global"))
            larger = {k: v for k, v in CPU_SIZES.items() if getattr(self.settings, k, v) > v
                      and not (k.startswith("neighbor_") and "neighbor" not in scales)
                      and not (k.startswith("global_") and "global" not in scales)}
            hint = (" On a CPU, smaller encoders are much faster, e.g. " + " ".join(f"--head-option {k}={v}" for k, v in larger.items())
                    + "." if device.type == "cpu" and larger else "")
            log.warning("%s: the first epoch took %.0f s; up to %d epochs (early stopping usually ends sooner) may "
                        "take up to %.1f h.%s", self.name, first_epoch_seconds, self.settings.epochs, worst / 3600, hint)

    def passes_per_epoch(self, n_spots: int) -> int:
        """Full shuffled passes per epoch: enough for `min_epoch_steps` optimiser steps."""
        steps_per_pass = max(1, int(np.ceil(n_spots / self.settings.batch_size)))
        return max(1, int(np.ceil(self.settings.min_epoch_steps / steps_per_pass)))

    def _with_target_scaler(self, model: nn.Module, y_train: np.ndarray) -> nn.Module:
        """Per-gene target statistics of the training spots, kept in the state dict (saved with the model)."""
        y = torch.from_numpy(np.asarray(y_train, dtype=np.float64))
        mean, std = y.mean(0), y.std(0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # genes constant in training: centre only
        mode = self.settings.target_scaling
        model.register_buffer("target_mean", (mean if mode != "none" else torch.zeros_like(mean)).float())
        model.register_buffer("target_std", (std if mode == "standardize" else torch.ones_like(std)).float())
        return model

    @staticmethod
    def _with_scaler(model: nn.Module, train: SpotFeatures | StreamedSpots) -> nn.Module:
        """Per-dimension standardisation of backbone features, one set of statistics per token type
        (`genedml.heads.scaling`), fitted on the training spots slide by slide.

        Foundation-model features are roughly centred, but others (CNN activations, colour statistics) differ
        by orders of magnitude between dimensions; the statistics live in the state dict so they are saved.
        """
        moments = token_moments(part for _, part in slide_parts(train))
        pooled = moments["pooled"].mean_std()
        for kind, prefix in zip(TOKEN_TYPES, SCALER_BUFFERS):
            # A missing type (a `cls` cache, no neighbour scale) gets a copy of the pooled statistics: tensors
            # that share memory cannot be saved as safetensors.
            mean, std = moments[kind].mean_std() if kind in moments else (pooled[0].clone(), pooled[1].clone())
            model.register_buffer(f"{prefix}_mean", mean)
            model.register_buffer(f"{prefix}_std", std)
        return model

    def _scaler(self) -> FeatureScaler:
        model = self._model()
        pooled, patch, tile = ((getattr(model, f"{p}_mean"), getattr(model, f"{p}_std")) for p in SCALER_BUFFERS)
        return FeatureScaler(pooled=pooled, patch=patch, tile=tile)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._model().state_dict().items()}

    def _train_epoch(
        self,
        train: SpotFeatures | StreamedSpots,
        maker: BatchMaker | None,
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        passes: int = 1,
        amp: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[dict[str, float], int]:
        """One epoch: mean loss parts over its spots, and the optimiser steps it took (slide-aware batches
        can make an epoch a step or two longer than spots / batch size). `maker` is None for streamed
        features: each group of consecutive batches that share slides is read, trained on, and dropped."""
        model = self._model()
        model.train()
        sums: dict[str, float] = {}
        seen = steps = 0
        start = last_report = time.perf_counter()
        for done_passes in range(passes):
            order = batch_order(train.slide, self.settings.batch_size, self.settings.batch_slides, generator)
            expected = steps + len(order) * (passes - done_passes)
            for group_maker, to_rows, batches in self._batch_groups(train, maker, order):
                for index in batches:
                    batch = group_maker.make(to_rows[index], generator)
                    with torch.autocast(targets.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, parts = self.batch_loss(batch, targets[torch.from_numpy(index).to(targets.device)])
                    optimizer.zero_grad(set_to_none=True)
                    if grad_scaler is not None and grad_scaler.is_enabled():
                        grad_scaler.scale(loss).backward()
                        grad_scaler.step(optimizer)
                        grad_scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    parts = {"loss": float(loss.detach()), **parts}
                    for name, value in parts.items():
                        sums[name] = sums.get(name, 0.0) + value * len(index)
                    seen += len(index)
                    steps += 1
                    if time.perf_counter() - last_report > STEP_REPORT_SECONDS:  # long epochs (cohorts) say where they are
                        last_report = time.perf_counter()
                        log.info("%s: step %d/%d of this epoch, %.0f s, loss %.3f", self.name, steps, expected,
                                 last_report - start, parts["loss"])
        return {name: total / seen for name, total in sums.items()}, steps

    def _batch_groups(
        self, train: SpotFeatures | StreamedSpots, maker: BatchMaker | None, order: list[np.ndarray]
    ) -> Iterator[tuple[BatchMaker, np.ndarray, list[np.ndarray]]]:
        """(batch maker, row map, batches) per run of consecutive batches within `batch_slides` slides.

        In memory there is one run (the maker holds every slide, rows map to themselves); streamed, each run
        of `batch_order`'s slide groups is read from the cache once and released before the next.
        """
        if maker is not None:
            yield maker, np.arange(len(train)), order
            return
        limit = max(1, self.settings.batch_slides)
        run: list[np.ndarray] = []
        slides: set[int] = set()
        for index in order + [None]:
            batch_slides = set() if index is None else set(np.unique(train.slide[index]).tolist())
            if run and (index is None or len(slides | batch_slides) > limit):
                part, to_part = train.load(sorted(slides))
                yield BatchMaker(part, self.device, self.needs_neighbor(), self._scaler()), to_part, run
                run, slides = [], set()
            if index is not None:
                run.append(index)
                slides |= batch_slides

    # -- persistence ----------------------------------------------------------------------------------------
    def fitted_state(self) -> dict[str, Any]:
        """Dimensions learnt at fit (saved beside the settings, never inside them)."""
        return {"in_dim": self.in_dim_, "n_genes": self.n_genes_}

    def save(self, directory: str | Path) -> None:
        model = self._model()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        write_head_json(path, {"head": self.name, "config": self.config(), "fitted": self.fitted_state(), "history": self.history_})

    @classmethod
    def load(cls, directory: str | Path) -> Self:
        config, fitted, weights = read_saved(cls, directory)
        head = cls(cls.settings_from(config))
        head.restore_fitted(fitted)
        model = head.build(head.in_dim_, head.n_genes_)
        for prefix in SCALER_BUFFERS:
            model.register_buffer(f"{prefix}_mean", torch.zeros(head.in_dim_))
            model.register_buffer(f"{prefix}_std", torch.ones(head.in_dim_))
        model.register_buffer("target_mean", torch.zeros(head.n_genes_))
        model.register_buffer("target_std", torch.ones(head.n_genes_))
        if int(fitted.get("format_version", FORMAT_VERSION)) < FORMAT_VERSION:
            raise ModelDirError(f"{directory} holds a {cls.name} head saved by genedml 0.1, whose layers differ from "
                                "this version's (exact reference layers): refit it with `genedml fit`")
        try:
            state = load_file(str(weights))
            for prefix in SCALER_BUFFERS[1:]:  # saved by 0.2.0: one set of statistics for every token type
                for stat in ("mean", "std"):
                    if f"input_{stat}" in state:
                        state.setdefault(f"{prefix}_{stat}", state[f"input_{stat}"])
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ModelDirError(f"{weights} does not match the head config in {directory}: {err}") from err
        head.model = model.to(head.settings.torch_device())
        head.history_ = fitted.get("history", {})
        return head

    def restore_fitted(self, fitted: dict[str, Any]) -> None:
        """Set the fitted dimensions read from head.json."""
        try:
            self.in_dim_, self.n_genes_ = int(fitted["in_dim"]), int(fitted["n_genes"])
        except (KeyError, TypeError, ValueError):
            raise ModelDirError(f"head.json of this {self.name} head has no fitted dimensions (in_dim, n_genes)") from None
