"""Data-parallel training with *global* batch-hard mining (PyTorch's torch.distributed only, no Ray).

Each worker embeds its share of the PK batch (whole identities, see ``sampler.shard_batch``); the
embeddings are all-gathered *with gradients*, so every anchor mines its hardest positive and negative
among the whole P x K batch across workers, as a single worker would. Every worker then computes the
same global loss; the all-gather's backward sums the W identical gradient copies and DDP's averaging
divides by W again, so parameters get exactly the single-worker gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of workers (0, 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's (embeddings, labels), concatenated in rank order; gradients flow back to each."""
    _, world = rank_and_world()
    if world == 1:
        return embeddings, labels
    from torch.distributed.nn.functional import all_gather  # autograd-aware, unlike dist.all_gather

    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_labels, labels)
    return torch.cat(all_gather(embeddings)), torch.cat(all_labels)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` when distributed (BatchNorm synchronised across GPUs), else ``model`` itself."""
    if rank_and_world()[1] == 1:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device])
    return torch.nn.parallel.DistributedDataParallel(model)
