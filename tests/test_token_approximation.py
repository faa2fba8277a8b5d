"""benchmarks/token_approximation.py derives compact local-token layouts from an `all` cache: the derivation
must be the extractor's pooling (same tokens, same order, same weights)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark

from genedml.backbones import load_backbone
from genedml.extract.runner import TOKEN_GRIDS, local_token_weights


@pytest.fixture(scope="module")
def study():
    return load_benchmark("token_approximation")


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


def test_derived_cells_partition_the_patch_tokens_so_their_weighted_mean_is_the_patch_mean(study) -> None:
    # 0.3 pooled 14 x 14 maps with adaptive_avg_pool2d: at 4x4 its cells overlapped (rows 3 and 10 twice) while
    # each recorded 12.25 tokens, so the weighted mean of the cells missed the patch mean by ≈ 2 %.
    rng = np.random.default_rng(0)
    local = rng.normal(size=(3, 197, 8)).astype(np.float32)
    for layout in ("2x2", "4x4"):
        cells = study.derive_local(local, layout)[:, 1:]
        sizes = study.derived_weights(layout, 196)[1:]
        assert sizes.sum() == 196
        weighted = (cells * sizes[:, None]).sum(1) / sizes.sum()
        np.testing.assert_allclose(weighted, local[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
