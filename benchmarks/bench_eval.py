"""Time ``reid_tune.evaluate`` against the triplet-reid reference port on Market-1501-sized data.

    python benchmarks/bench_eval.py            # Market-1501 size: 3,368 queries x 19,732 gallery
    python benchmarks/bench_eval.py --msmt     # + MSMT17 size (11,659 x 82,161), ours only
    python benchmarks/bench_eval.py --smoke    # tiny sizes, a few seconds (CI)
    python benchmarks/bench_eval.py --device cuda
    python benchmarks/bench_eval.py --rerank   # k-reciprocal re-ranking: Market size (+ --msmt), and
                                               # against the authors' numpy at a size it can hold

Needs PyTorch, numpy and scikit-learn only. The data are random but shaped like the real test
sets: test identities seen by several cameras, junk ('-1') and distractors ('0000') in the gallery,
embeddings clustered per identity with varying difficulty, so APs spread out. Exits non-zero
when any metric differs from the reference by more than 1e-6.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import reference_eval
import reference_rerank
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's reid_tune, uninstalled

from reid_tune.distances import cdist_matmul  # noqa: E402
from reid_tune.evaluate import EvalResult, evaluate  # noqa: E402
from reid_tune.rerank import rerank  # noqa: E402

RERANK_REFERENCE_SIZE = (1000, 4000)  # queries, gallery: the reference holds dense N x N float32 matrices

TOLERANCE = 1e-6
T = TypeVar("T")


@dataclass(frozen=True)
class Size:
    """A benchmark size, named after the data set it mimics."""

    name: str
    num_queries: int
    num_gallery: int
    num_ids: int
    num_distractors: int
    num_junk: int


MARKET = Size("Market-1501", 3368, 19732, 751, 2798, 3819)
MSMT = Size("MSMT17", 11659, 82161, 3060, 0, 0)
SMOKE = Size("smoke", 120, 700, 40, 60, 50)


# File names per camera convention: {cam1} is the 1-based camera, {slot} CUHK03's image slot
# (00-04 camera 0, 05-09 camera 1), {i} makes each name unique.
NAME_FORMATS = {
    "market1501": "{folder}/{pid}_c{cam1}s1_{i:06d}_00.jpg",
    "duke": "{folder}/{pid}_c{cam1}_f{i:07d}.jpg",
    "cuhk03": "{folder}/{i:06d}/{pid}_{slot:02d}.png",
}


def market_like(size: Size, *, dim: int = 128, convention: str = "market1501",
                seed: int = 0) -> dict[str, np.ndarray]:
    """Random query/gallery embeddings, pids and file names (``convention``'s) for ``size``.

    Identities are clusters in a 16-d latent space mapped into ``dim`` dims; each camera adds a
    bias (so same-camera pairs, which the excluder drops, would be easy) and each identity its own
    spread, so some queries are easy and some hard. Distractors and junk are other people.
    """
    rng = np.random.default_rng(seed)
    num_cameras = 2 if convention == "cuhk03" else 6
    latent = 16
    project = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    centers = rng.normal(size=(size.num_ids, latent))
    spread = rng.uniform(0.2, 0.6, size=size.num_ids)
    camera_bias = rng.normal(scale=0.3, size=(num_cameras, latent))
    pids = rng.choice(np.arange(1, 2 * size.num_ids + 1), size.num_ids, replace=False)
    pid_names = np.array([f"{pid:04d}" for pid in pids])

    def people(ids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        z = centers[ids] + camera_bias[cams] + spread[ids, None] * rng.normal(size=(len(ids), latent))
        return (z @ project + 0.05 * rng.normal(size=(len(ids), dim))).astype(np.float32)

    def strangers(n: int) -> np.ndarray:
        return people(rng.integers(0, size.num_ids, n), rng.integers(0, num_cameras, n)) + (
            rng.normal(scale=0.8, size=(n, latent)) @ project).astype(np.float32)

    query_ids = rng.permutation(np.resize(np.arange(size.num_ids), size.num_queries))
    num_real = size.num_gallery - size.num_distractors - size.num_junk
    gallery_ids = rng.permutation(np.resize(np.arange(size.num_ids), num_real))
    query_cams = rng.integers(0, num_cameras, size.num_queries)
    gallery_cams = rng.integers(0, num_cameras, size.num_gallery)
    gallery_pids = np.concatenate(
        [pid_names[gallery_ids], ["0000"] * size.num_distractors, ["-1"] * size.num_junk])
    gallery_embs = np.concatenate([people(gallery_ids, gallery_cams[:num_real]),
                                   strangers(size.num_distractors + size.num_junk)])
    return {
        "query_embs": people(query_ids, query_cams),
        "gallery_embs": gallery_embs,
        "query_pids": pid_names[query_ids],
        "gallery_pids": gallery_pids,
        "query_fids": _file_names(convention, "query", pid_names[query_ids], query_cams),
        "gallery_fids": _file_names(convention, "bounding_box_test", gallery_pids, gallery_cams),
    }


def _file_names(convention: str, folder: str, pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """Unique file names under ``folder`` that carry each image's pid and camera."""
    form = NAME_FORMATS[convention]
    return np.array([form.format(folder=folder, pid=pid, cam1=cam + 1, slot=5 * cam + i % 5, i=i)
                     for i, (pid, cam) in enumerate(zip(pids, cams))])


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], T], *, device: str) -> tuple[T, float, float]:
    """``fn()``, its wall time and this process's CPU time (all threads): on a shared machine
    the CPU time says what the run cost even when other processes stretch the wall time."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def time_ours(data: dict, *, market_ap: bool, device: str, repeats: int) -> tuple[EvalResult, float, float]:
    """The result and the (wall, CPU) seconds of the fastest of ``repeats`` runs after a warm-up."""
    runs = [timed(lambda: evaluate(**data, market_ap=market_ap, device=device), device=device)
            for _ in range(repeats + 1)]
    return min(runs[1:], key=lambda run: run[1])


def max_difference(ours: EvalResult, reference: dict) -> float:
    """Largest absolute difference over mAP, mINP, the CMC curve and the per-query APs."""
    if len(ours.aps) != len(reference["aps"]):
        return float("inf")
    scalars = [abs(ours.mAP - reference["mAP"]), abs(ours.mINP - reference["mINP"])]
    curves = [np.max(np.abs(ours.cmc - reference["CMC"])), np.max(np.abs(ours.aps - reference["aps"]))]
    return float(max(scalars + curves))


def run(size: Size, *, device: str, repeats: int, with_reference: bool) -> list[tuple]:
    """Table rows for ``size``, one per AP variant. Ours runs first, so the growth of the peak
    resident memory (and CUDA's peak allocation) measures ours, not the reference."""
    data = market_like(size)
    rss_before = _peak_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = {market_ap: time_ours(data, market_ap=market_ap, device=device, repeats=repeats)
            for market_ap in (False, True)}
    memory = f"host +{_peak_rss_mib() - rss_before:.0f} MiB"
    if device == "cuda":
        memory += f", GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    rows = []
    for market_ap, (result, ours_s, ours_cpu) in ours.items():
        ref_s = ref_cpu = diff = float("nan")
        if with_reference:
            reference, ref_s, ref_cpu = timed(
                lambda: reference_eval.reference_evaluate(**data, market_ap=market_ap), device="cpu")
            diff = max_difference(result, reference)
        name = f"{size.name} {size.num_queries}x{size.num_gallery}"
        rows.append((name, "market" if market_ap else "sklearn", device, f"{ref_s:.2f} ({ref_cpu:.2f})",
                     f"{ours_s:.3f} ({ours_cpu:.3f})", f"{ref_s / ours_s:.0f}x", diff, memory,
                     result.summary()))
    return rows


def rerank_rows(sizes: list[Size], *, device: str, reference_size: tuple[int, int]) -> list[str]:
    """Re-ranking alone (peak memory is this process's, so run it without the evaluation tables): ours
    at each size, then ours against the authors' implementation at a size it can hold."""
    rows = []
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        query, gallery = (torch.randn(n, 128, generator=gen).to(device) for n in
                          (size.num_queries, size.num_gallery))
        before = _peak_rss_mib()
        _, wall, cpu = timed(lambda: rerank(query, gallery), device=device)
        rows.append(f"{size.name} {size.num_queries}x{size.num_gallery} | ours {wall:.1f} s ({cpu:.1f} CPU s)"
                    f" | host +{_peak_rss_mib() - before:.0f} MiB (peak {_peak_rss_mib() / 1024:.2f} GiB)")
    q_n, g_n = reference_size
    gen = torch.Generator().manual_seed(1)
    query, gallery = torch.randn(q_n, 128, generator=gen), torch.randn(g_n, 128, generator=gen)
    ours, ours_s, _ = timed(lambda: rerank(query, gallery), device="cpu")
    dists = [cdist_matmul(a, b).numpy() for a, b in ((query, gallery), (query, query), (gallery, gallery))]
    want, ref_s, _ = timed(lambda: reference_rerank.re_ranking(*dists, 20, 6, 0.3), device="cpu")
    diff = float(np.max(np.abs(ours.numpy() - want)))
    rows.append(f"reference size {q_n}x{g_n} | ours {ours_s:.2f} s, authors' numpy {ref_s:.2f} s: "
                f"{ref_s / ours_s:.0f}x | max |diff| {diff:.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes only (a few seconds)")
    parser.add_argument("--msmt", action="store_true", help="also MSMT17 size, ours only")
    parser.add_argument("--msmt-reference", action="store_true",
                        help="with --msmt, also run the reference (tens of minutes)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of ours after a warm-up (the best is kept)")
    parser.add_argument("--rerank", action="store_true", help="time k-reciprocal re-ranking instead")
    parser.add_argument("--reference-size", default="x".join(map(str, RERANK_REFERENCE_SIZE)),
                        help="QxG of the re-ranking comparison with the authors' code (3368x19732: 13 GiB)")
    args = parser.parse_args(argv)
    if args.rerank:
        sizes = [SMOKE] if args.smoke else [MARKET] + ([MSMT] if args.msmt else [])
        reference_size = (40, 160) if args.smoke else tuple(map(int, args.reference_size.split("x")))
        for row in rerank_rows(sizes, device=args.device, reference_size=reference_size):
            print(row)
        return 0
    plan = [(SMOKE, True)] if args.smoke else [(MARKET, True)]
    if args.msmt and not args.smoke:
        plan.append((MSMT, args.msmt_reference))
    rows = [row for size, with_reference in plan
            for row in run(size, device=args.device, repeats=args.repeats, with_reference=with_reference)]
    header = ("size", "AP", "device", "reference s (CPU s)", "ours s (CPU s)", "speed-up", "max |diff|",
              "peak memory (ours)")
    print(" | ".join(header))
    for *cells, diff, memory, summary in rows:
        print(" | ".join([*cells, f"{diff:.1e}", memory]))
        print(f"    {summary}")
    failed = [row for row in rows if row[-3] > TOLERANCE]
    if failed:
        print(f"FAILED: results differ from the reference by more than {TOLERANCE}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
