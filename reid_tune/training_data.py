"""The training data: the checked training set, and its PK batches by the run's data path.

Two paths feed the loop (``TrainConfig.data_path``): the cpu path here, JPEGs decoded and augmented
every step by DataLoader processes (:class:`PKBatches`), and the device path of ``reid_tune.gpu_data``,
a decoded cache augmented on the device. Both are pure functions of (seed, step): resume-exact. A cache
that cannot be built or held gives way to the cpu path (a warned fallback: its batches differ, so a resume
that does not fall back is no longer exact).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_tune.augmentation import train_augment
from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset, check_trainable, load_csv, load_image
from reid_tune.devices import DATA_CACHE, OnFallback, fall_back
from reid_tune.errors import ReidTuneError
from reid_tune.gpu_data import DeviceBatches, resolve_data_path
from reid_tune.sampler import PKSampler, shard_batch

BatchSource = Callable[[int], Iterator[Any]]  # start step -> (step, images, labels) up to the last step
OUT_OF_ROOM = (errno.ENOMEM, errno.ENOSPC, errno.EDQUOT)  # an OSError the cpu path avoids (not a bad file)


def load_training_set(cfg: TrainConfig) -> ReidDataset:
    """The training CSV, checked: images exist, identities have >= 2 images, enough identities for P."""
    dataset = load_csv(cfg.train_set, image_root=cfg.image_root, check_images=True)
    check_trainable(dataset, min_images=2)
    num_ids = len(set(dataset.pids.tolist()))
    if num_ids < cfg.batch_p:
        raise ReidTuneError(
            f"{cfg.train_set}: batch_p={cfg.batch_p} but the set has only {num_ids} identities"
        )
    return dataset


def open_batches(
    dataset: ReidDataset,
    cfg: TrainConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    gpu_share: float = 1.0,
    on_fallback: OnFallback | None = None,
) -> BatchSource:
    """The run's data path (see ``TrainConfig.data_path``): decoded cache on the device, or a DataLoader.

    ``gpu_share``: the part of the GPU this process holds (see ``gpu_data.cache_fits``). A cache that
    cannot be built, mapped or shipped through pinned memory falls back to the DataLoader, unpinned.
    """
    pin = device.type == "cuda"
    if resolve_data_path(cfg, len(dataset)) == "device":
        try:
            cache = DeviceBatches.from_dataset(
                dataset,
                cfg,
                device,
                rank=rank,
                world_size=world_size,
                gpu_share=gpu_share,
                on_fallback=on_fallback,
            )
            return cache.stream
        except (MemoryError, RuntimeError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in OUT_OF_ROOM:
                raise
            # the draws differ between the paths: a run resumed on the other path is no longer the same run
            instead = "the cpu path's DataLoader, unpinned (other augmentation draws than the device path's)"
            fall_back(DATA_CACHE, instead, err, on_fallback)
            pin = False
    batches = PKBatches(dataset, cfg, rank=rank, world_size=world_size)
    return functools.partial(batch_stream, batches, num_workers=cfg.num_workers, pin=pin)


class PKBatches(torch.utils.data.Dataset):
    """Item ``step`` is the whole augmented PK batch of that step: (step, images, labels).

    A pure function of (seed, step), whatever process or worker computes it: resume-exact.
    """

    def __init__(self, dataset: ReidDataset, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1) -> None:
        self.fids = dataset.fids
        self.root = Path(cfg.image_root)
        self.sampler = PKSampler(dataset.pids, cfg.batch_p, cfg.batch_k, seed=cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    def __len__(self) -> int:
        return self.cfg.train_iterations

    def __getitem__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        indices = self.sampler.batch(step)
        positions = shard_batch(
            np.arange(len(indices)),
            batch_p=self.cfg.batch_p,
            batch_k=self.cfg.batch_k,
            rank=self.rank,
            world_size=self.world_size,
        )
        images = torch.stack([self._augmented(step, p, indices[p]) for p in positions])
        return step, images, torch.from_numpy(self.sampler.labels(indices[positions]))

    def _augmented(self, step: int, position: int, index: int) -> torch.Tensor:
        # one stream per (step, place in the global batch): the same pixels whatever the worker count
        rng = np.random.default_rng([self.cfg.seed, step, position])
        return train_augment(
            load_image(self.root / self.fids[index]),
            rng,
            input_size=self.cfg.input_size,
            pre_crop_size=self.cfg.pre_crop_size,
            crop=self.cfg.crop_augment,
            flip=self.cfg.flip_augment,
            erasing=self.cfg.random_erasing,
        )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the trainer for cores


def batch_stream(batches: PKBatches, start: int, *, num_workers: int, pin: bool) -> Iterator[Any]:
    """Batches ``start .. train_iterations-1`` in order, decoded by ``num_workers`` processes."""
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, len(batches)),
        num_workers=num_workers,
        pin_memory=pin,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )
    return iter(loader)
