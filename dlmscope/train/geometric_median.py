"""Geometric median by Weiszfeld's algorithm: the point minimising the sum of Euclidean distances.

Used by the trainer to initialise ``b_dec`` from the first batch of activations (the paper's recipe): the
median is robust to the heavy-tailed outlier tokens of LLM residual streams, unlike the mean.
"""
from __future__ import annotations

import torch
from torch import Tensor


def weiszfeld_objective(points: Tensor, y: Tensor) -> Tensor:
    """Sum of Euclidean distances from ``y`` [d] to every row of ``points`` [N, d]."""
    return (points - y).norm(dim=1).sum()


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-7, eps: float = 1e-12,
                     weights: Tensor | None = None) -> Tensor:
    """The (weighted) geometric median of the rows of ``points`` [N, d].

    Weiszfeld iterations ``y <- sum_i w_i x_i / sum_i w_i`` with ``w_i = a_i / max(|x_i - y|, eps)``, started
    at the (weighted) mean, computed in float64 and stopped when the step is below ``tol`` times the scale of
    the data (or after ``max_iter`` iterations). The result has ``points``' dtype and device. Host syncs: one
    per iteration (an init-time routine). When an iterate lands on a data point the ``eps`` clamp keeps the
    update finite; the objective never increases (a property of Weiszfeld's map), so the returned point is
    the best iterate seen.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [N, d] tensor, got shape {list(points.shape)}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or Inf")
    X = points.detach().to(torch.float64)
    a = torch.ones(X.shape[0], dtype=torch.float64, device=X.device) if weights is None else \
        weights.detach().to(device=X.device, dtype=torch.float64)
    if a.shape != (X.shape[0],) or bool((a < 0).any()) or not bool(a.sum() > 0):
        raise ValueError("weights must be a non-negative [N] tensor with a positive sum")
    y = (a[:, None] * X).sum(0) / a.sum()
    scale = float((X - y).norm(dim=1).mean()) or 1.0
    best, best_obj = y, float((a * (X - y).norm(dim=1)).sum())
    for _ in range(max_iter):
        dist = (X - y).norm(dim=1).clamp_min(eps * scale)
        w = a / dist
        y_new = (w[:, None] * X).sum(0) / w.sum()
        step = float((y_new - y).norm())
        y = y_new
        obj = float((a * (X - y).norm(dim=1)).sum())
        if obj < best_obj:
            best, best_obj = y, obj
        if step <= tol * scale:
            break
    return best.to(dtype=points.dtype)
