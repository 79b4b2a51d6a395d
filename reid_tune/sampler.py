"""PK batches (P identities, K images each) with triplet-reid's epoch semantics, resumable by step.

Each epoch shuffles the identities, keeps ``(num_ids // P) * P`` of them (so no batch straddles
two epochs) and groups them P per batch; each identity then contributes K of its images, without
replacement when it has at least K, otherwise every image repeated as evenly as possible. All
randomness of epoch ``e`` comes from ``np.random.default_rng([seed, e])``, so batch ``t`` depends on
``(seed, t)`` alone: a training resumed at step ``t`` sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from reid_tune.errors import ConfigError


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{name}={value}: must be >= {minimum}")


def _draw_k(rng: np.random.Generator, images: np.ndarray, k: int) -> np.ndarray:
    """K of ``images``: distinct if there are at least K, else each repeated floor or ceil(K/count) times."""
    return images[np.resize(rng.permutation(len(images)), k)]


class PKSampler:
    """Infinite, deterministic sampler of identity-major PK batches of dataset indices."""

    def __init__(
        self, pids: Sequence[str] | np.ndarray, batch_p: int, batch_k: int, *, seed: int = 0
    ) -> None:
        _check_at_least("batch_p", batch_p, 2)
        _check_at_least("batch_k", batch_k, 2)
        _check_at_least("seed", seed, 0)
        unique, labels = np.unique(np.asarray(pids), return_inverse=True)
        if batch_p > len(unique):
            raise ConfigError(f"batch_p={batch_p}: must be <= the number of identities ({len(unique)})")
        self.batch_p = batch_p
        self.batch_k = batch_k
        self.batch_size = batch_p * batch_k
        self.num_ids = len(unique)
        self.batches_per_epoch = self.num_ids // batch_p
        self.seed = seed
        self._labels = labels.astype(np.int64).reshape(-1)
        order = np.argsort(self._labels, kind="stable")
        self._images = np.split(order, np.cumsum(np.bincount(self._labels))[:-1])
        self._epoch = -1
        self._epoch_batches = np.empty((0, self.batch_size), dtype=np.int64)

    def _plan_epoch(self, epoch: int) -> np.ndarray:
        """All batches of ``epoch``, shape (batches_per_epoch, P*K)."""
        rng = np.random.default_rng([self.seed, epoch])
        ids = rng.permutation(self.num_ids)[: self.batches_per_epoch * self.batch_p]
        draws = [_draw_k(rng, self._images[i], self.batch_k) for i in ids]
        return np.concatenate(draws).astype(np.int64).reshape(self.batches_per_epoch, self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """Dataset indices (int64, length P*K, identity-major) of global batch ``step`` (0-based)."""
        _check_at_least("step", step, 0)
        epoch, within = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch_batches, self._epoch = self._plan_epoch(epoch), epoch
        return self._epoch_batches[within].copy()

    def labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Identity labels (int64, 0..num_ids-1, in sorted-pid order) of dataset ``indices``."""
        return self._labels[np.asarray(indices, dtype=np.int64)]

    def iter_from(self, start_step: int) -> Iterator[np.ndarray]:
        """Batches ``start_step``, ``start_step + 1``, ... forever."""
        _check_at_least("start_step", start_step, 0)
        return (self.batch(step) for step in itertools.count(start_step))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iter_from(0)


def shard_batch(indices: np.ndarray, *, batch_p: int, batch_k: int, rank: int, world_size: int) -> np.ndarray:
    """The part of a PK batch that DDP worker ``rank`` of ``world_size`` loads: P/W whole identities.

    Splitting by identity keeps every worker's share a PK batch of its own (P/W identities, K images).
    """
    indices = np.asarray(indices)
    _check_at_least("world_size", world_size, 1)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}: must be in [0, {world_size})")
    if batch_p % world_size:
        raise ConfigError(f"batch_p={batch_p}: must be divisible by world_size={world_size}")
    if indices.shape != (batch_p * batch_k,):
        raise ConfigError(f"indices shape {indices.shape}: must be ({batch_p * batch_k},), batch_p*batch_k")
    per_worker = batch_p // world_size
    return indices.reshape(batch_p, batch_k)[rank * per_worker : (rank + 1) * per_worker].reshape(-1)
