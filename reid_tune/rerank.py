"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), vectorised in PyTorch with memory that grows with the images times k.

As the authors' ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)``: squared distances
over all Q + G images, each row divided by its maximum; k-reciprocal neighbour sets from the k1 + 1
nearest, expanded by the candidates' round(k1 / 2)-reciprocal sets that share more than 2/3 with them;
Gaussian-weighted sparse rows V, averaged over the k2 nearest (query expansion); the Jaccard distance
of the queries' rows to every row; finally ``(1 - lambda) * jaccard + lambda * distance``. Neighbours
are ordered by distance, ties by index (a stable sort). Nothing here is N x N: distances come in row
chunks, neighbour lists are N x (k1 + 1), V is sparse, and the Jaccard sums run over V's columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from reid_tune.distances import cdist_matmul

CHUNK = 1024  # rows of distances computed at a time


@dataclass(frozen=True)
class Rerank:
    """The re-ranking's parameters (the authors' defaults)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


def rerank(
    query: torch.Tensor, gallery: torch.Tensor, options: Rerank = Rerank(), *, metric: str = "euclidean"
) -> torch.Tensor:
    """The re-ranked (Q, G) distances of ``query`` (Q, D) to ``gallery`` (G, D), float32, on their device."""
    images = torch.cat([query, gallery]).float()
    dist = _Distances(images, metric, options.k1 + 1)
    forward = dist.nearest  # (N, k1 + 1), nearest first
    values, columns = _expanded_rows(images, dist, forward, options.k1)
    v = _sparse(values, columns, len(images))
    if options.k2 != 1:
        v = _query_expansion(v, forward[:, : options.k2])
    num_queries, lam = len(query), options.lambda_value
    final = torch.empty(num_queries, len(gallery), device=images.device)
    for start, jaccard in _jaccard(v, num_queries):  # query chunks: only (Q, G) is ever whole
        stop = start + len(jaccard)
        final[start:stop] = (jaccard * (1 - lam) + dist.rows(start, stop) * lam)[:, num_queries:]
    return final


class _Distances:
    """Squared distances of every image to every other, each row divided by its maximum, by row chunks;
    one pass finds each row's maximum and its nearest images."""

    SLACK = 8  # extra nearest kept per row, so that ties at the k-th distance are ordered exactly

    def __init__(self, images: torch.Tensor, metric: str, k: int) -> None:
        self.images, self.metric = images, metric
        maxima, nearest = [], []
        for start in range(0, len(images), CHUNK):
            squared = self._squared(start, min(start + CHUNK, len(images)))
            maxima.append(squared.amax(1))
            nearest.append(_stable_smallest(squared, maxima[-1], k, self.SLACK))
        self.row_max, self.nearest = torch.cat(maxima), torch.cat(nearest)

    def _squared(self, start: int, stop: int) -> torch.Tensor:
        return cdist_matmul(self.images[start:stop], self.images, self.metric).pow(2)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (as the authors' ``original_dist``)."""
        return self._squared(start, stop) / self.row_max[start:stop, None]

    def pairs(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``original_dist[rows, columns]`` for (R, L) columns of the R rows."""
        dist = torch.stack(
            [
                cdist_matmul(self.images[r, None], self.images[c], self.metric)[0]
                for r, c in zip(rows.tolist(), columns)
            ]
        )
        return dist.pow(2) / self.row_max[rows, None]


def _stable_smallest(squared: torch.Tensor, row_max: torch.Tensor, k: int, slack: int) -> torch.Tensor:
    """Column indices of the ``k`` smallest normalised values of each row (``squared / row_max``),
    ascending, ties by index: the order of a stable argsort of the authors' ``original_dist``."""
    width = min(k + slack, squared.shape[1])
    raw, picked = squared.topk(width, dim=1, largest=False)
    values = raw / row_max[:, None]  # as rows() divides: the same float32 values
    exact = (values[:, -1] > values[:, k - 1]) | (width == squared.shape[1])
    order = picked.sort(dim=1).indices
    picked, values = picked.gather(1, order), values.gather(1, order)  # by index, then stably by value
    nearest = picked.gather(1, values.sort(dim=1, stable=True).indices)[:, :k]
    crowded = (~exact).nonzero()[:, 0]  # more than ``slack`` values tie with the k-th: the whole row
    if len(crowded):
        nearest[crowded] = _whole_rows_smallest(squared[crowded] / row_max[crowded, None], k)
    return nearest


def _whole_rows_smallest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_stable_smallest` over whole rows, for rows with many ties at the k-th value."""
    kth = rows.topk(k, dim=1, largest=False).values[:, -1:]
    below, tied = rows < kth, rows == kth
    take = below | (tied & (tied.cumsum(1) <= k - below.sum(1, keepdim=True)))
    picked = take.nonzero()[:, 1].view(len(rows), k)  # ascending index within each row
    return picked.gather(1, rows.gather(1, picked).sort(dim=1, stable=True).indices)


def _reciprocal(forward: torch.Tensor) -> torch.Tensor:
    """(N, k) mask: ``forward[i, j]`` is a k-reciprocal neighbour of i (i is among its k nearest)."""
    me = torch.arange(len(forward), device=forward.device)[:, None, None]
    return (forward[forward] == me).any(-1)


def _expanded_rows(
    images: torch.Tensor, dist: _Distances, forward: torch.Tensor, k1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """V's rows: for each image, its expanded k-reciprocal set (columns, -1 padded, unique) and the
    normalised Gaussian weights exp(-distance) over them."""
    recip = _reciprocal(forward)  # (N, k1 + 1)
    half = forward[:, : round(k1 / 2) + 1]
    half_recip = _reciprocal(half)  # (N, h + 1)
    values, columns = [], []
    for start in range(0, len(forward), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(forward)), device=forward.device)
        cols = _expansion(forward[rows], recip[rows], half, half_recip)
        valid = cols >= 0
        weights = torch.exp(-dist.pairs(rows, cols.clamp_min(0))) * valid
        values.append(weights / weights.sum(1, keepdim=True))
        columns.append(cols)
    return torch.cat(values), torch.cat(columns)


def _expansion(
    forward: torch.Tensor, recip: torch.Tensor, half: torch.Tensor, half_recip: torch.Tensor
) -> torch.Tensor:
    """Each row's k-reciprocal set with the candidates' half sets that overlap it by more than 2/3:
    unique columns ascending, -1 where a row has fewer."""
    mine = torch.where(recip, forward, -1)  # (R, k1 + 1) the k-reciprocal set R(i)
    candidates = half[forward]  # (R, k1 + 1, h + 1): each neighbour's half list
    candidate_sets = torch.where(half_recip[forward], candidates, -2)  # its half-reciprocal set
    shared = (candidate_sets[..., None] == mine[:, None, None, :]).any(-1).sum(-1)
    size = half_recip[forward].sum(-1)
    joins = recip & (shared > 2 / 3 * size)  # (R, k1 + 1)
    added = torch.where(joins[..., None] & half_recip[forward], candidates, -1).flatten(1)
    both = torch.cat([mine, added], 1).sort(dim=1).values
    repeated = torch.cat([torch.zeros_like(both[:, :1], dtype=torch.bool), both[:, 1:] == both[:, :-1]], 1)
    return torch.where(repeated, -1, both)


def _sparse(values: torch.Tensor, columns: torch.Tensor, n: int) -> torch.Tensor:
    """The (N, N) sparse matrix of rows ``values`` at ``columns`` (entries at -1 dropped)."""
    rows = torch.arange(len(columns), device=columns.device)[:, None].expand_as(columns)
    keep = columns >= 0
    indices = torch.stack([rows[keep], columns[keep]])
    return torch.sparse_coo_tensor(indices, values[keep], (n, n), check_invariants=False).coalesce()


def _query_expansion(v: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Each row of ``v`` replaced by the mean of the rows of its ``nearest`` (k2) images."""
    n, k2 = nearest.shape
    rows = torch.arange(n, device=nearest.device).repeat_interleave(k2)
    weights = torch.full((n * k2,), 1 / k2, device=nearest.device)
    average = torch.sparse_coo_tensor(
        torch.stack([rows, nearest.flatten()]), weights, (n, n), check_invariants=False
    )
    with warnings.catch_warnings():  # sparse x sparse goes through CSR, which torch calls beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse.mm(average.coalesce(), v).coalesce()


def _jaccard(v: torch.Tensor, num_queries: int, chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """1 - m / (2 - m) with m[i, j] = sum_k min(V[i, k], V[j, k]) for the first ``num_queries`` rows, by
    chunks of rows: (first row, the chunk's (rows, N) distances)."""
    n = v.shape[0]
    by_column = v.t().coalesce()  # rows of V^T: each column k's nonzero rows j and values
    col_rows, col_values = by_column.indices()[1], by_column.values()
    starts = torch.searchsorted(by_column.indices()[0], torch.arange(n + 1, device=v.device))
    counts = starts[1:] - starts[:-1]
    mine = v.indices()[0] < num_queries
    q_rows, q_cols, q_values = v.indices()[0][mine], v.indices()[1][mine], v.values()[mine]
    for start in range(0, num_queries, chunk):
        sel = (q_rows >= start) & (q_rows < start + chunk)
        rows, cols, vals = q_rows[sel] - start, q_cols[sel], q_values[sel]
        repeat = counts[cols]
        offsets = torch.repeat_interleave(starts[cols], repeat)
        within = torch.arange(int(repeat.sum()), device=v.device) - torch.repeat_interleave(
            torch.cumsum(repeat, 0) - repeat, repeat
        )
        partners = offsets + within
        mins = torch.minimum(torch.repeat_interleave(vals, repeat), col_values[partners])
        flat = torch.repeat_interleave(rows, repeat) * n + col_rows[partners]
        stop = min(start + chunk, num_queries)
        m = torch.zeros((stop - start) * n, device=v.device).index_add_(0, flat, mins).view(-1, n)
        yield start, 1 - m / (2 - m)
