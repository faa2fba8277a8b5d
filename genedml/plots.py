"""Figures (PNG): spatial maps of measured vs predicted genes, per-gene PCC histogram, training curves.

Every figure is drawn on its own Agg canvas (matplotlib.figure.Figure + FigureCanvasAgg), never through
pyplot: nothing changes the user's backend, and no figure is left open in pyplot's registry.
Sizes are fixed (inches x DPI below) so a figure's pixel size is predictable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from genedml.errors import InputError

DPI = 100
PANEL_INCHES = (3.6, 3.2)  # one spatial map (with its colour bar)
HIST_INCHES = (6.0, 4.0)
CURVE_INCHES = (10.0, 4.0)
MAP_INCHES = (7.0, 6.0)
NOTE_COLOR = "firebrick"


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig renders without pyplot
    return fig


def _save(fig: Figure, out_png: str | Path, note: str | None) -> Path:
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=9, color=NOTE_COLOR, style="italic")
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))  # keep the note clear of the axes
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI, format="png")
    return out_png


def _spot_size(centers: np.ndarray, panel_points: float, extent: float | None = None) -> float:
    """Scatter marker area (points^2) so spots about tile the panel: diameter ~ nearest-neighbour spacing.

    extent: data units spanned by the panel (default: the spots' own bounding box).
    """
    if len(centers) < 2:
        return 30.0
    from scipy.spatial import cKDTree

    spacing = float(np.median(cKDTree(centers).query(centers, k=2)[0][:, 1]))
    extent = extent or float(np.ptp(centers, axis=0).max()) or 1.0
    diameter = 0.9 * spacing / extent * panel_points
    return float(np.clip(diameter, 0.5, 40.0) ** 2)


def _map_panel(fig: Figure, ax, centers: np.ndarray, values: np.ndarray, title: str, size: float) -> None:
    """One spatial scatter: image orientation (y = row grows downwards), equal aspect, own colour bar."""
    points = ax.scatter(centers[:, 0], centers[:, 1], c=values, s=size, cmap="viridis", linewidths=0)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(points, ax=ax, shrink=0.8)


def _check_rows(centers: np.ndarray, **arrays: np.ndarray | None) -> None:
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise InputError(f"centers must be (spots, 2) x/y pixels, got shape {centers.shape}.")
    for name, arr in arrays.items():
        if arr is not None and len(arr) != len(centers):
            raise InputError(f"{name} has {len(arr)} rows but there are {len(centers)} spot centers.")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def spatial_maps(centers: np.ndarray, measured: np.ndarray | None, predicted: np.ndarray,
                 genes: Sequence[str], out_png: str | Path, title: str = "Predicted expression",
                 note: str | None = None) -> Path:
    """Per gene a row: measured map (when given) beside the predicted map, with the gene's PCC.

    measured / predicted: (N, G) with G = len(genes); each map has its own colour scale (predictions are
    often compressed in range; the pattern is what is compared).
    """
    centers = np.asarray(centers, dtype=float)
    predicted = np.atleast_2d(np.asarray(predicted, dtype=float))
    measured = None if measured is None else np.atleast_2d(np.asarray(measured, dtype=float))
    _check_rows(centers, predicted=predicted, measured=measured)
    for name, arr in (("predicted", predicted), ("measured", measured)):
        if arr is not None and arr.shape[1] != len(genes):
            raise InputError(f"{name} has {arr.shape[1]} columns but {len(genes)} genes were named.")
    if not len(genes):
        raise InputError("spatial_maps needs at least one gene.")
    cols = 1 if measured is None else 2
    fig = _new_figure((PANEL_INCHES[0] * cols, PANEL_INCHES[1] * len(genes) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(genes), cols, squeeze=False))
    size = _spot_size(centers, PANEL_INCHES[1] * 72 * 0.75)
    for row, gene in enumerate(genes):
        if measured is not None:
            _map_panel(fig, axes[row, 0], centers, measured[:, row], f"{gene} measured", size)
            pcc = _pearson(measured[:, row], predicted[:, row])
            label = f"{gene} predicted (PCC {pcc:.2f})"
        else:
            label = f"{gene} predicted"
        _map_panel(fig, axes[row, cols - 1], centers, predicted[:, row], label, size)
    fig.suptitle(title, fontsize=11)
    return _save(fig, out_png, note)


def pcc_distribution(pcc_per_gene: np.ndarray, out_png: str | Path, label: str = "PCC per gene",
                     note: str | None = None) -> Path:
    """Histogram of per-gene PCC with the mean marked; NaN genes (constant in the test set) are counted."""
    pcc = np.asarray(pcc_per_gene, dtype=float).ravel()
    finite = pcc[np.isfinite(pcc)]
    fig = _new_figure(HIST_INCHES)
    ax = fig.subplots()
    if finite.size:
        ax.hist(finite, bins=min(40, max(5, finite.size // 5)), color="steelblue", edgecolor="white")
        mean = float(finite.mean())
        ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.3f}")
        ax.legend(loc="upper left", fontsize=9)
    ax.set_xlabel("Pearson r")
    ax.set_ylabel("genes")
    excluded = pcc.size - finite.size
    ax.set_title(f"{label}  (n = {finite.size} genes" + (f", {excluded} constant excluded)" if excluded else ")"),
                 fontsize=10)
    return _save(fig, out_png, note)


def training_curve(history: Mapping[str, Sequence[float]], out_png: str | Path, note: str | None = None) -> Path:
    """Loss parts (left) and validation PCC (right) per epoch.

    history: name -> per-epoch values; names containing "pcc" go on the right panel, every other series
    (e.g. "loss", "loss_regression", "loss_instance", "loss_group") on the left. An optional "epoch"
    series gives the x values; series shorter than it are aligned to its end. NaN entries are gaps.
    """
    epochs = np.asarray(history.get("epoch", []), dtype=float)
    fig = _new_figure(CURVE_INCHES)
    ax_loss, ax_pcc = fig.subplots(1, 2)
    for name, values in history.items():
        if name == "epoch":
            continue
        y = np.asarray(values, dtype=float)
        x = epochs[-len(y):] if len(epochs) >= len(y) else np.arange(1, len(y) + 1)
        target = ax_pcc if "pcc" in name.lower() else ax_loss
        target.plot(x, y, marker="o" if len(y) < 30 else None, markersize=3, label=name)
    for ax, ylabel in ((ax_loss, "loss"), (ax_pcc, "validation PCC")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out_png, note)


def expression_map(centers: np.ndarray, values: np.ndarray, out_png: str | Path, gene: str,
                   image_thumbnail: np.ndarray | None = None, scale: float = 1.0,
                   note: str | None = None) -> Path:
    """One gene's values at the spots, over a slide thumbnail when given.

    centers are level-0 pixels (x, y); `scale` = thumbnail pixels per level-0 pixel (e.g. 1/32 for a
    thumbnail 32x smaller than level 0), so spots land on the thumbnail where they are on the slide.
    """
    centers = np.asarray(centers, dtype=float)
    values = np.asarray(values, dtype=float).ravel()
    _check_rows(centers, values=values)
    if scale <= 0:
        raise InputError(f"thumbnail scale must be > 0 (thumbnail px per level-0 px), got {scale}.")
    xy = centers * scale
    fig = _new_figure(MAP_INCHES)
    ax = fig.subplots()
    alpha, extent = 1.0, None
    if image_thumbnail is not None:
        thumb = np.asarray(image_thumbnail)
        ax.imshow(thumb, origin="upper")  # imshow already puts row 0 at the top
        alpha, extent = 0.75, float(max(thumb.shape[:2]))
    size = _spot_size(xy, MAP_INCHES[1] * 72 * 0.8, extent)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", alpha=alpha, linewidths=0)
    ax.set_aspect("equal")
    if image_thumbnail is None:
        ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{gene}: predicted expression", fontsize=11)
    fig.colorbar(points, ax=ax, shrink=0.8)
    return _save(fig, out_png, note)
