"""The Gene-DML losses (method.md §1.3) and the TRIPLEX loss (method.md §2), equation by equation."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from genedml.heads.kmeans import kmeans

GroupForm = Literal["reference", "cld"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE_soft(p, q)(i) = −Σ_j q_ij log softmax(p)_ij, per row i."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def instance_loss_scale(s: torch.Tensor, g: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Soft-target CLIP loss of one scale: per-spot ½[CE(logits, T) + CE(logitsᵀ, Tᵀ)], shape (B,).

    logits = g·sᵀ/τ, T = softmax((s·sᵀ + g·gᵀ)/(2τ)) row-wise. Note Tᵀ (as in BLEEP) has columns, not rows,
    summing to one, so swapping s and g is *not* an exact symmetry of this loss.
    """
    logits = g @ s.T / tau
    targets = F.softmax((s @ s.T + g @ g.T) / (2 * tau), dim=-1)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))


def instance_loss(scales: Sequence[torch.Tensor], g: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """L_ins = mean_i of the per-scale losses averaged over the scales present."""
    if not scales:
        raise ValueError("instance_loss needs at least one scale embedding")
    per_spot = torch.stack([instance_loss_scale(s, g, tau) for s in scales]).mean(dim=0)
    return per_spot.mean()


def group_loss(
    f: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    k: int = 18,
    tau_g: float = 0.07,
    form: GroupForm = "reference",
    iters: int = 10,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-level instance–group loss ½[CE(a·C_Gᵀ/τ_g, a_G) + CE(b·C_Iᵀ/τ_g, a_I)].

    u = h(f), v = h(g) live in the shared cluster-head space; k-means on u gives (a_I, C_I), on v (a_G, C_G).
    form "reference" (the authors' code): (a, b) = (f, g); form "cld" (Wang et al. 2021): (a, b) = (u, v).
    K is capped at the batch size. Returns the loss and the clusterings (for inspection).
    """
    labels_img, cent_img = kmeans(u, k, iters)
    labels_gene, cent_gene = kmeans(v, k, iters)
    if form == "reference":
        img, gene = f, g
    elif form == "cld":
        img, gene = u, v
    else:
        raise ValueError(f"unknown group form {form!r}; use 'reference' or 'cld'")
    loss = 0.5 * (
        F.cross_entropy(img @ cent_gene.T / tau_g, labels_gene)
        + F.cross_entropy(gene @ cent_img.T / tau_g, labels_img)
    )
    return loss, {"labels_image": labels_img, "labels_gene": labels_gene}


def regression_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_pred = MSE(prediction, y)."""
    return F.mse_loss(pred, y)


def triplex_loss(
    fusion: torch.Tensor,
    branches: Sequence[torch.Tensor],
    y: torch.Tensor,
    alpha: float = 0.3,
    detach_teacher: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(fusion, y) + Σ_b [(1−α)·MSE(b, y) + α·MSE(fusion, b)].

    The fusion output is the teacher of the branch outputs; with detach_teacher (default) the distillation
    term pulls only the branches towards it, as in knowledge distillation, not the fusion towards them.
    """
    teacher = fusion.detach() if detach_teacher else fusion
    fused = F.mse_loss(fusion, y)
    supervised = fusion.new_zeros(())
    distilled = fusion.new_zeros(())
    for branch in branches:
        supervised = supervised + (1 - alpha) * F.mse_loss(branch, y)
        distilled = distilled + alpha * F.mse_loss(teacher, branch)
    total = fused + supervised + distilled
    return total, {"fusion": fused, "branch": supervised, "distill": distilled}
