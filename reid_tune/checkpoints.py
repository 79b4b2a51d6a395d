"""Checkpoint files of a run folder: their names, writing and pruning them, finding one, loading a network.

A checkpoint holds the weights, the Adam state, the run's options and the network's architecture, so
:func:`load_model` rebuilds a network from the file alone, without the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reid_tune.atomic import atomic_path
from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ReidTuneError
from reid_tune.models import ReidModel, create_model, model_args

CONFIG_FILE = "config.json"
CHECKPOINT_GLOB = "checkpoint-*.pt"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The file of the checkpoint after ``step`` iterations."""
    return Path(run_dir) / f"checkpoint-{step:06d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The iteration a checkpoint's file name records (None for a file named otherwise)."""
    _, _, digits = Path(path).stem.partition("checkpoint-")
    return int(digits) if digits.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first."""
    return sorted(Path(run_dir).glob(CHECKPOINT_GLOB))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: ReidModel,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    identity: torch.nn.Module | None = None,
) -> Path:
    """Write weights, optimizer state and options atomically (and the training-only ``identity`` parts
    apart from the network); prune old ones per ``keep_checkpoints``."""
    path = checkpoint_path(run_dir, step)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "model_args": model_args(model),
        **({"identity": identity.state_dict()} if identity is not None else {}),
    }
    with atomic_path(path) as temp:
        torch.save(state, temp)
    if cfg.keep_checkpoints:
        for old in list_checkpoints(run_dir)[: -cfg.keep_checkpoints]:
            old.unlink()
    return path


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of ``step`` in ``run_dir``, or the newest one."""
    if step is not None:
        path = checkpoint_path(run_dir, step)
        if not path.is_file():
            raise ReidTuneError(f"{path}: no checkpoint of iteration {step} in {run_dir}")
        return path
    found = list_checkpoints(run_dir)
    if not found:
        raise ReidTuneError(f"{run_dir}: no {CHECKPOINT_GLOB} in this run folder")
    return found[-1]


def read_checkpoint(path: Path, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The stored state of a checkpoint file, tensors on ``device``; an unreadable file is an error."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ReidTuneError(f"{path}: cannot read checkpoint: {err}") from None


def load_model(path: Path, *, device: str | torch.device = "cpu") -> tuple[ReidModel, TrainConfig]:
    """Rebuild the network of a checkpoint file (architecture from the file) in eval mode."""
    state = read_checkpoint(path, device=device)
    model = create_model(**state["model_args"])
    model.load_state_dict(state["model"])
    cfg = config_from_dict(state["config"], source=str(path))
    return model.to(device).eval(), cfg
