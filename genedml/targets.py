"""Expression targets: a gene panel chosen on training samples, normalised, logged and optionally smoothed.

Everything decided on the training data (panel, normalisation, HEG/HVG lists) lives in a `TargetSpec`
that is saved with the model, so predict/evaluate time rebuilds exactly the same targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import numpy as np
import scipy.sparse as sp

from genedml.data.sample import Sample
from genedml.errors import InputError
from genedml.log import log


N_MARKER_GENES = 50  # size of the HEG / HVG lists (method.md §3)
SELECT_METHODS = ("mean", "variance", "list")
NORMALIZE_OVER = ("panel", "all")
LOG_KINDS = ("log1p", "log10")


@dataclass
class TargetSpec:
    """How targets are made: panel, normalisation, log, smoothing, and the training HEG/HVG lists."""

    panel: list[str]
    n_genes: int
    select: Literal["mean", "variance", "list"] = "mean"
    min_detected: float = 0.1
    normalize_over: Literal["panel", "all"] = "panel"
    target_sum: float = 1e4
    log: Literal["log1p", "log10"] = "log1p"
    smooth: bool = True
    heg: list[str] = field(default_factory=list)
    hvg: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.select not in SELECT_METHODS:
            raise InputError(f"TargetSpec.select must be one of {SELECT_METHODS}, got {self.select!r}.")
        if self.normalize_over not in NORMALIZE_OVER:
            raise InputError(f"TargetSpec.normalize_over must be one of {NORMALIZE_OVER}, got {self.normalize_over!r}.")
        if self.log not in LOG_KINDS:
            raise InputError(f"TargetSpec.log must be one of {LOG_KINDS}, got {self.log!r}.")
        if not self.target_sum > 0:
            raise InputError(f"TargetSpec.target_sum must be positive, got {self.target_sum!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | dict) -> "TargetSpec":
        """Rebuild from `to_json()` output (a JSON string or the already-parsed dict)."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"target spec has unknown fields {sorted(unknown)}; was it written by another version?")
        return cls(**data)


