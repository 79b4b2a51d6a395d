"""triplet-reid's ``evaluate.py`` main loop ported to numpy: the reference ``reid_tune.evaluate`` is
checked against (tests and ``bench_eval.py``).

Faithful to triplet-reid (VisualComputingInstitute/triplet-reid): excluders parse pid and camera
from file names and return a mask; ``distances[mask] = inf``, ``pid_matches[mask] = False``;
scores ``1 / (1 + d)``; sklearn's AP or ``average_precision_score_market`` per query; CMC from the
first match after an argsort of the distances. Distances are float64 from plain differences,
like ``loss.cdist`` (euclidean adds 1e-12 inside the square root). Departures, all forced:

* a query without a valid match is skipped explicitly (old sklearn returned NaN, which
  triplet-reid skipped; modern sklearn returns 0 and ``np.where(...)[0][0]`` would crash);
* the CMC argsort is stable, so a first match tied with a negative has a defined rank
  (triplet-reid's quicksort leaves it arbitrary);
* ``cuhk03`` (``PPPP_NN``, slots 00-04 camera 0, 05-09 camera 1) and ``none`` excluders are added,
  and mINP (``#matches / rank of the last match`` in that sorted order) is reported too;
* queries go through in batches of ``batch_size`` only to bound the (B, G, D) difference array.
"""

from __future__ import annotations

import os
import re

import numpy as np
from sklearn.metrics import average_precision_score

_NAME_PATTERNS = {
    "market1501": re.compile(r"(\S+)_c(\d+)s(\d+)_.*"),
    "duke": re.compile(r"(\S+)_c(\d+)_.*"),
    "cuhk03": re.compile(r"(\S+)_(\d+)"),
}


class CameraExcluder:
    """triplet-reid's market1501/duke excluder: same file-name pid in the same camera, and junk."""

    def __init__(self, gallery_fids: np.ndarray, convention: str) -> None:
        self.convention = convention
        self.gallery_pids, self.gallery_cids = self._parse(gallery_fids)

    def __call__(self, query_fids: np.ndarray) -> np.ndarray:
        query_pids, query_cids = self._parse(query_fids)
        cid_matches = self.gallery_cids[None] == query_cids[:, None]
        pid_matches = self.gallery_pids[None] == query_pids[:, None]
        mask = np.logical_and(cid_matches, pid_matches)
        junk_images = np.repeat(self.gallery_pids[None] == "-1", len(query_pids), 0)
        return np.logical_or(mask, junk_images)

    def _parse(self, fids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pids, cids = [], []
        for fid in fids:
            filename = os.path.splitext(os.path.basename(fid))[0]
            groups = _NAME_PATTERNS[self.convention].match(filename).groups()
            pids.append(groups[0])
            cids.append(str(int(groups[1]) // 5) if self.convention == "cuhk03" else groups[1])
        return np.asarray(pids), np.asarray(cids)


class DiagonalExcluder:
    """triplet-reid's diagonal excluder: only the identical file."""

    def __init__(self, gallery_fids: np.ndarray) -> None:
        self.gallery_fids = gallery_fids

    def __call__(self, query_fids: np.ndarray) -> np.ndarray:
        return self.gallery_fids[None] == query_fids[..., None]


class NoExcluder:
    """Excludes nothing."""

    def __init__(self, gallery_fids: np.ndarray) -> None:
        self.num_gallery = len(gallery_fids)

    def __call__(self, query_fids: np.ndarray) -> np.ndarray:
        return np.zeros((len(query_fids), self.num_gallery), bool)


def make_excluder(name: str, gallery_fids: np.ndarray) -> CameraExcluder | DiagonalExcluder | NoExcluder:
    """The excluder called ``name`` for ``gallery_fids``."""
    if name in _NAME_PATTERNS:
        return CameraExcluder(gallery_fids, name)
    return {"diagonal": DiagonalExcluder, "none": NoExcluder}[name](gallery_fids)


def cdist(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """triplet-reid's ``loss.cdist`` in float64 numpy, from the (A, B, D) differences."""
    diffs = a.astype(np.float64)[:, None, :] - b.astype(np.float64)[None, :, :]
    if metric == "sqeuclidean":
        return np.sum(np.square(diffs), axis=-1)
    if metric == "euclidean":
        return np.sqrt(np.sum(np.square(diffs), axis=-1) + 1e-12)
    if metric == "cityblock":
        return np.sum(np.abs(diffs), axis=-1)
    raise NotImplementedError(metric)


def average_precision_score_market(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """triplet-reid's port of the Market-1501 AP (trapezoid rule over a stable score sort)."""
    if len(y_true) != len(y_score):
        raise ValueError("The length of the labels and predictions must match")
    y_true_sorted = y_true[np.argsort(-y_score, kind="mergesort")]
    tp = np.cumsum(y_true_sorted)
    total_true = np.sum(y_true_sorted)
    recall = tp / total_true
    recall = np.insert(recall, 0, 0.0)
    precision = tp / np.arange(1, len(tp) + 1)
    precision = np.insert(precision, 0, 1.0)
    return np.sum(np.diff(recall) * ((precision[1:] + precision[:-1]) / 2))


def reference_evaluate(
    query_embs: np.ndarray,
    gallery_embs: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_fids: np.ndarray,
    gallery_fids: np.ndarray,
    *,
    excluder: str = "market1501",
    metric: str = "euclidean",
    market_ap: bool = False,
    batch_size: int = 16,
) -> dict:
    """``{'mAP', 'CMC', 'aps', 'mINP'}`` exactly as triplet-reid's evaluate.py computes them."""
    query_pids, gallery_pids = np.asarray(query_pids, str), np.asarray(gallery_pids, str)
    query_fids, gallery_fids = np.asarray(query_fids, str), np.asarray(gallery_fids, str)
    exclude = make_excluder(excluder, gallery_fids)
    average_precision = average_precision_score_market if market_ap else average_precision_score
    aps, inps = [], []
    cmc = np.zeros(len(gallery_pids), dtype=np.int32)
    for start in range(0, len(query_pids), batch_size):
        distances = cdist(query_embs[start:start + batch_size], gallery_embs, metric)
        pids, fids = query_pids[start:start + batch_size], query_fids[start:start + batch_size]
        pid_matches = gallery_pids[None] == pids[:, None]
        mask = exclude(fids)
        distances[mask] = np.inf
        pid_matches[mask] = False
        scores = 1 / (1 + distances)
        for i in range(len(distances)):
            if not pid_matches[i].any():  # old sklearn's NaN AP, skipped by triplet-reid
                continue
            aps.append(average_precision(pid_matches[i], scores[i]))
            hits = np.flatnonzero(pid_matches[i, np.argsort(distances[i], kind="stable")])
            cmc[hits[0]:] += 1
            inps.append(len(hits) / (hits[-1] + 1))
    return {"mAP": np.mean(aps), "CMC": cmc / len(query_pids), "aps": np.array(aps), "mINP": np.mean(inps)}
