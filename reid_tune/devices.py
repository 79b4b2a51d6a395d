"""Device and precision set-up: the device a run uses, its precision, and the process-wide GPU settings."""

from __future__ import annotations

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
