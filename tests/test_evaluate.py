"""CMC / mAP / mINP against hand-worked numbers, the triplet-reid port and an independent loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from reid_tune.datasets import camera_ids, pids_from_names, write_csv
from reid_tune.errors import ReidTuneError
from reid_tune.evaluate import EvalResult, evaluate, evaluate_files, evaluation_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_eval  # noqa: E402
import reference_eval  # noqa: E402

SMALL = bench_eval.Size("small", 70, 360, 25, 30, 25)
ATOL = 1e-6


def _data(convention: str = "market1501", seed: int = 0, size: bench_eval.Size = SMALL) -> dict:
    """Small random data shaped like Market-1501's test set (junk, distractors, 6 cameras)."""
    return bench_eval.market_like(size, dim=16, convention=convention, seed=seed)


def _assert_matches_reference(result: EvalResult, reference: dict) -> None:
    assert len(result.aps) == len(reference["aps"])
    np.testing.assert_allclose(result.aps, reference["aps"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(result.cmc, reference["CMC"], rtol=0, atol=ATOL)
    assert result.mAP == pytest.approx(reference["mAP"], abs=ATOL)
    assert result.mINP == pytest.approx(reference["mINP"], abs=ATOL)


def _both(data: dict, **options) -> tuple[EvalResult, dict]:
    """Ours and the triplet-reid port on the same data and options."""
    return evaluate(**data, device="cpu", **options), reference_eval.reference_evaluate(**data, **options)


# A case worked by hand
###

# 1-D embeddings; distances are differences. Query 'A' (camera 1) at 0, 'B' (camera 1) at 1.4,
# 'C' (camera 1) at 9 whose only gallery image is in its own camera.
HAND_GALLERY = [  # (pid, camera, position)
    ("A", 2, 1.0), ("B", 2, 2.0), ("A", 1, 0.5), ("-1", 3, 0.1), ("0000", 4, 1.5), ("A", 3, 3.0),
    ("C", 1, 9.0),
]


def _hand_case() -> dict:
    def names(rows: list[tuple[str, int, float]], folder: str) -> np.ndarray:
        return np.array([f"{folder}/{pid}_c{cam}s1_{i:06d}_00.jpg" for i, (pid, cam, _) in enumerate(rows)])

    query = [("A", 1, 0.0), ("B", 1, 1.4), ("C", 1, 9.0)]
    return {
        "query_embs": np.array([[x] for *_, x in query]),
        "gallery_embs": np.array([[x] for *_, x in HAND_GALLERY]),
        "query_pids": np.array([pid for pid, *_ in query]),
        "gallery_pids": np.array([pid for pid, *_ in HAND_GALLERY]),
        "query_fids": names(query, "query"),
        "gallery_fids": names(HAND_GALLERY, "test"),
    }


def test_hand_worked_three_queries() -> None:
    # A: same-camera A at 0.5 and junk at 0.1 are ignored, so the order is
    #    A(1.0) hit, 0000(1.5), B(2.0), A(3.0) hit -> hits at ranks 1 and 4.
    # B: 0000(0.1), A(0.4), B(0.6) hit -> its only hit at rank 3 (A in B's camera, at 0.9, is later).
    # C: its only image is in its own camera -> no valid match: no AP, but it counts in the CMC.
    sklearn_a, sklearn_b = (1 / 1 + 2 / 4) / 2, 1 / 3
    market_a = ((1 / 1 + 1) / 2 + (2 / 4 + 1 / 3) / 2) / 2  # trapezoids: precision before, at a hit
    market_b = (1 / 3 + 0 / 2) / 2
    result = evaluate(**_hand_case(), device="cpu")
    assert result.num_queries == 3 and result.num_valid_queries == 2
    np.testing.assert_allclose(result.aps, [sklearn_a, sklearn_b])
    assert result.mAP == pytest.approx((sklearn_a + sklearn_b) / 2)
    np.testing.assert_allclose(result.cmc, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert result.mINP == pytest.approx((2 / 4 + 1 / 3) / 2)
    market = evaluate(**_hand_case(), market_ap=True, device="cpu")
    np.testing.assert_allclose(market.aps, [market_a, market_b])
    np.testing.assert_allclose(market.cmc, result.cmc)


def test_result_reporting() -> None:
    result = evaluate(**_hand_case(), device="cpu")
    assert result.rank(1) == pytest.approx(1 / 3) and result.rank(3) == pytest.approx(2 / 3)
    assert result.rank(100) == result.rank(len(result.cmc))
    with pytest.raises(ValueError):
        result.rank(0)
    report = result.to_json()
    assert set(report) == {"mAP", "CMC", "aps", "mINP", "rank-1", "rank-5", "rank-10"}
    assert json.loads(json.dumps(report))["CMC"] == pytest.approx(result.cmc.tolist())
    assert result.summary().startswith(f"mAP: {result.mAP:.2%} | rank-1: 33.33% | rank-5: 66.67% | rank-10: ")


# Random data against the triplet-reid port
###


@pytest.mark.parametrize("market_ap", [False, True])
@pytest.mark.parametrize("excluder", ["market1501", "duke", "cuhk03"])
def test_camera_excluders_match_reference(excluder: str, market_ap: bool) -> None:
    result, reference = _both(_data(excluder), excluder=excluder, market_ap=market_ap)
    assert 0.2 < result.mAP < 0.95  # varied APs, not a degenerate case
    _assert_matches_reference(result, reference)


def test_exclusion_from_file_names_matches_from_csv() -> None:
    # CSV pids shuffled among the gallery: exclusion (junk, same person and camera) still follows
    # the file names, matches follow the CSV, as in triplet-reid.
    data = _data(seed=11)
    data["gallery_pids"] = np.random.default_rng(11).permutation(data["gallery_pids"])
    for market_ap in (False, True):
        _assert_matches_reference(*_both(data, market_ap=market_ap))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cityblock"])
def test_metrics_match_reference(metric: str) -> None:
    for market_ap in (False, True):
        _assert_matches_reference(*_both(_data(seed=1), metric=metric, market_ap=market_ap))


@pytest.mark.parametrize("excluder", ["diagonal", "none"])
def test_gallery_against_itself(excluder: str) -> None:
    data = _data(seed=2)
    same = {f"{side}_{kind}": data[f"gallery_{kind}"]
            for side in ("query", "gallery") for kind in ("embs", "pids", "fids")}
    result, reference = _both(same, excluder=excluder)
    _assert_matches_reference(result, reference)
    if excluder == "none":  # every image finds itself first, junk included
        assert result.rank(1) == 1.0 and result.num_valid_queries == len(data["gallery_pids"])


@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_embedding_scale_does_not_matter(scale: float) -> None:
    data = _data(seed=3)
    data["query_embs"], data["gallery_embs"] = data["query_embs"] * scale, data["gallery_embs"] * scale
    for market_ap in (False, True):
        _assert_matches_reference(*_both(data, market_ap=market_ap))


def _tied(data: dict, kind: str) -> dict:
    """``integers``: embeddings on a small grid, so most distances tie (positives with negatives
    and with each other); ``duplicates``: some gallery images copied under other pids, and some
    queries equal to gallery images, so only some queries see ties."""
    rng = np.random.default_rng(4)
    query, gallery = data["query_embs"].astype(np.float64), data["gallery_embs"].astype(np.float64)
    if kind == "integers":
        query = rng.integers(0, 3, size=(len(query), 3)).astype(np.float64)
        gallery = rng.integers(0, 3, size=(len(gallery), 3)).astype(np.float64)
    gallery[20:28] = gallery[:8]
    query[:5] = gallery[rng.choice(len(gallery), 5)]
    return {**data, "query_embs": query, "gallery_embs": gallery}


@pytest.mark.parametrize("market_ap", [False, True])
@pytest.mark.parametrize("kind", ["integers", "duplicates"])
def test_ties_match_reference(kind: str, market_ap: bool) -> None:
    _assert_matches_reference(*_both(_tied(_data(seed=4), kind), market_ap=market_ap))


# An independent loop, written like Market-1501's MATLAB evaluation
###


def _matlab_style(data: dict) -> tuple[list[float], list[float], np.ndarray, list[float]]:
    """sklearn-style and Market APs, CMC and INPs from a loop over each query's sorted good images."""
    q_names, g_names = (pids_from_names(data[key], "market1501") for key in ("query_fids", "gallery_fids"))
    q_cams, g_cams = (camera_ids(data[key], "market1501") for key in ("query_fids", "gallery_fids"))
    step_aps, market_aps, inps = [], [], []
    cmc = np.zeros(len(g_names))
    for i, query in enumerate(data["query_embs"].astype(np.float64)):
        dist = np.sqrt(((data["gallery_embs"].astype(np.float64) - query) ** 2).sum(1) + 1e-12)
        junk = (g_names == "-1") | ((g_names == q_names[i]) & (g_cams == q_cams[i]))
        ranked = [j for j in np.argsort(dist, kind="stable") if not junk[j]]
        good = [r for r, j in enumerate(ranked, start=1) if data["gallery_pids"][j] == data["query_pids"][i]]
        if not good:
            continue
        step = market = 0.0
        for n, rank in enumerate(good, start=1):
            precision = n / rank
            old_precision = (n - 1) / (rank - 1) if rank != 1 else 1.0
            step += precision / len(good)
            market += (old_precision + precision) / 2 / len(good)
        step_aps.append(step)
        market_aps.append(market)
        cmc[good[0] - 1:] += 1
        inps.append(len(good) / good[-1])
    return step_aps, market_aps, cmc / len(data["query_pids"]), inps


def test_matches_independent_loop() -> None:
    data = _data(seed=5)
    step_aps, market_aps, cmc, inps = _matlab_style(data)
    result = evaluate(**data, device="cpu")
    np.testing.assert_allclose(result.aps, step_aps, rtol=0, atol=ATOL)
    np.testing.assert_allclose(result.cmc, cmc, rtol=0, atol=ATOL)
    assert result.mINP == pytest.approx(np.mean(inps), abs=ATOL)
    market = evaluate(**data, market_ap=True, device="cpu")
    np.testing.assert_allclose(market.aps, market_aps, rtol=0, atol=ATOL)


# Options and edge cases
###


def test_queries_without_valid_match() -> None:
    data = _data(seed=6)
    data["query_pids"] = data["query_pids"].copy()
    data["query_pids"][:10] = "9999"  # nobody in the gallery
    result, reference = _both(data)
    _assert_matches_reference(result, reference)
    assert result.num_valid_queries == len(data["query_pids"]) - 10
    assert result.cmc[-1] == pytest.approx(result.num_valid_queries / result.num_queries)
    data["query_pids"][:] = "9999"
    with pytest.raises(ReidTuneError, match="none of the 70 queries"):
        evaluate(**data, device="cpu")


def test_chunk_size_does_not_change_results() -> None:
    data = _data(seed=7)
    results = [evaluate(**data, chunk_size=size, device="cpu") for size in (1, 7, 4096)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.aps, results[0].aps)
        np.testing.assert_array_equal(other.cmc, results[0].cmc)
        assert other.mINP == results[0].mINP


def test_accepts_tensors_float32_and_grad() -> None:
    data = _data(seed=8)
    expected = evaluate(**data, device="cpu")
    data["query_embs"] = torch.from_numpy(data["query_embs"].astype(np.float32)).requires_grad_()
    data["gallery_embs"] = torch.from_numpy(data["gallery_embs"].astype(np.float32))
    np.testing.assert_allclose(evaluate(**data, device="cpu").aps, expected.aps, atol=ATOL)


def test_evaluation_runs_where_float64_does() -> None:
    """MPS has no float64: a model on Apple's GPU is evaluated on the CPU."""
    assert evaluation_device("mps") == torch.device("cpu") and evaluation_device("cpu") == torch.device("cpu")
    assert evaluation_device("cuda:1") == torch.device("cuda", 1)
    assert evaluation_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    data = _data(seed=9)
    for market_ap in (False, True):
        cpu, cuda = (evaluate(**data, market_ap=market_ap, device=device) for device in ("cpu", "cuda"))
        np.testing.assert_allclose(cuda.aps, cpu.aps, rtol=0, atol=ATOL)
        np.testing.assert_allclose(cuda.cmc, cpu.cmc, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"excluder": "marcket"}, "excluder='marcket'"),
        ({"metric": "cosine"}, "metric='cosine'"),
        ({"chunk_size": 0}, "chunk_size=0"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ReidTuneError, match=message):
        evaluate(**_hand_case(), device="cpu", **options)


def test_bad_arrays() -> None:
    data = _hand_case()
    with pytest.raises(ReidTuneError, match="query embeddings: shape"):
        evaluate(**{**data, "query_pids": data["query_pids"][:2]}, device="cpu")
    with pytest.raises(ReidTuneError, match="embedding dimension"):
        evaluate(**{**data, "gallery_embs": np.hstack([data["gallery_embs"]] * 2)}, device="cpu")
    with pytest.raises(ReidTuneError, match="NaN or inf"):
        evaluate(**{**data, "query_embs": data["query_embs"] * np.nan}, device="cpu")


# Files
###


def _write_split(tmp_path: Path, name: str, pids: np.ndarray, fids: np.ndarray,
                 embs: np.ndarray) -> tuple[Path, Path]:
    csv, h5 = tmp_path / f"{name}.csv", tmp_path / f"{name}.h5"
    write_csv(csv, pids, fids)
    with h5py.File(h5, "w") as f:
        f.create_dataset("emb", data=embs)
    return csv, h5


@pytest.fixture
def files(tmp_path: Path) -> tuple[dict, tuple[Path, Path, Path, Path]]:
    data = _data(seed=10)
    query = _write_split(tmp_path, "query", data["query_pids"], data["query_fids"], data["query_embs"])
    gallery = _write_split(tmp_path, "test", data["gallery_pids"], data["gallery_fids"], data["gallery_embs"])
    return data, (*query, *gallery)


def test_evaluate_files_round_trip(files: tuple, tmp_path: Path) -> None:
    data, paths = files
    out = tmp_path / "out" / "eval.json"
    result = evaluate_files(*paths, excluder="market1501", metric="euclidean", out_json=out, device="cpu")
    expected = evaluate(**data, device="cpu")
    np.testing.assert_array_equal(result.aps, expected.aps)
    written = json.loads(out.read_text())
    want = expected.to_json()
    assert written.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(written[key], value, rtol=1e-12, err_msg=key)
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left


def test_evaluate_files_errors(files: tuple, tmp_path: Path) -> None:
    data, (query_csv, query_h5, gallery_csv, gallery_h5) = files
    options = {"excluder": "market1501", "metric": "euclidean", "device": "cpu"}
    with pytest.raises(ReidTuneError, match="nothere.h5: file not found"):
        evaluate_files(query_csv, tmp_path / "nothere.h5", gallery_csv, gallery_h5, **options)
    with pytest.raises(ReidTuneError, match="nothere.csv: file not found"):
        evaluate_files(tmp_path / "nothere.csv", query_h5, gallery_csv, gallery_h5, **options)
    with pytest.raises(ReidTuneError, match=r"test.h5: 'emb' has shape \(360, 16\), expected \(70, D\)"):
        evaluate_files(query_csv, gallery_h5, gallery_csv, gallery_h5, **options)
    _, wide_h5 = _write_split(tmp_path, "wide", data["gallery_pids"], data["gallery_fids"],
                              np.hstack([data["gallery_embs"]] * 2))
    with pytest.raises(ReidTuneError, match="wide.h5: embedding dimension 32, expected 16"):
        evaluate_files(query_csv, query_h5, gallery_csv, wide_h5, **options)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("features", data=data["query_embs"])
    with pytest.raises(ReidTuneError, match="bare.h5: no 'emb' dataset"):
        evaluate_files(query_csv, bare, gallery_csv, gallery_h5, **options)
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("hello")
    with pytest.raises(ReidTuneError, match="not.h5: cannot read"):
        evaluate_files(query_csv, not_h5, gallery_csv, gallery_h5, **options)
    with pytest.raises(ReidTuneError, match="excluder='duk'"):
        evaluate_files(query_csv, query_h5, gallery_csv, gallery_h5, excluder="duk", metric="euclidean")
    with pytest.raises(ReidTuneError, match="metric='l2'"):
        evaluate_files(query_csv, query_h5, gallery_csv, gallery_h5, excluder="duke", metric="l2")
