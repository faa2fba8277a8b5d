"""benchmarks/token_approximation.py derives compact local-token layouts from an `all` cache: the derivation
must be the extractor's pooling (same tokens, same order, same weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from genedml.backbones import load_backbone
from genedml.extract.runner import TOKEN_GRIDS, local_token_weights

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "token_approximation.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("token_approximation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
def test_derived_layouts_equal_the_backbones_own_pooling_on_her2st_patches(study, her2st_dir) -> None:
    from genedml.data import read_samples

    sample = read_samples(her2st_dir, samples=["C3"])[0]
    side = 224
    patches = []
    for cx, cy in sample.centers[:4]:
        patches.append(np.asarray(sample.image.read_region(int(cx) - side // 2, int(cy) - side // 2, side, side).pixels)[..., :3])
    batch = np.stack(patches).astype(np.uint8)
    vit = load_backbone("tiny-vit", random_init=True)  # 14 x 14 patch tokens, like ViT-S/16 at 224 px
    full = vit.encode(batch, TOKEN_GRIDS["all"]).numpy()
    assert full.shape[1] == 1 + vit.native_tokens == 197
    for layout in ("cls", "2x2", "4x4"):
        real = vit.encode(batch, TOKEN_GRIDS[layout]).numpy()
        derived = study.derive_local(full, layout)
        assert derived.shape == real.shape
        np.testing.assert_allclose(derived, real, rtol=1e-5, atol=1e-5)
        assert study.derived_weights(layout, vit.native_tokens).tolist() == local_token_weights(TOKEN_GRIDS[layout], 196)
    # stored float16 and dihedral views (N, 8, T, D) keep their dtype and leading axes
    views = np.repeat(full[:, None].astype(np.float16), 8, axis=1)
    assert study.derive_local(views, "4x4").shape == (4, 8, 17, full.shape[-1])
    assert study.derive_local(views, "4x4").dtype == np.float16


def test_adaptive_cells_of_a_14_grid_overlap_at_4x4_but_not_at_2x2(study) -> None:
    cover4, cover2 = study.cell_coverage(14, 4), study.cell_coverage(14, 2)
    assert set(cover4.sum(1)) == {16.0} and cover4.sum() == 256  # 16 cells of 4 x 4 over 196 tokens
    assert set(cover4.sum(0)) == {1.0, 2.0, 4.0}  # rows/columns 3 and 10 fall in two cells
    assert set(cover2.sum(1)) == {49.0} and set(cover2.sum(0)) == {1.0}
