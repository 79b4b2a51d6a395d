"""Triplet losses and statistics against slow, obvious loop references over listed triplets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from reid_tune.distances import cdist
from reid_tune.losses import MINERS, Mined, TripletLoss, apply_margin, batch_all, batch_hard, triplet_stats
from reid_tune.vocabulary import parse_margin

MARGINS = [0.2, "soft", "none"]
METRICS = ["euclidean", "sqeuclidean", "cityblock"]
UNBALANCED = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4]  # identity 2 is a singleton: anchor 5 has no positive


def pk_labels(p: int, k: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)


def embeddings(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(0), dtype=dtype).requires_grad_()


def triplets(mined: Mined) -> torch.Tensor:
    """The mined triplets' losses, flattened (what the references list)."""
    return mined.losses if mined.valid is None else mined.losses[mined.valid]


# --- references: one pair, one triplet at a time ---------------------------------------------


def ref_dist(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    diff = x - y
    if metric == "cityblock":
        return diff.abs().sum()
    squared = (diff * diff).sum()
    return squared if metric == "sqeuclidean" else torch.sqrt(squared + 1e-12)


def ref_margin(x: torch.Tensor, margin: float | str) -> torch.Tensor:
    if margin == "soft":
        return torch.log(1 + torch.exp(x))
    if margin == "none":
        return x
    return torch.clamp(x + margin, min=0)


def positives(labels: list[int], a: int) -> list[int]:
    return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def negatives(labels: list[int], a: int) -> list[int]:
    return [n for n in range(len(labels)) if labels[n] != labels[a]]


def ref_batch_hard(emb: torch.Tensor, labels: list[int], margin: float | str, metric: str) -> torch.Tensor:
    losses = []
    for a in range(len(labels)):
        pos = [ref_dist(emb[a], emb[p], metric) for p in positives(labels, a)]
        neg = [ref_dist(emb[a], emb[n], metric) for n in negatives(labels, a)]
        losses.append(ref_margin(max(pos) - min(neg), margin) if pos and neg else emb.new_zeros(()))
    return torch.stack(losses)


def ref_batch_all(emb: torch.Tensor, labels: list[int], margin: float | str, metric: str) -> torch.Tensor:
    losses = [
        ref_margin(ref_dist(emb[a], emb[p], metric) - ref_dist(emb[a], emb[n], metric), margin)
        for a in range(len(labels))
        for p in positives(labels, a)
        for n in negatives(labels, a)
    ]
    return torch.stack(losses)


REFERENCES = {"batch_hard": ref_batch_hard, "batch_all": ref_batch_all}


def check_against_reference(
    mining: str, labels: torch.Tensor, margin: float | str, metric: str, dtype: torch.dtype
) -> None:
    """Losses, their mean and the gradient w.r.t. the embeddings all match the loop reference."""
    emb = embeddings(len(labels), dtype)
    mined = MINERS[mining](cdist(emb, emb, metric), labels, margin)
    (grad,) = torch.autograd.grad(mined.mean(), emb)
    losses = triplets(mined)
    ref_emb = emb.detach().clone().requires_grad_()
    ref = REFERENCES[mining](ref_emb, labels.tolist(), margin, metric)
    (ref_grad,) = torch.autograd.grad(ref.mean(), ref_emb)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    assert losses.dtype == dtype
    torch.testing.assert_close(losses, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("mining", list(MINERS))
def test_miners_match_reference(mining: str, margin: float | str, metric: str, dtype: torch.dtype) -> None:
    check_against_reference(mining, pk_labels(5, 3), margin, metric, dtype)


@pytest.mark.parametrize(("p", "k"), [(4, 2), (6, 3), (8, 4)])
@pytest.mark.parametrize("mining", list(MINERS))
def test_miners_on_pk_shapes(mining: str, p: int, k: int) -> None:
    check_against_reference(mining, pk_labels(p, k), "soft", "euclidean", torch.float32)


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("mining", list(MINERS))
def test_miners_on_unbalanced_batch(mining: str, margin: float | str) -> None:
    check_against_reference(mining, torch.tensor(UNBALANCED), margin, "euclidean", torch.float64)


def test_anchor_without_positive_has_zero_loss_and_gradient() -> None:
    emb = embeddings(len(UNBALANCED), torch.float64)
    losses = batch_hard(cdist(emb, emb), torch.tensor(UNBALANCED), "none").losses
    assert losses[5] == 0
    assert torch.isfinite(torch.autograd.grad(losses.sum(), emb)[0]).all()


def test_batch_hard_with_zero_distances() -> None:
    """Duplicate embeddings (distance exactly 0 in cityblock) still pick the right pairs."""
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], requires_grad=True)
    losses = batch_hard(cdist(emb, emb, "cityblock"), torch.tensor([0, 0, 1, 1]), "none").losses
    torch.testing.assert_close(losses.detach(), torch.tensor([-1.0, -1.0, 1.0, -1.0]))


