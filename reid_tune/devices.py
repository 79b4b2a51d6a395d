"""Device and precision set-up: the device a run uses, its precision, the process-wide GPU settings, and the
record of a GPU feature the run had to go without (:class:`Fallback`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reid_tune.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; a bare ``cuda`` is the current GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # Ray Train and torchrun select each worker's own
        return torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``fp32``, ``tf32`` or ``bf16``: ``auto`` is bf16 autocast on a GPU, exact fp32 elsewhere."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def configure_gpu(device: torch.device, precision: str) -> None:
    """Process-wide GPU settings: ``device`` current, cuDNN autotuning, TF32 only when asked.

    Graphs capture and replay on the current device; shapes never change, so autotuning pays once;
    fp32 stays exact fp32 (under bf16 autocast TF32 would only touch the few ops left in fp32).
    """
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


CUDA_GRAPH = "cuda_graph"  # the step as one CUDA graph (reid_tune.steps)
DATA_CACHE = "data_cache"  # the decoded cache on the GPU, or at all (reid_tune.gpu_data, training_data)


@dataclass(frozen=True)
class Fallback:
    """A GPU feature (:data:`CUDA_GRAPH`, :data:`DATA_CACHE`) the run goes without, what it uses instead and
    why: training never dies of a GPU feature alone, but a search records that it ran slower."""

    feature: str
    instead: str
    reason: str

    def __str__(self) -> str:
        return f"fallback to {self.instead} ({self.reason})"


OnFallback = Callable[[Fallback], None]  # told of each GPU feature a run goes without


def fall_back(
    feature: str, instead: str, cause: BaseException | str, tell: OnFallback | None = None
) -> Fallback:
    """Warn (once: each fallback happens once a run) that ``feature`` gives way to ``instead``; the record,
    also given to ``tell`` (e.g. the training callbacks)."""
    reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    fallback = Fallback(feature, instead, " ".join(reason.split())[:300])
    warnings.warn(f"{feature}: {fallback}", RuntimeWarning, stacklevel=2)
    if tell is not None:
        tell(fallback)
    return fallback
