"""k-reciprocal re-ranking against the authors' numpy implementation (benchmarks/reference_rerank.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_tune.distances import cdist_matmul
from reid_tune.evaluate import evaluate
from reid_tune.rerank import Rerank, rerank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_rerank  # noqa: E402


def _data(seed: int, *, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered query and gallery embeddings; with ``ties`` rounded to integers (many equal distances)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, 8, generator=gen) * 3
    q = centers[torch.arange(30) % 12] + torch.randn(30, 8, generator=gen)
    g = centers[torch.arange(90) % 12] + torch.randn(90, 8, generator=gen)
    return (q.round(), g.round()) if ties else (q, g)


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "no-ties"])
@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 1, 0.5), (7, 3, 0.0)])
def test_matches_the_authors_implementation(ties: bool, k1: int, k2: int, lam: float) -> None:
    q, g = _data(k1 + k2, ties=ties)
    want = reference_rerank.re_ranking(
        *(cdist_matmul(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))), k1, k2, lam
    )
    got = rerank(q, g, Rerank(k1, k2, lam)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rerank_matches_the_cpu() -> None:
    q, g = _data(0, ties=True)
    torch.testing.assert_close(rerank(q.cuda(), g.cuda()).cpu(), rerank(q, g), rtol=0, atol=1e-5)


def _crowded_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings on a 2-point grid: dozens of images at each distance (more ties than any slack)."""
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 2, (20, 3), generator=gen).float(), torch.randint(
        0, 2, (60, 3), generator=gen
    ).float()


def test_rows_with_many_ties_match_the_authors_implementation() -> None:
    q, g = _crowded_data()
    want = reference_rerank.re_ranking(
        *(cdist_matmul(a, b).numpy() for a, b in ((q, g), (q, q), (g, g))), 20, 6, 0.3
    )
    np.testing.assert_allclose(rerank(q, g).numpy(), want, rtol=0, atol=1e-5)


def test_evaluate_ranks_by_the_reranked_distances() -> None:
    """With lambda 1 the re-ranked distance is the row-normalised squared distance: the same ranking, so
    the same CMC and mAP as plain evaluation; with the defaults the evaluation follows the reference."""
    q, g = _data(1, ties=False)
    pids = lambda n: np.array([str(i % 12) for i in range(n)])  # noqa: E731
    fids = lambda n, cam: np.array([f"{i % 12:04d}_c{cam}s1_000000_00.jpg" for i in range(n)])  # noqa: E731
    args = (q.numpy(), g.numpy(), pids(30), pids(90), fids(30, 1), fids(90, 2))
    plain = evaluate(*args, excluder="market1501", device="cpu")
    same = evaluate(*args, excluder="market1501", device="cpu", rerank=Rerank(lambda_value=1.0))
    assert abs(plain.mAP - same.mAP) < 1e-6 and np.allclose(plain.cmc, same.cmc)
    reranked = evaluate(*args, excluder="market1501", device="cpu", rerank=Rerank())
    assert reranked.mAP != plain.mAP and 0 < reranked.mAP <= 1


def test_the_benchmark_runs_at_smoke_size(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_eval

    assert bench_eval.main(["--rerank", "--smoke", "--device", "cpu"]) == 0
    assert "authors' numpy" in capsys.readouterr().out
