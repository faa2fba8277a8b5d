"""Plain Lloyd k-means in torch, as the group pathway uses it (method.md §1.3 b).

Squared Euclidean distance, `iters` Lloyd steps, initialised with the first K rows, an empty cluster keeps a
zero centroid. Assignments carry no gradient; the returned centroids are the (differentiable) means of the
rows under the final assignment, so whatever produced `x` (the cluster head) is trained through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the rows of each cluster, (..., K, D); zero for an empty cluster."""
    onehot = F.one_hot(labels, k).to(x.dtype)  # (..., B, K)
    sums = onehot.transpose(-1, -2) @ x  # (..., K, D)
    counts = onehot.sum(dim=-2)[..., None]  # (..., K, 1)
    return sums / counts.clamp(min=1.0)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean; ties → lowest index)."""
    dist = ((x[..., :, None, :] - centroids[..., None, :, :]) ** 2).sum(dim=-1)
    return dist.argmin(dim=-1)


def kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of x (..., B, D) into k groups → labels (..., B) int64, centroids (..., K, D).

    Leading dimensions are independent problems (batched). k is capped at B.
    """
    if x.dim() < 2:
        raise ValueError(f"kmeans expects (..., B, D), got shape {tuple(x.shape)}")
    k = min(int(k), x.shape[-2])
    if k < 1:
        raise ValueError("kmeans needs k >= 1 and at least one row")
    with torch.no_grad():
        rows = x.detach()
        centroids = rows[..., :k, :].clone()
        for step in range(max(int(iters), 1)):
            labels = _assign(rows, centroids)
            if step < iters - 1:
                centroids = _centroids(rows, labels, k)
    # The last update step, recomputed with gradient.
    return labels, _centroids(x, labels, k)
