"""Figures: each writes a PNG of the size its layout promises, draws the data, and leaves no figure open."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from genedml import plots
from genedml.errors import InputError


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header (IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _px(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * plots.DPI), round(inches[1] * plots.DPI)


@pytest.fixture()
def slide() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:12, 0:15]
    centers = np.stack([xx.ravel() * 100.0 + (yy.ravel() % 2) * 50, yy.ravel() * 87.0], axis=1)
    measured = np.stack([centers[:, 0] / 1500, np.cos(centers[:, 1] / 300)], axis=1)
    predicted = measured + rng.normal(0, 0.1, measured.shape)
    return centers, measured, predicted


@pytest.fixture(autouse=True)
def no_open_figures():
    """pyplot's registry must be as empty after each plot call as before (no leaked figures)."""
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    yield
    assert len(plt.get_fignums()) == before


def _ink_fraction(path: Path) -> float:
    """Share of pixels that are not plain white: a blank canvas scores ~0."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    return float((rgb < 250).any(axis=2).mean())


def test_spatial_maps_measured_and_predicted_grid(slide, tmp_path):
    centers, measured, predicted = slide
    out = plots.spatial_maps(centers, measured, predicted, ["ERBB2", "CD74"], tmp_path / "maps.png",
                             note="random-init backbone: not a biology result")
    w, h = plots.PANEL_INCHES
    assert _png_size(out) == _px((2 * w, 2 * h + 0.4))
    assert _ink_fraction(out) > 0.15


def test_spatial_maps_prediction_only_is_one_column(slide, tmp_path):
    centers, _, predicted = slide
    out = plots.spatial_maps(centers, None, predicted[:, :1], ["ERBB2"], tmp_path / "sub" / "pred.png")
    w, h = plots.PANEL_INCHES
    assert _png_size(out) == _px((w, h + 0.4))


def test_spatial_maps_y_axis_points_down(slide, tmp_path, monkeypatch):
    # Image convention: the spot with the smallest y (top row of the slide) is drawn at the top.
    seen = []
    original = plots._map_panel

    def spy(fig, ax, *args):
        original(fig, ax, *args)
        seen.append(ax.get_ylim())

    monkeypatch.setattr(plots, "_map_panel", spy)
    centers, measured, predicted = slide
    plots.spatial_maps(centers, measured, predicted, ["A", "B"], tmp_path / "m.png")
    assert len(seen) == 4 and all(bottom > top for bottom, top in seen)


def test_spatial_maps_rejects_gene_count_mismatch(slide, tmp_path):
    centers, measured, predicted = slide
    with pytest.raises(InputError, match="2 columns but 3 genes"):
        plots.spatial_maps(centers, measured, predicted, ["A", "B", "C"], tmp_path / "m.png")


def test_pcc_distribution_counts_constant_genes(tmp_path, monkeypatch):
    titles = []
    original = plots._save

    def spy(fig, *args):
        titles.append(fig.axes[0].get_title())
        return original(fig, *args)

    monkeypatch.setattr(plots, "_save", spy)
    pcc = np.r_[np.linspace(-0.2, 0.7, 60), np.nan, np.nan]
    out = plots.pcc_distribution(pcc, tmp_path / "pcc.png", label="test PCC")
    assert _png_size(out) == _px(plots.HIST_INCHES)
    assert titles == ["test PCC  (n = 60 genes, 2 constant excluded)"]


def test_training_curve_splits_losses_and_pcc(tmp_path):
    history = {"epoch": [1, 2, 3], "loss": [1.0, 0.7, 0.5], "loss_group": [0.3, 0.2, 0.1], "val_pcc": [0.1, 0.2, 0.3]}
    out = plots.training_curve(history, tmp_path / "curve.png")
    assert _png_size(out) == _px(plots.CURVE_INCHES)
    assert _ink_fraction(out) > 0.02


def test_expression_map_over_thumbnail(slide, tmp_path):
    centers, _, predicted = slide
    thumb = np.full((60, 90, 3), 200, dtype=np.uint8)
    out = plots.expression_map(centers, predicted[:, 0], tmp_path / "map.png", "ERBB2", image_thumbnail=thumb,
                               scale=0.05, note="no sequencing on this slide")
    assert _png_size(out) == _px(plots.MAP_INCHES)
    assert _ink_fraction(out) > 0.3
    with pytest.raises(InputError, match="scale"):
        plots.expression_map(centers, predicted[:, 0], tmp_path / "bad.png", "ERBB2", scale=0)
