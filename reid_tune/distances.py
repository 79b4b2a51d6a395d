"""Pairwise distances between embeddings, as triplet-reid's ``loss.cdist``."""

from __future__ import annotations

import torch

from reid_tune.errors import ConfigError
from reid_tune.vocabulary import METRICS, choose

# triplet-reid adds this inside the square root: the gradient of sqrt is undefined at 0.
EUCLIDEAN_EPS = 1e-12


def check_metric(metric: str) -> str:
    """Return ``metric`` if supported, else raise a ``ConfigError`` naming the choices."""
    choose("metric", metric, METRICS)
    return metric


def cdist(a: torch.Tensor, b: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """All pairwise distances between rows of ``a`` (N, D) and ``b`` (M, D), shape (N, M).

    ``euclidean`` is ``sqrt(d^2 + 1e-12)`` (never exactly 0, differentiable everywhere);
    the squared distances come from the difference tensor, not ``|a|^2 + |b|^2 - 2ab``,
    so they are exact and never negative. Use :func:`cdist_chunked` for large inputs.
    """
    check_metric(metric)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(f"cdist: expected (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    diffs = a[:, None, :] - b[None, :, :]  # (N, M, D)
    if metric == "cityblock":
        return diffs.abs().sum(-1)
    sq = diffs.square().sum(-1)
    return sq if metric == "sqeuclidean" else torch.sqrt(sq + EUCLIDEAN_EPS)


def cdist_matmul(a: torch.Tensor, b: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """:func:`cdist` through one matrix product (``|a|^2 + |b|^2 - 2ab``, clamped at 0): no (N, M, D)
    difference tensor, so large inputs fit in memory; equal to ``cdist`` up to rounding (cityblock: exact,
    through ``torch.cdist``)."""
    check_metric(metric)
    if metric == "cityblock":
        return torch.cdist(a, b, p=1)
    squared = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)
    return squared if metric == "sqeuclidean" else torch.sqrt(squared + EUCLIDEAN_EPS)