def _positions(wanted: Sequence[str], available: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Index of each wanted name in `available` (names absent are skipped) and the absent names."""
    lookup = {name: i for i, name in enumerate(available)}
    missing = [w for w in wanted if w not in lookup]
    return np.array([lookup[w] for w in wanted if w in lookup], dtype=np.int64), missing


def _column_index(sample: Sample, genes: Sequence[str]) -> np.ndarray:
    """Column of each gene in the sample's counts; InputError naming the missing genes."""
    if sample.counts is None or sample.genes is None:
        raise InputError(f"sample '{sample.sample_id}' has no expression counts; targets need counts.")
    index, missing = _positions(genes, sample.genes)
    if missing:
        raise InputError(
            f"sample '{sample.sample_id}' ({sample.meta.get('path', sample.source)}) lacks {len(missing)} panel "
            f"genes, e.g. {missing[:10]}. Use samples measured on the same gene panel, or refit the targets."
        )
    return index


def _scale_rows(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """Library-size normalisation: each row scaled to sum ``target_sum``; zero-total rows stay zero."""
    factor = np.divide(target_sum, totals, out=np.zeros(len(totals)), where=totals > 0)
    return sp.csr_matrix(sp.diags(factor) @ counts)


def _common_genes(samples: Sequence[Sample]) -> list[str]:
    """Genes measured in every sample, in the first sample's order."""
    for s in samples:
        if s.counts is None or s.genes is None:
            raise InputError(f"training sample '{s.sample_id}' has no expression counts.")
    shared = set(samples[0].genes)
    for s in samples[1:]:
        shared &= set(s.genes)
    return [str(g) for g in samples[0].genes if g in shared]


def select_panel(
    samples: Sequence[Sample],
    n: int = 250,
    method: Literal["mean", "variance", "list"] = "mean",
    min_detected: float = 0.1,
    gene_list: Sequence[str] | None = None,
) -> list[str]:
    """Choose the gene panel on training samples.

    Candidates: genes present in every sample and detected (count > 0) in at least ``min_detected`` of the
    spots of every sample. Ranking: mean or variance, pooled over all training spots, of log1p of counts
    normalised per spot to 1e4 over all genes. ``method="list"`` (or a ``gene_list``) validates and returns
    the given genes in their order.
    """
    if not samples:
        raise InputError("select_panel needs at least one training sample.")
    if method not in SELECT_METHODS:
        raise InputError(f"panel selection method must be one of {SELECT_METHODS}, got {method!r}.")
    if gene_list is not None or method == "list":
        return _validate_gene_list(samples, gene_list)
    if n < 1:
        raise InputError(f"panel size must be at least 1, got {n}.")

    genes = _common_genes(samples)
    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    qualifies = np.ones(len(genes), dtype=bool)
    n_spots = 0
    for s in samples:
        cols = _column_index(s, genes)
        counts = s.counts[:, cols]
        qualifies &= (counts > 0).getnnz(axis=0) >= min_detected * s.n_spots  # explicit zeros are not detections
        expr = _scale_rows(counts, np.asarray(s.counts.sum(axis=1)).ravel(), 1e4)
        expr.data = np.log1p(expr.data)
        total += np.asarray(expr.sum(axis=0)).ravel()
        total_sq += np.asarray(expr.multiply(expr).sum(axis=0)).ravel()
        n_spots += s.n_spots

    if not qualifies.any():
        raise InputError(
            f"no gene is detected in >= {min_detected:.0%} of the spots of every training sample "
            f"({[s.sample_id for s in samples]}; {len(genes)} shared genes). Lower min_detected or check the counts."
        )
    mean = total / n_spots
    score = mean if method == "mean" else total_sq / n_spots - mean**2
    order = np.flatnonzero(qualifies)[np.argsort(-score[qualifies], kind="stable")]
    if len(order) < n:
        log.warning(
            "only %d genes qualify for the panel (present in all %d training samples, detected in >= %.0f%% of "
            "spots of each); asked for %d, using %d.",
            len(order), len(samples), 100 * min_detected, n, len(order),
        )
    return [genes[i] for i in order[:n]]


def _validate_gene_list(samples: Sequence[Sample], gene_list: Sequence[str] | None) -> list[str]:
    """An explicit panel: non-empty, no duplicates, every gene in every sample."""
    if not gene_list:
        raise InputError("method='list' needs a non-empty gene_list.")
    genes = [str(g) for g in gene_list]
    uniq, counts = np.unique(genes, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"the gene list repeats genes: {list(uniq[counts > 1][:10])}.")
    absent = {}
    for s in samples:
        have = set(s.genes) if s.genes is not None else set()
        for g in genes:
            if g not in have:
                absent.setdefault(g, []).append(s.sample_id)
    if absent:
        shown = {g: absent[g] for g in list(absent)[:10]}
        raise InputError(f"{len(absent)} genes of the gene list are missing from training samples: {shown}.")
    return genes


def _neighbourhood_mean(values: np.ndarray, array_coords: np.ndarray, where: str) -> np.ndarray:
    """Mean over each spot and its existing 8 neighbours on the array grid (3 x 3 window)."""
    coords = np.asarray(array_coords, dtype=np.int64)
    lo = coords.min(axis=0) - 1
    shifted = coords - lo  # >= 1, so every neighbour offset stays >= 0
    width = int(shifted[:, 0].max()) + 2
    keys = shifted[:, 1] * width + shifted[:, 0]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if (np.diff(sorted_keys) == 0).any():
        dup = coords[order[1:][np.diff(sorted_keys) == 0]]
        raise InputError(f"{where}: several spots share array coordinates, e.g. {dup[:5].tolist()}.")
    total = np.zeros_like(values, dtype=np.float64)
    n = np.zeros(len(values))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            want = keys + dy * width + dx
            pos = np.searchsorted(sorted_keys, want).clip(max=len(keys) - 1)
            found = sorted_keys[pos] == want
            total[found] += values[order[pos[found]]]
            n[found] += 1
    return total / n[:, None]


def make_targets(sample: Sample, spec: TargetSpec) -> np.ndarray:
    """(N, G) float32 targets of one sample, rows in its barcode order, columns in panel order."""
    cols = _column_index(sample, spec.panel)
    counts = sample.counts[:, cols]
    basis = counts if spec.normalize_over == "panel" else sample.counts
    expr = _scale_rows(counts, np.asarray(basis.sum(axis=1), dtype=np.float64).ravel(), spec.target_sum)
    expr.data = np.log1p(expr.data) if spec.log == "log1p" else np.log10(1.0 + expr.data)
    values = expr.toarray()
    if spec.smooth:
        where = f"sample '{sample.sample_id}' ({sample.meta.get('path', sample.source)})"
        if sample.array_coords is None:
            raise InputError(
                f"{where}: 3x3 smoothing needs array (grid) coordinates, which this sample lacks. "
                "Turn smoothing off (smooth=False) or provide array_row/array_col."
            )
        values = _neighbourhood_mean(values, sample.array_coords, where)
    return values.astype(np.float32)


def fit_targets(
    train_samples: Sequence[Sample],
    n_genes: int = 250,
    select: Literal["mean", "variance", "list"] = "mean",
    min_detected: float = 0.1,
    gene_list: Sequence[str] | None = None,
    normalize_over: Literal["panel", "all"] = "panel",
    target_sum: float = 1e4,
    log: Literal["log1p", "log10"] = "log1p",
    smooth: bool = True,
) -> TargetSpec:
    """Choose the panel on the training samples and record HEG/HVG (top 50 by mean / variance of targets)."""
    panel = select_panel(train_samples, n_genes, "list" if gene_list is not None else select, min_detected, gene_list)
    spec = TargetSpec(
        panel=panel,
        n_genes=len(panel),
        select="list" if gene_list is not None else select,
        min_detected=min_detected,
        normalize_over=normalize_over,
        target_sum=target_sum,
        log=log,
        smooth=smooth,
    )
    pooled = np.concatenate([make_targets(s, spec) for s in train_samples]).astype(np.float64)
    top = min(N_MARKER_GENES, len(panel))
    spec.heg = [panel[i] for i in np.argsort(-pooled.mean(axis=0), kind="stable")[:top]]
    spec.hvg = [panel[i] for i in np.argsort(-pooled.var(axis=0), kind="stable")[:top]]
    return spec


def targets_at(sample: Sample, barcodes: Sequence[str], spec: TargetSpec) -> np.ndarray:
    """Targets of `barcodes` in that order, joined by barcode (never by row order).

    Fails loudly when some spots have no expression in the sample, e.g. a cache or prediction made from
    another version of the dataset.
    """
    values = make_targets(sample, spec)
    index, missing = _positions(barcodes, sample.barcodes)
    if missing:
        raise InputError(
            f"{len(missing)} of {len(barcodes)} spots of '{sample.sample_id}' have no expression in the data "
            f"(e.g. {list(missing[:5])}). Were the features or predictions made from another version of this "
            "dataset? Re-extract with --overwrite."
        )
    return values[index]
