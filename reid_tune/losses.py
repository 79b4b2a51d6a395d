"""Triplet losses of Hermans et al. (2017) as composable parts: distance, mining, margin.

``cdist`` (``reid_tune.distances``) gives the all-pairs distances, a miner (:data:`MINERS`) picks the
triplets and returns ``d(a, p) - d(a, n)`` through :func:`apply_margin`, and :class:`TripletLoss`
glues them together and adds the in-batch statistics triplet-reid logs. Everything is a pure
function of ``(embeddings, labels)``, so global mining can run it on all-gathered embeddings, and has
static shapes without host syncs (masks, never boolean indexing), so a CUDA graph can capture it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from reid_tune.distances import cdist, check_metric
from reid_tune.errors import ConfigError
from reid_tune.vocabulary import LOSSES, choose, parse_margin

# A loss above this counts as an active (non-zero) triplet, as in triplet-reid's ``num_active``.
ACTIVE_THRESHOLD = 1e-5


def apply_margin(x: torch.Tensor, margin: str | float) -> torch.Tensor:
    """Turn ``d(a, p) - d(a, n)`` into a loss: hinge ``relu(x + m)``, ``softplus(x)`` or ``x`` itself."""
    margin = parse_margin(margin)
    if margin == "soft":
        return F.softplus(x)
    if margin == "none":
        return x
    return F.relu(x + margin)


def _pair_masks(dists: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, B) masks of positive pairs (same label, not itself) and negative pairs."""
    if dists.dim() != 2 or dists.shape[0] != dists.shape[1] or labels.shape != dists.shape[:1]:
        raise ConfigError(
            f"dists {tuple(dists.shape)} and labels {tuple(labels.shape)}: must be (B, B) and (B,)"
        )
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _hardest(
    dists: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor, the furthest positive (-inf if none) and the closest negative (+inf if none)."""
    furthest_pos = dists.masked_fill(~positive, -math.inf).amax(dim=1)
    closest_neg = dists.masked_fill(~negative, math.inf).amin(dim=1)
    return furthest_pos, closest_neg


class Mined(NamedTuple):
    """A miner's losses in a static shape, and which of them are triplets (``None``: all of them)."""

    losses: torch.Tensor
    valid: torch.Tensor | None = None

    def mean(self) -> torch.Tensor:
        """The mean loss over the triplets (NaN if there are none)."""
        return _masked_mean(self.losses, self.valid)


def batch_hard(dists: torch.Tensor, labels: torch.Tensor, margin: str | float) -> Mined:
    """Batch-hard loss per anchor, shape (B,): its furthest positive against its closest negative.

    An anchor without a positive or a negative in the batch has no triplet and gets loss 0 (with zero
    gradient), counted in the mean as in triplet-reid; in a PK batch every anchor has both.
    """
    positive, negative = _pair_masks(dists, labels)
    furthest_pos, closest_neg = _hardest(dists, positive, negative)
    has_triplet = positive.any(dim=1) & negative.any(dim=1)
    return Mined(torch.where(has_triplet, apply_margin(furthest_pos - closest_neg, margin), 0.0))


def batch_all(dists: torch.Tensor, labels: torch.Tensor, margin: str | float) -> Mined:
    """Losses of all (anchor, positive, negative) triples at ``[a, p, n]``, shape (B, B, B).

    ``valid`` marks the triplets (losses are 0 elsewhere): ``losses[valid]`` lists them in (a, p, n) order.
    """
    positive, negative = _pair_masks(dists, labels)
    valid = positive[:, :, None] & negative[:, None, :]
    diffs = dists[:, :, None] - dists[:, None, :]  # d(a, p) - d(a, n) at [a, p, n]
    return Mined(torch.where(valid, apply_margin(diffs, margin), 0.0), valid)


Miner = Callable[[torch.Tensor, torch.Tensor, str | float], Mined]
MINERS: dict[str, Miner] = {"batch_hard": batch_hard, "batch_all": batch_all}  # vocabulary.LOSSES


Stats3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _mean_min_max(values: torch.Tensor, mask: torch.Tensor | None = None) -> Stats3:
    """Mean, min and max of ``values[mask]`` (all of them if no mask) without dynamic shapes.

    All three are NaN for an empty selection.
    """
    if values.numel() == 0:
        nan = values.new_full((), math.nan)
        return nan, nan, nan
    if mask is None:
        return values.mean(), values.amin(), values.amax()
    low = torch.where(mask, values, math.inf).amin()
    high = torch.where(mask, values, -math.inf).amax()
    empty = ~mask.any()
    return _masked_mean(values, mask), torch.where(empty, math.nan, low), torch.where(empty, math.nan, high)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values[mask]`` (all of them if no mask) without dynamic shapes; NaN if none."""
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def _named(prefix: str, stats: Stats3) -> dict[str, torch.Tensor]:
    return dict(zip((f"{prefix}_mean", f"{prefix}_min", f"{prefix}_max"), stats))


@torch.no_grad()
def triplet_stats(
    dists: torch.Tensor,
    labels: torch.Tensor,
    mined: Mined,
    embeddings: torch.Tensor,
    *,
    k: int,
) -> dict[str, torch.Tensor]:
    """What triplet-reid monitors during training, as detached scalar tensors (no host sync).

    Losses over the mined triplets. ``top1``/``prec_at_k``: how often an anchor's nearest / ``k``
    nearest other samples in the batch share its label (``k = K - 1`` in training). Distances over
    pairs, hardest distances over anchors that have them, embedding norms over samples.
    """
    batch = len(labels)
    if not 1 <= k <= batch - 1:
        raise ConfigError(f"k={k}: must be in [1, {batch - 1}] (batch size - 1)")
    dists, losses = dists.detach(), mined.losses.detach()
    positive, negative = _pair_masks(dists, labels)
    same = labels[:, None] == labels[None, :]
    others = dists.masked_fill(torch.eye(batch, dtype=torch.bool, device=dists.device), math.inf)
    nearest_same = same.gather(1, others.topk(k, dim=1, largest=False).indices).to(dists.dtype)
    furthest_pos, closest_neg = _hardest(dists, positive, negative)
    return {
        **_named("loss", _mean_min_max(losses, mined.valid)),
        "active_fraction": _masked_mean((losses > ACTIVE_THRESHOLD).to(dists.dtype), mined.valid),
        "top1": nearest_same[:, 0].mean(),
        "prec_at_k": nearest_same.mean(),
        **_named("pos_dist", _mean_min_max(dists, positive)),
        **_named("neg_dist", _mean_min_max(dists, negative)),
        "hardest_pos_mean": _mean_min_max(furthest_pos, positive.any(dim=1))[0],
        "hardest_neg_mean": _mean_min_max(closest_neg, negative.any(dim=1))[0],
        **_named("emb_norm", _mean_min_max(embeddings.detach().norm(dim=1))),
    }


class TripletLoss(torch.nn.Module):
    """Distance + miner + margin: ``forward(embeddings, labels) -> (mean loss, stats)``.

    Distances are computed in (at least) float32 with autocast disabled, so mixed-precision
    training does not mine on half-precision distances.
    """

    def __init__(
        self,
        *,
        margin: float | str = "soft",
        metric: str = "euclidean",
        mining: str = "batch_hard",
        precision_k: int | None = None,
    ) -> None:
        super().__init__()
        choose("mining", mining, LOSSES)
        if precision_k is not None and precision_k < 1:
            raise ConfigError(f"precision_k={precision_k}: must be >= 1 or None")
        self.margin = parse_margin(margin)
        self.metric = check_metric(metric)
        self.mining = mining
        self.precision_k = precision_k

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the mined triplets, and :func:`triplet_stats` (empty if ``precision_k`` is None)."""
        if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
            shapes = f"embeddings {tuple(embeddings.shape)} and labels {tuple(labels.shape)}"
            raise ConfigError(f"{shapes}: must be (B, D) and (B,)")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            dists = cdist(embeddings, embeddings, self.metric)
            mined = MINERS[self.mining](dists, labels, self.margin)
        if self.precision_k is None:
            return mined.mean(), {}
        return mined.mean(), triplet_stats(dists, labels, mined, embeddings, k=self.precision_k)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin!r}, metric={self.metric!r}, mining={self.mining!r}, "
            f"precision_k={self.precision_k}"
        )
