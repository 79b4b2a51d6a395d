"""The learning rate at each iteration: triplet-reid's exponential decay, BoT's multi-step decay, a cosine
decay, each after an optional linear warm-up (Goyal et al. 2017, as BoT's WarmupMultiStepLR)."""

from __future__ import annotations

import math

from reid_tune.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of iteration ``step``: the schedule's value times the warm-up factor."""
    return cfg.learning_rate * warmup_factor(step, cfg) * _DECAY[cfg.schedule](step, cfg)


def warmup_factor(step: int, cfg: TrainConfig) -> float:
    """Linear from ``warmup_factor`` at step 0 to 1 at ``warmup_iterations`` (1 without warm-up)."""
    if step >= cfg.warmup_iterations:
        return 1.0
    alpha = step / cfg.warmup_iterations
    return cfg.warmup_factor * (1 - alpha) + alpha


def exponential(step: int, cfg: TrainConfig) -> float:
    """triplet-reid's: 1 until t0 (``decay_start_iteration``), then decay_factor ** ((t - t0) / (T - t0))."""
    t0, total = cfg.decay_start_iteration, cfg.train_iterations
    if step <= t0 or t0 >= total:
        return 1.0
    return cfg.decay_factor ** ((step - t0) / (total - t0))


def multistep(step: int, cfg: TrainConfig) -> float:
    """BoT's: ``decay_factor`` once more at each milestone reached (a fraction of ``train_iterations``)."""
    passed = sum(step >= round(m * cfg.train_iterations) for m in cfg.milestones)
    return cfg.decay_factor**passed


def cosine(step: int, cfg: TrainConfig) -> float:
    """1 until ``decay_start_iteration``, then half a cosine down to ``decay_factor`` at the last step."""
    t0, total = cfg.decay_start_iteration, cfg.train_iterations
    if step <= t0 or t0 >= total:
        return 1.0
    progress = (step - t0) / (total - t0)
    return cfg.decay_factor + (1 - cfg.decay_factor) * (1 + math.cos(math.pi * progress)) / 2


_DECAY = {"exponential": exponential, "multistep": multistep, "cosine": cosine}  # vocabulary.SCHEDULES