def test_batch_all_lists_triplets_in_anchor_positive_negative_order() -> None:
    dists = torch.arange(16.0).reshape(4, 4)
    losses = triplets(batch_all(dists, torch.tensor([0, 0, 1, 1]), "none"))
    expected = [dists[a, p] - dists[a, n] for a, p, n in [(0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3)]]
    expected += [dists[a, p] - dists[a, n] for a, p, n in [(2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)]]
    torch.testing.assert_close(losses, torch.stack(expected))


@pytest.mark.parametrize("margin", MARGINS)
def test_apply_margin(margin: float | str) -> None:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(apply_margin(x, margin), torch.stack([ref_margin(v, margin) for v in x]))


def test_apply_margin_parses_words() -> None:
    x = torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(apply_margin(x, "SOFT"), apply_margin(x, "soft"))


# --- parse_margin ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.2, 0.2), (0, 0.0), ("0.5", 0.5), ("Soft", "soft"), (" NONE ", "none"), (1, 1.0)],
)
def test_parse_margin(value: str | float, expected: float | str) -> None:
    assert parse_margin(value) == expected


@pytest.mark.parametrize("value", [-0.1, "hard", "", None, True, math.nan, math.inf, "-1"])
def test_parse_margin_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^margin=.*: expected a number >= 0, 'soft' or 'none'$"):
        parse_margin(value)  # type: ignore[arg-type]


# --- statistics --------------------------------------------------------------------------------


def clustered(labels: torch.Tensor, *, noise: float = 0.7) -> torch.Tensor:
    """Embeddings around one centre per identity: some triplets active, some not; top1 in (0, 1)."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(int(labels.max()) + 1, 6, generator=gen, dtype=torch.float64)
    return centres[labels] + noise * torch.randn(len(labels), 6, generator=gen, dtype=torch.float64)


def ref_stats(dists: np.ndarray, labels: list[int], losses: np.ndarray, emb: np.ndarray, k: int) -> dict:
    """triplet-reid's monitoring, computed one anchor and one pair at a time."""
    batch = len(labels)
    pos = [dists[a, p] for a in range(batch) for p in positives(labels, a)]
    neg = [dists[a, n] for a in range(batch) for n in negatives(labels, a)]
    nearest_same = []
    for a in range(batch):
        others = sorted((j for j in range(batch) if j != a), key=lambda j: dists[a, j])
        nearest_same.append([labels[j] == labels[a] for j in others[:k]])
    norms = [math.sqrt(sum(v * v for v in row)) for row in emb]
    stats = {"active_fraction": np.mean([loss > 1e-5 for loss in losses])}
    stats["top1"] = np.mean([row[0] for row in nearest_same])
    stats["prec_at_k"] = np.mean(nearest_same)
    hardest_pos = [max(dists[a, p] for p in positives(labels, a)) for a in range(batch)]
    hardest_neg = [min(dists[a, n] for n in negatives(labels, a)) for a in range(batch)]
    stats["hardest_pos_mean"], stats["hardest_neg_mean"] = np.mean(hardest_pos), np.mean(hardest_neg)
    for name, values in [("loss", losses), ("pos_dist", pos), ("neg_dist", neg), ("emb_norm", norms)]:
        stats.update({f"{name}_mean": np.mean(values), f"{name}_min": min(values)})
        stats[f"{name}_max"] = max(values)
    return stats


@pytest.mark.parametrize(("labels", "k"), [(pk_labels(4, 3).tolist(), 2), (pk_labels(5, 2).tolist(), 1)])
@pytest.mark.parametrize("mining", list(MINERS))
def test_triplet_stats_match_reference(labels: list[int], k: int, mining: str) -> None:
    emb = clustered(torch.tensor(labels)).requires_grad_()
    dists = cdist(emb, emb)
    mined = MINERS[mining](dists, torch.tensor(labels), 0.2)
    stats = triplet_stats(dists, torch.tensor(labels), mined, emb, k=k)
    ref = ref_stats(dists.detach().numpy(), labels, triplets(mined).detach().numpy(), emb.detach().numpy(), k)
    assert set(stats) == set(ref)
    for name, value in stats.items():
        assert value.dim() == 0 and not value.requires_grad, name
        assert value.item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    assert 0 < stats["active_fraction"] < 1 and 0 < stats["top1"] < 1, "a non-trivial batch"


