"""Windowed global attention for very large slides: exact when one window covers the slide, local otherwise."""

from __future__ import annotations

import torch

from genedml.heads.layers import GlobalEncoder, window_groups


def _slide(side: int = 12, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([cols.flatten(), rows.flatten()], 1)[torch.randperm(side * side)]  # any spot order
    return torch.randn(side * side, dim), grid


def test_one_window_over_the_whole_slide_equals_exact_attention() -> None:
    tokens, grid = _slide()
    exact = GlobalEncoder(16, depth=2, heads=2, mlp_ratio=1.0, dropout=0.0).eval()
    windowed = GlobalEncoder(16, depth=2, heads=2, mlp_ratio=1.0, dropout=0.0, window=1000, window_above=10).eval()
    windowed.load_state_dict(exact.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(windowed(tokens, grid), exact(tokens, grid), rtol=1e-5, atol=1e-5)


def test_small_windows_only_see_their_own_spots() -> None:
    tokens, grid = _slide()
    enc = GlobalEncoder(16, depth=1, heads=2, mlp_ratio=1.0, dropout=0.0, window=4, window_above=10).eval()
    with torch.no_grad():
        before = enc(tokens, grid)
        far = (grid[:, 0] >= 8) & (grid[:, 1] >= 8)  # the bottom-right window
        changed = tokens.clone()
        changed[far] += 5.0
        after = enc(changed, grid)
    # Depth 1 = attention in the window, then the PEG's 3 x 3 convolution: one cell beyond the window may change.
    untouched = (grid[:, 0] < 7) | (grid[:, 1] < 7)
    torch.testing.assert_close(after[untouched], before[untouched])
    assert not torch.allclose(after[far], before[far])


def test_window_groups_cover_every_spot_once() -> None:
    _, grid = _slide(side=10)
    n_windows, valid, order = window_groups(grid, 4)
    assert n_windows == 9 and int(valid.sum()) == len(grid)
    assert sorted(order.tolist()) == list(range(len(grid)))
