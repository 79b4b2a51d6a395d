"""What the doctor checks: one trial's options on this machine and a sample of its training data, from a
search-space file or, without one, the demo search's trial on a generated data set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset, load_csv
from reid_tune.devices import resolve_device, resolve_precision
from reid_tune.steps import TrainStep, build_step

if TYPE_CHECKING:  # pydantic and pyarrow: only with a search-space file
    from reid_tune.search.schema import Param, SearchSpec

# Without a file: the demo search's trial (search_spaces/demo.yaml) at the paper's batch, P=18 K=4.
DEFAULT_TRIAL: dict[str, Any] = {
    "network": "lunet_small",
    "input_height": 64,
    "input_width": 32,
    "pre_crop_height": 72,
    "pre_crop_width": 36,
    "batch_p": 18,
    "batch_k": 4,
}


def trial_step(cfg: TrainConfig, device: torch.device) -> TrainStep:
    """The trial's step for the doctor's batches, whose labels are the first ``batch_p`` identities (what
    BoT's classifier and centers are sized for)."""
    return build_step(cfg, device, num_ids=cfg.batch_p)


@dataclass(frozen=True)
class Target:
    """The trial the doctor runs: its options (this machine's device, decoded caches in the scratch
    folder), a sample of its training set, and the search-space file it came from (None: the default)."""

    cfg: TrainConfig
    dataset: ReidDataset  # every image of the first batch_p identities (all of a generated set)
    spec: SearchSpec | None
    source: str

    def describe(self) -> str:
        """One line: where the trial comes from and what it trains."""
        cfg = self.cfg
        precision = resolve_precision(cfg, torch.device(cfg.device))
        return (
            f"{self.source}: {cfg.network} + {cfg.head}, P={cfg.batch_p} K={cfg.batch_k} "
            f"({cfg.batch_size} images) at {cfg.input_height}x{cfg.input_width}, {precision} "
            f"(precision {cfg.precision}) on {cfg.device}"
        )


def build_target(
    space: Path | None, scratch: Path, *, overrides: dict[str, Any], device: str | None
) -> Target:
    """The trial of ``space`` (its first start point, else the middle of its space), or the default trial
    on data generated in ``scratch``; ``overrides`` (network, batch_p, ...) and ``device`` replace its own."""
    if space is None:
        spec = None
        cfg = _generated(TrainConfig(**DEFAULT_TRIAL).replace(**overrides), scratch / "data")
        dataset = load_csv(cfg.train_set)
    else:
        spec = _load_spec(space)
        cfg = _trial(spec).replace(**overrides)
        dataset = _first_identities(load_csv(cfg.train_set), cfg.batch_p)
    where = resolve_device(device or cfg.device)
    cfg = cfg.replace(device=str(where), cache_dir=str(scratch / "cache"), num_workers=0)
    return Target(cfg, dataset, spec, str(space) if space else "default trial on generated data")


def _load_spec(space: Path) -> SearchSpec:
    """The validated file (imported here: the default trial needs neither pydantic nor YAML)."""
    from reid_tune.search.space import load_spec

    return load_spec(space)


def _generated(cfg: TrainConfig, folder: Path) -> TrainConfig:
    """``cfg`` training on a demo set generated in ``folder``, with identities enough for its batch."""
    from reid_tune.synthetic import generate_demo

    train_csv = generate_demo(folder, num_train_ids=max(cfg.batch_p, 2), num_test_ids=1)[0]
    return cfg.replace(train_set=str(train_csv), image_root=str(folder))


def _trial(spec: SearchSpec) -> TrainConfig:
    """The search's first trial: its first start point, or each searched value's middle."""
    from reid_tune.search.space import train_config

    points = spec.start_points()
    point = points[0] if points else {name: _middle(p) for name, p in spec.params.items() if p.searched}
    return train_config(spec, point, Path(spec.data.train))


def _middle(param: Param) -> Any:
    """The middle of a searched range (geometric for log-uniform), or a choice's first value."""
    if param.kind == "choice":
        return param.values[0]
    low, high = param.bounds
    if param.kind == "loguniform":
        return math.sqrt(low * high)
    return round((low + high) / 2) if param.kind == "int" else (low + high) / 2


def _first_identities(dataset: ReidDataset, count: int) -> ReidDataset:
    """The images of ``dataset``'s first ``count`` identities (in list order): a batch's worth to decode."""
    keep = np.isin(dataset.pids, list(dict.fromkeys(dataset.pids.tolist()))[:count])
    return ReidDataset(dataset.pids[keep], dataset.fids[keep], dataset.source)
