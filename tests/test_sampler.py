"""PKSampler and shard_batch: PK structure, triplet-reid's epoch semantics, step determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reid_tune.sampler import PKSampler, shard_batch

P, K = 4, 3
COUNTS = [1, 2, 3, 4, 5, 7, 2, 3, 6, 1, 4]  # 11 identities, some with fewer than K images


@pytest.fixture(scope="module")
def pids() -> np.ndarray:
    """A dataset's pid column with identities interleaved (not grouped) and string names."""
    names = np.repeat([f"id{i:02d}" for i in range(len(COUNTS))], COUNTS)
    return np.random.default_rng(123).permutation(names)


@pytest.fixture
def sampler(pids: np.ndarray) -> PKSampler:
    return PKSampler(pids, P, K, seed=7)


def epoch_batches(sampler: PKSampler, epoch: int) -> list[np.ndarray]:
    start = epoch * sampler.batches_per_epoch
    return [sampler.batch(step) for step in range(start, start + sampler.batches_per_epoch)]


def test_attributes(sampler: PKSampler) -> None:
    assert (sampler.batch_p, sampler.batch_k, sampler.batch_size) == (P, K, P * K)
    assert sampler.num_ids == len(COUNTS)
    assert sampler.batches_per_epoch == len(COUNTS) // P


def test_labels_follow_sorted_pids(sampler: PKSampler, pids: np.ndarray) -> None:
    expected = np.searchsorted(np.unique(pids), pids)
    labels = sampler.labels(np.arange(len(pids)))
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_every_batch_is_p_identities_with_k_images(sampler: PKSampler) -> None:
    for step in range(3 * sampler.batches_per_epoch):
        batch = sampler.batch(step)
        assert batch.dtype == np.int64 and batch.shape == (P * K,)
        rows = sampler.labels(batch).reshape(P, K)
        assert (rows == rows[:, :1]).all(), "identity-major: K images of one identity per row"
        assert len(set(rows[:, 0])) == P


def test_epoch_uses_each_identity_at_most_once(sampler: PKSampler) -> None:
    for epoch in range(4):
        ids = [sampler.labels(b).reshape(P, K)[:, 0] for b in epoch_batches(sampler, epoch)]
        ids = np.concatenate(ids)
        assert len(ids) == len(set(ids)) == (len(COUNTS) // P) * P


def test_k_draws_per_identity(sampler: PKSampler, pids: np.ndarray) -> None:
    all_labels = sampler.labels(np.arange(len(pids)))
    seen_short = False
    for step in range(5 * sampler.batches_per_epoch):
        for row in sampler.batch(step).reshape(P, K):
            images = np.flatnonzero(all_labels == all_labels[row[0]])
            if len(images) >= K:
                assert len(set(row)) == K, "without replacement when an identity has >= K images"
            else:
                seen_short = True
                times = np.array([np.sum(row == i) for i in images])
                assert set(times) <= {K // len(images), -(-K // len(images))}
    assert seen_short


def test_same_seed_same_batches(pids: np.ndarray) -> None:
    a, b = PKSampler(pids, P, K, seed=3), PKSampler(pids, P, K, seed=3)
    for step in range(3 * a.batches_per_epoch):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))


def test_batch_depends_on_step_only(pids: np.ndarray) -> None:
    steps = 3 * PKSampler(pids, P, K).batches_per_epoch
    iterated = list(itertools.islice(iter(PKSampler(pids, P, K)), steps))
    backwards = PKSampler(pids, P, K)  # visits epochs out of order, refilling its cache
    for step in reversed(range(steps)):
        np.testing.assert_array_equal(backwards.batch(step), iterated[step])


def test_iter_from_continues_iteration(pids: np.ndarray) -> None:
    sampler = PKSampler(pids, P, K)
    uninterrupted = list(itertools.islice(iter(sampler), 8))
    resumed = list(itertools.islice(PKSampler(pids, P, K).iter_from(3), 5))
    for got, want in zip(resumed, uninterrupted[3:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_returned_batch_is_a_copy(sampler: PKSampler) -> None:
    first = sampler.batch(0)
    first[:] = -1
    assert (sampler.batch(0) >= 0).all()


def test_different_seeds_differ(pids: np.ndarray) -> None:
    a, b = PKSampler(pids, P, K, seed=0), PKSampler(pids, P, K, seed=1)
    assert any(not np.array_equal(a.batch(s), b.batch(s)) for s in range(4))


def test_epochs_differ(sampler: PKSampler) -> None:
    assert not all(np.array_equal(x, y) for x, y in zip(epoch_batches(sampler, 0), epoch_batches(sampler, 1)))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_batch_splits_by_identity(sampler: PKSampler, world_size: int) -> None:
    batch = sampler.batch(1)
    shards = [
        shard_batch(batch, batch_p=P, batch_k=K, rank=r, world_size=world_size) for r in range(world_size)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), batch)
    for shard in shards:
        rows = sampler.labels(shard).reshape(P // world_size, K)
        assert (rows == rows[:, :1]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_p": 1}, "batch_p=1: must be >= 2"),
        ({"batch_k": 1}, "batch_k=1: must be >= 2"),
        ({"batch_p": 12}, r"batch_p=12: must be <= the number of identities \(11\)"),
        ({"seed": -1}, "seed=-1: must be >= 0"),
    ],
)
def test_sampler_validation(pids: np.ndarray, kwargs: dict, message: str) -> None:
    args = {"batch_p": P, "batch_k": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        PKSampler(pids, args.pop("batch_p"), args.pop("batch_k"), **args)


def test_negative_steps_rejected(sampler: PKSampler) -> None:
    with pytest.raises(ValueError, match="step=-1: must be >= 0"):
        sampler.batch(-1)
    with pytest.raises(ValueError, match="start_step=-2: must be >= 0"):
        sampler.iter_from(-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 3}, "batch_p=4: must be divisible by world_size=3"),
        ({"rank": 2}, r"rank=2: must be in \[0, 2\)"),
        ({"world_size": 0}, "world_size=0: must be >= 1"),
        ({"batch_k": 2}, r"indices shape \(12,\): must be \(8,\)"),
    ],
)
def test_shard_batch_validation(kwargs: dict, message: str) -> None:
    args = {"batch_p": P, "batch_k": K, "rank": 0, "world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        shard_batch(np.arange(P * K), **args)