def test_triplet_stats_without_triplets_are_nan() -> None:
    emb = embeddings(4, torch.float32)
    labels = torch.arange(4)
    dists = cdist(emb, emb)
    stats = triplet_stats(dists, labels, batch_all(dists, labels, "soft"), emb, k=1)
    for name in ["loss_mean", "loss_min", "loss_max", "pos_dist_mean", "pos_dist_min", "hardest_pos_mean"]:
        assert math.isnan(stats[name]), name
    assert stats["top1"] == 0 and math.isfinite(stats["neg_dist_max"])


@pytest.mark.parametrize("k", [0, 8])
def test_triplet_stats_rejects_k(k: int) -> None:
    emb = embeddings(8, torch.float32)
    labels = pk_labels(4, 2)
    dists = cdist(emb, emb)
    with pytest.raises(ValueError, match=rf"k={k}: must be in \[1, 7\]"):
        triplet_stats(dists, labels, batch_hard(dists, labels, "soft"), emb, k=k)


# --- TripletLoss -------------------------------------------------------------------------------


@pytest.mark.parametrize(("mining", "margin", "metric"), list(itertools.product(MINERS, MARGINS, METRICS)))
def test_triplet_loss_is_the_composition(mining: str, margin: float | str, metric: str) -> None:
    emb, labels = embeddings(12, torch.float32), pk_labels(4, 3)
    loss, stats = TripletLoss(margin=margin, metric=metric, mining=mining, precision_k=2)(emb, labels)
    dists = cdist(emb, emb, metric)
    mined = MINERS[mining](dists, labels, margin)
    torch.testing.assert_close(loss, triplets(mined).mean())
    expected = triplet_stats(dists, labels, mined, emb, k=2)
    assert set(stats) == set(expected)
    for name in stats:
        torch.testing.assert_close(stats[name], expected[name])


@pytest.mark.parametrize("mining", list(MINERS))
def test_triplet_loss_traces_as_one_graph(mining: str) -> None:
    """No boolean indexing, no host sync: loss and statistics trace whole (as CUDA-graph capture needs)."""
    emb, labels = embeddings(12, torch.float32), pk_labels(4, 3)
    traced = torch.compile(TripletLoss(mining=mining, precision_k=2), fullgraph=True, backend="eager")
    loss, stats = traced(emb, labels)
    want, expected = TripletLoss(mining=mining, precision_k=2)(emb, labels)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(stats, expected)


def test_triplet_loss_without_precision_k_returns_no_stats() -> None:
    loss, stats = TripletLoss()(embeddings(8, torch.float32), pk_labels(4, 2))
    assert loss.dim() == 0 and loss.requires_grad and stats == {}


def test_triplet_loss_computes_in_float32_under_autocast() -> None:
    emb, labels = embeddings(12, torch.float32), pk_labels(4, 3)
    half = emb.detach().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = TripletLoss(precision_k=2)(half, labels)
    want, _ = TripletLoss()(half.float(), labels)
    assert loss.dtype == torch.float32 and stats["pos_dist_mean"].dtype == torch.float32
    torch.testing.assert_close(loss, want)


def test_triplet_loss_keeps_float64() -> None:
    loss, _ = TripletLoss()(embeddings(8, torch.float64), pk_labels(4, 2))
    assert loss.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mining": "batch_sample"}, "mining='batch_sample': unknown; expected one of batch_hard, batch_all"),
        ({"metric": "cosine"}, "metric='cosine': unknown; expected one of"),
        ({"margin": "hard"}, "margin='hard': expected a number"),
        ({"precision_k": 0}, "precision_k=0: must be >= 1 or None"),
    ],
)
def test_triplet_loss_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TripletLoss(**kwargs)


def test_triplet_loss_rejects_mismatched_labels() -> None:
    message = r"embeddings \(8, 6\) and labels \(7,\): must be \(B, D\) and \(B,\)"
    with pytest.raises(ValueError, match=message):
        TripletLoss()(embeddings(8, torch.float32), torch.arange(7))
