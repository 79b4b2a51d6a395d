"""The validation split a search maximises: a seeded hold-out of training identities, queried across cameras.

The test set is never used to choose anything; a search trains on the remaining identities and
measures mAP/CMC of the held-out ones, each giving one query image per camera against a gallery of its
other images, excluded and scored exactly like the test evaluation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reid_tune.augmentation import Preprocessing, view_names
from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset, camera_ids, load_csv, write_csv
from reid_tune.embed import embed_images, embeds_in_bf16, write_h5
from reid_tune.errors import ReidTuneError
from reid_tune.evaluate import EvalResult, evaluate
from reid_tune.models import ReidModel
from reid_tune.rerank import Rerank

SPLIT_FILES = {"train": "train.csv", "query": "val_query.csv", "gallery": "val_gallery.csv"}


@dataclass(frozen=True)
class ValidationSplit:
    """Training identities, and the held-out identities' query and gallery images."""

    train: ReidDataset
    query: ReidDataset
    gallery: ReidDataset
    convention: str

    @property
    def excluder(self) -> str:
        """Which gallery entries a query ignores, as in the test evaluation: each camera convention names
        its own excluder (same identity and camera is no match)."""
        return self.convention


def held_out_count(num_ids: int, *, identities: int | None = None, fraction: float | None = None) -> int:
    """How many of ``num_ids`` identities are held out: ``identities``, or ``fraction`` of them (>= 2)."""
    return identities if identities is not None else max(2, math.floor(fraction * num_ids))


def hold_out(
    dataset: ReidDataset,
    convention: str,
    *,
    identities: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> ValidationSplit:
    """Hold out identities seen by at least two cameras (or with two images, convention 'none').

    Each held-out identity gives one query per camera that has two or more of its images (else one
    query), so every query keeps a gallery match from another camera.
    """
    cameras = camera_ids(dataset.fids, convention)
    rows_by_id: dict[str, list[int]] = defaultdict(list)
    for row, pid in enumerate(dataset.pids.tolist()):
        rows_by_id[pid].append(row)
    needed = 2 if convention != "none" else 1
    candidates = sorted(
        pid
        for pid, rows in rows_by_id.items()
        if len(set(cameras[rows].tolist())) >= needed and len(rows) >= 2
    )
    count = held_out_count(len(rows_by_id), identities=identities, fraction=fraction)
    if count > len(candidates) or count >= len(rows_by_id) - 1:
        raise ReidTuneError(
            f"{dataset.source}: cannot hold out {count} identities: {len(candidates)} of "
            f"{len(rows_by_id)} are usable (seen by two cameras), and two must stay to train"
        )
    rng = np.random.default_rng(seed)
    held = rng.choice(candidates, size=count, replace=False)
    query = [row for pid in sorted(held.tolist()) for row in _query_rows(rows_by_id[pid], cameras, rng)]
    held_rows = np.isin(dataset.pids, held)
    is_query = np.zeros(len(dataset), dtype=bool)
    is_query[query] = True
    return ValidationSplit(
        train=_rows(dataset, ~held_rows, "train"),
        query=_rows(dataset, is_query, "validation query"),
        gallery=_rows(dataset, held_rows & ~is_query, "validation gallery"),
        convention=convention,
    )


def _query_rows(rows: list[int], cameras: np.ndarray, rng: np.random.Generator) -> list[int]:
    """One random image of each camera holding two or more of ``rows``; else one of the first camera."""
    by_camera: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        by_camera[int(cameras[row])].append(row)
    groups = [group for _, group in sorted(by_camera.items()) if len(group) >= 2]
    if not groups:
        groups = [by_camera[min(by_camera)]]
    return [int(rng.choice(group)) for group in groups]


def _rows(dataset: ReidDataset, keep: np.ndarray, name: str) -> ReidDataset:
    return ReidDataset(dataset.pids[keep], dataset.fids[keep], f"{dataset.source} ({name})")


def write_split(split: ValidationSplit, folder: Path) -> dict[str, Path]:
    """Write the split's three CSVs into ``folder``; returns their paths by role (train, query, gallery)."""
    paths = {role: Path(folder) / name for role, name in SPLIT_FILES.items()}
    for role, path in paths.items():
        part = getattr(split, role)
        write_csv(path, part.pids, part.fids)
    return paths


def load_split(folder: Path, convention: str) -> ValidationSplit:
    """Read a split written by :func:`write_split`."""
    parts = {role: load_csv(Path(folder) / name) for role, name in SPLIT_FILES.items()}
    return ValidationSplit(**parts, convention=convention)


def validate(
    model: ReidModel,
    cfg: TrainConfig,
    split: ValidationSplit,
    *,
    device: str | torch.device = "cpu",
    out_dir: Path | None = None,
    num_workers: int = 0,
    rerank: Rerank | None = None,
) -> EvalResult:
    """mAP and CMC of the held-out query against its gallery, embedded as ``cfg`` trained the model
    (ranked by k-reciprocal re-ranking with ``rerank``).

    With ``out_dir``, also writes ``val_query.h5`` and ``val_gallery.h5`` (triplet-reid's layout) there.
    """
    root = Path(cfg.image_root)
    paths = [root / fid for fid in np.concatenate([split.query.fids, split.gallery.fids])]
    views = embed_images(model, paths, Preprocessing.of(cfg), device=device, num_workers=num_workers,
                         bf16=embeds_in_bf16(cfg, device))
    n = len(split.query)
    if out_dir is not None:
        names = view_names()
        write_h5(Path(out_dir) / "val_query.h5", views[:, :n], names, None)
        write_h5(Path(out_dir) / "val_gallery.h5", views[:, n:], names, None)
    return evaluate(
        views[0, :n],
        views[0, n:],
        split.query.pids,
        split.gallery.pids,
        split.query.fids,
        split.gallery.fids,
        excluder=split.excluder,
        metric=cfg.metric,
        device=device,
        rerank=rerank,
    )
