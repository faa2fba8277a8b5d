"""The Gene-DML and TRIPLEX losses and the k-means, against values computed independently with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genedml.heads.kmeans import kmeans
from genedml.heads.losses import group_loss, instance_loss, instance_loss_scale, regression_loss, triplex_loss

RNG = np.random.default_rng(7)
S = RNG.normal(size=(5, 4))
G = RNG.normal(size=(5, 4))
S2 = RNG.normal(size=(5, 4))


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_soft_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−Σ_j q_ij log softmax(p)_ij, written out with explicit loops."""
    out = np.zeros(len(logits))
    for i in range(len(logits)):
        log_z = math.log(sum(math.exp(v) for v in logits[i]))
        out[i] = -sum(targets[i, j] * (logits[i, j] - log_z) for j in range(logits.shape[1]))
    return out


def np_instance(s: np.ndarray, g: np.ndarray, tau: float) -> np.ndarray:
    logits = g @ s.T / tau
    targets = np_softmax((s @ s.T + g @ g.T) / (2 * tau))
    return 0.5 * (np_soft_ce(logits, targets) + np_soft_ce(logits.T, targets.T))


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_instance_loss_matches_equation_per_spot() -> None:
    got = instance_loss_scale(t(S), t(G), tau=0.5).numpy()
    np.testing.assert_allclose(got, np_instance(S, G, 0.5), rtol=1e-10)


def test_instance_loss_averages_scales_then_spots() -> None:
    expected = ((np_instance(S, G, 0.07) + np_instance(S2, G, 0.07)) / 2).mean()
    got = float(instance_loss([t(S), t(S2)], t(G), tau=0.07))
    assert got == pytest.approx(expected, rel=1e-9)


def test_instance_loss_swap_gives_transposed_target_form() -> None:
    """Swapping s and g transposes the logits but not the row-softmax targets: the loss becomes
    ½[CE(Lᵀ, T) + CE(L, Tᵀ)], equal to the original only when T is symmetric (here it is not)."""
    tau = 0.3
    logits = G @ S.T / tau
    targets = np_softmax((S @ S.T + G @ G.T) / (2 * tau))
    swapped = 0.5 * (np_soft_ce(logits.T, targets) + np_soft_ce(logits, targets.T))
    np.testing.assert_allclose(instance_loss_scale(t(G), t(S), tau).numpy(), swapped, rtol=1e-10)
    assert abs(swapped.mean() - np_instance(S, G, tau).mean()) > 0.1  # not a symmetry of the BLEEP form
    # With s == g every term is symmetric, so both directions agree exactly.
    same = instance_loss_scale(t(S), t(S), tau).numpy()
    np.testing.assert_allclose(same, np_instance(S, S, tau), rtol=1e-10)


def test_instance_loss_low_when_aligned_high_when_shuffled() -> None:
    x = torch.nn.functional.normalize(t(RNG.normal(size=(16, 8))), dim=-1)
    aligned = float(instance_loss([x], x, 0.07))
    shuffled = float(instance_loss([x], x[torch.randperm(16, generator=torch.Generator().manual_seed(0))], 0.07))
    assert aligned < shuffled - 1.0


def np_lloyd(x: np.ndarray, k: int, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Reference Lloyd: init first k rows; assign (argmin squared distance), update means, empty → zero."""
    c = x[:k].copy()
    for _ in range(iters):
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        labels = d.argmin(1)
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else np.zeros(x.shape[1]) for j in range(k)])
    return labels, c


def test_kmeans_matches_reference_lloyd() -> None:
    x = RNG.normal(size=(3, 40, 3))
    labels, cent = kmeans(t(x), k=5, iters=10)
    for b in range(3):
        ref_labels, ref_cent = np_lloyd(x[b], 5)
        np.testing.assert_array_equal(labels[b].numpy(), ref_labels)
        np.testing.assert_allclose(cent[b].numpy(), ref_cent, rtol=1e-10, atol=1e-12)


def test_kmeans_empty_cluster_gets_zero_centroid() -> None:
    x = t(np.array([[5.0, 5.0], [5.0, 5.0], [6.0, 5.0], [10.0, 10.0], [9.0, 11.0]]))
    labels, cent = kmeans(x, k=3)
    assert not (labels == 1).any()
    np.testing.assert_array_equal(cent[1].numpy(), [0.0, 0.0])


def test_kmeans_caps_k_at_batch_and_centroids_carry_gradient() -> None:
    x = t(RNG.normal(size=(4, 3))).requires_grad_()
    labels, cent = kmeans(x, k=18)
    assert cent.shape == (4, 3) and labels.shape == (4,)
    cent.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([-(logits[i, labels[i]] - math.log(np.exp(logits[i]).sum())) for i in range(len(labels))]))


@pytest.mark.parametrize("form", ["reference", "cld"])
def test_group_loss_matches_equation(form: str) -> None:
    f, g = RNG.normal(size=(6, 3)), RNG.normal(size=(6, 3))
    u, v = RNG.normal(size=(6, 3)), RNG.normal(size=(6, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a_img, c_img = np_lloyd(u, 3)
    a_gene, c_gene = np_lloyd(v, 3)
    img, gene = (f, g) if form == "reference" else (u, v)
    tau_g = 0.07
    expected = 0.5 * (np_ce(img @ c_gene.T / tau_g, a_gene) + np_ce(gene @ c_img.T / tau_g, a_img))
    got, _ = group_loss(t(f), t(g), t(u), t(v), k=3, tau_g=tau_g, form=form)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_group_loss_rejects_unknown_form() -> None:
    x = t(RNG.normal(size=(4, 2)))
    with pytest.raises(ValueError, match="group form"):
        group_loss(x, x, x, x, k=2, form="other")  # type: ignore[arg-type]


def test_regression_and_triplex_losses_match_equation() -> None:
    y, fusion = RNG.normal(size=(4, 3)), RNG.normal(size=(4, 3))
    branches = [RNG.normal(size=(4, 3)) for _ in range(3)]
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    alpha = 0.3
    expected = mse(fusion, y) + sum((1 - alpha) * mse(b, y) + alpha * mse(fusion, b) for b in branches)
    total, parts = triplex_loss(t(fusion), [t(b) for b in branches], t(y), alpha=alpha)
    assert float(total) == pytest.approx(expected, rel=1e-10)
    assert float(parts["fusion"]) == pytest.approx(mse(fusion, y), rel=1e-10)
    assert float(regression_loss(t(fusion), t(y))) == pytest.approx(mse(fusion, y), rel=1e-10)


@pytest.mark.parametrize("detach", [True, False])
def test_triplex_teacher_detach_controls_fusion_gradient(detach: bool) -> None:
    y = t(RNG.normal(size=(4, 3)))
    fusion = y.clone().requires_grad_()  # exact fusion: its own MSE has zero gradient
    branch = t(RNG.normal(size=(4, 3))).requires_grad_()
    total, _ = triplex_loss(fusion, [branch], y, alpha=0.3, detach_teacher=detach)
    total.backward()
    assert branch.grad.abs().sum() > 0
    assert (fusion.grad.abs().sum() == 0) == detach
