"""Tissue detection and virtual spots for slides without sequencing."""

from __future__ import annotations

import numpy as np
import pytest

from genedml.data.image import ArrayImage
from genedml.slide import thumbnail, tissue_mask, virtual_spots


def test_synthetic_tissue_on_glass_is_found():
    rgb = np.full((400, 400, 3), 235, np.uint8)  # grey-white glass
    rgb[100:300, 150:350] = (200, 120, 170)  # a pink block of "tissue"
    rgb += np.random.default_rng(0).integers(0, 6, rgb.shape, dtype=np.uint8)
    mask = tissue_mask(rgb)
    assert mask[120:280, 170:330].mean() > 0.95 and mask[:80].mean() < 0.02
    centers, grid = virtual_spots(ArrayImage(rgb), mpp=1.0, pitch_um=40.0)
    assert ((centers[:, 0] > 140) & (centers[:, 0] < 360) & (centers[:, 1] > 90) & (centers[:, 1] < 310)).all()
    assert len(np.unique(grid, axis=0)) == len(grid)


@pytest.mark.realdata
def test_her2st_tissue_mask_covers_the_measured_spots_not_the_glass(her2st_dir):
    from genedml.data import read_samples

    (b4,) = read_samples(her2st_dir, samples=["B4"])
    thumb, scale = thumbnail(b4.image)
    mask = tissue_mask(thumb)
    cx = np.clip((b4.centers[:, 0] * scale).astype(int), 0, mask.shape[1] - 1)
    cy = np.clip((b4.centers[:, 1] * scale).astype(int), 0, mask.shape[0] - 1)
    on_tissue = mask[cy, cx].mean()
    assert on_tissue > 0.8, on_tissue  # 84–96 % of her2st spot centres lie on tissue
    assert mask.mean() < 0.4  # most of the B4 image is glass
    b4.image.release()
