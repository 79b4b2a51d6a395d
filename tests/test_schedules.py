"""The learning-rate schedules against slow, obvious references, at their edges."""

from __future__ import annotations

import math

import pytest

from reid_tune.config import TrainConfig
from reid_tune.schedules import lr_at

LR, TOTAL = 3.5e-4, 1_200


def _reference(step: int, cfg: TrainConfig) -> float:
    """The schedules written out as their papers and triplet-reid's/BoT's code state them."""
    if cfg.schedule == "exponential":
        t0 = cfg.decay_start_iteration
        decay = 1.0 if step <= t0 else cfg.decay_factor ** ((step - t0) / (TOTAL - t0))
    elif cfg.schedule == "multistep":
        decay = 1.0
        for milestone in cfg.milestones:
            if step >= round(milestone * TOTAL):
                decay *= cfg.decay_factor
    else:
        t0 = cfg.decay_start_iteration
        if step <= t0:
            decay = 1.0
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (step - t0) / (TOTAL - t0)))
            decay = cfg.decay_factor + (1 - cfg.decay_factor) * cosine
    warm = 1.0
    if step < cfg.warmup_iterations:  # BoT's WarmupMultiStepLR, method "linear"
        alpha = step / cfg.warmup_iterations
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    return LR * warm * decay


def _cfg(**options: object) -> TrainConfig:
    return TrainConfig(learning_rate=LR, train_iterations=TOTAL, **options)


CONFIGS = {
    "exponential": _cfg(decay_start_iteration=720, decay_factor=0.001),
    "exponential+warmup": _cfg(decay_start_iteration=720, decay_factor=0.001, warmup_iterations=100),
    "multistep (BoT)": _cfg(
        schedule="multistep",
        milestones=(40 / 120, 70 / 120),
        decay_factor=0.1,
        warmup_iterations=100,
        warmup_factor=0.1,
    ),
    "cosine": _cfg(schedule="cosine", decay_start_iteration=300, decay_factor=0.01),
    "cosine from 0": _cfg(
        schedule="cosine", decay_start_iteration=0, decay_factor=0.001, warmup_iterations=50
    ),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_iteration_matches_the_reference(cfg: TrainConfig) -> None:
    for step in range(TOTAL + 1):
        assert math.isclose(lr_at(step, cfg), _reference(step, cfg), rel_tol=1e-12), step


def test_edges() -> None:
    bot = CONFIGS["multistep (BoT)"]
    assert math.isclose(lr_at(0, bot), LR * 0.1)  # warm-up starts at warmup_factor
    assert math.isclose(lr_at(50, bot), LR * 0.55)  # halfway
    assert lr_at(100, bot) == LR  # warm-up done
    assert lr_at(399, bot) == LR and math.isclose(lr_at(400, bot), LR * 0.1)  # first milestone: 40/120
    assert math.isclose(lr_at(699, bot), LR * 0.1) and math.isclose(lr_at(700, bot), LR * 0.01)
    cosine = CONFIGS["cosine"]
    assert lr_at(300, cosine) == LR and math.isclose(lr_at(TOTAL, cosine), LR * 0.01)
    assert math.isclose(lr_at(750, cosine), LR * (0.01 + 0.99 * 0.5))  # halfway down
    exponential = CONFIGS["exponential"]
    assert lr_at(720, exponential) == LR and math.isclose(lr_at(TOTAL, exponential), LR * 0.001)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_decay_never_rises_after_the_warm_up(cfg: TrainConfig) -> None:
    values = [lr_at(step, cfg) for step in range(cfg.warmup_iterations, TOTAL + 1)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))
