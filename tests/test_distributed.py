"""Multi-worker trials: W workers with global batch-hard mining equal one worker on the same batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_tune.losses import TripletLoss
from reid_tune.sampler import shard_batch
from reid_tune.steps import TrainStep

P, K = 4, 3


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(P * K, 3, 16, 8, generator=gen)
    labels = torch.arange(P).repeat_interleave(K)
    return images, labels


def _step(margin: float | str) -> TrainStep:
    """A BatchNorm-free network (BatchNorm statistics are per worker unless synchronised on GPUs)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(6, 5))
    return TrainStep(net, TripletLoss(margin=margin, precision_k=K - 1), torch.optim.SGD(net.parameters(), lr=0.1),
                     device=torch.device("cpu"), bf16=False, channels_last=False)


def _grads(step: TrainStep) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in step.model.parameters()]


def _worker(rank: int, world: int, init: str, margin: float | str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        images, labels = _batch()
        mine = shard_batch(np.arange(P * K), batch_p=P, batch_k=K, rank=rank, world_size=world)
        step = _step(margin)
        step.distribute()
        loss, stats = step.forward_backward(images[mine], labels[mine])
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": _grads(step), "top1": stats["top1"]}, out)
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT under load)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("world", "margin"), [(2, "soft"), (4, 0.5)])
def test_workers_give_the_single_worker_loss_and_gradients(tmp_path: Path, world: int, margin) -> None:
    images, labels = _batch()
    single = _step(margin)
    loss, stats = single.forward_backward(images, labels)

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'init'}", margin, str(out)), nprocs=world, join=True)
    multi = torch.load(out, weights_only=True)

    torch.testing.assert_close(multi["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(multi["top1"], stats["top1"])
    for got, want in zip(multi["grads"], _grads(single)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
