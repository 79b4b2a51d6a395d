"""The training loop: PK batches, batch-hard triplet loss, Adam with the paper's decay, checkpoints, resume.

Reads top to bottom like nanoGPT's train.py: set-up, then per step: lr, forward/backward, step, log,
checkpoint, stop. A run folder holds ``config.json`` (every option), ``checkpoint-NNNNNN.pt`` files and
``log.jsonl`` (the logged statistics); :func:`train` with ``resume=True`` continues from the newest
checkpoint and reaches the same state as an uninterrupted run, since every batch and every augmentation
is a pure function of (seed, step). The parts it runs live beside it: the data (``training_data``), the
update of one batch (``steps``), the device set-up (``devices``) and the checkpoint files (``checkpoints``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reid_tune.checkpoints import (
    CONFIG_FILE,
    find_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from reid_tune.config import TrainConfig
from reid_tune.devices import Fallback, resolve_device
from reid_tune.distributed import rank_and_world
from reid_tune.errors import ReidTuneError
from reid_tune.models import ReidModel
from reid_tune.schedules import lr_at
from reid_tune.steps import TrainStep, build_step
from reid_tune.training_data import load_training_set, open_batches

LOG_FILE = "log.jsonl"


class TrainCallback:
    """Hooks a caller overrides to follow the loop (search reports, the CLI's progress bar); no-ops here."""

    def running(self, start: int, total: int) -> contextlib.AbstractContextManager[Any]:
        """The loop from step ``start`` to ``total``: entered before its first step, left however it ends."""
        return contextlib.nullcontext()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Called every ``log_every`` steps with the batch statistics (floats)."""

    def on_checkpoint(self, step: int, path: Path | None, model: ReidModel) -> None:
        """Called after the checkpoint of ``step`` was written to ``path`` (None on workers but rank 0)."""

    def on_fallback(self, fallback: Fallback) -> None:
        """Called when the run goes without a GPU feature (already warned): a CUDA graph that failed to
        capture (after the first step), a decoded cache that did not fit (before it)."""


@dataclass(frozen=True)
class TrainResult:
    """How a call of :func:`train` ended."""

    step: int  # iterations done
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool  # stopped early by SIGINT/SIGTERM


# ---------------------------------------------------------------- run folder


def run_options(cfg: TrainConfig | None, run_dir: Path, *, resume: bool) -> TrainConfig:
    """The options of the run: ``cfg`` for a new run folder, the stored ones when resuming."""
    run_dir = Path(run_dir)
    stored = run_dir / CONFIG_FILE
    if resume:
        if not stored.is_file():
            raise ReidTuneError(f"{run_dir}: nothing to resume (no {CONFIG_FILE})")
        return TrainConfig.load(stored)
    if cfg is None:
        raise ReidTuneError("train: options are needed unless resuming")
    if stored.exists() or list_checkpoints(run_dir):
        raise ReidTuneError(
            f"{run_dir}: already holds a run; pass --resume to continue it or pick a new folder"
        )
    return cfg


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes the current step, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.set = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals only reach the main thread (e.g. not inside a Ray worker's thread)
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.set = True


def _append_log(run_dir: Path, record: dict[str, float]) -> None:
    with open(Path(run_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    callback: TrainCallback | None = None,
    gpu_share: float = 1.0,
) -> TrainResult:
    """Train one model into ``run_dir``; with ``resume`` continue it from its newest checkpoint.

    Under an initialised process group (e.g. a Ray Train worker) every worker runs this with its share
    of each PK batch; rank 0 alone writes the run folder, every worker gets the callbacks. ``gpu_share``:
    the part of its GPU this process holds (a fractional Ray GPU), which its decoded cache may fill.

    Example::

        cfg = TrainConfig(train_set="data/market1501_train.csv", image_root="Market-1501-v15.09.15")
        train(cfg, Path("runs/market"), callback=TrainProgress())  # reid_tune.console's progress bar
    """
    run_dir = Path(run_dir)
    cfg = run_options(cfg, run_dir, resume=resume)
    callback = callback or TrainCallback()
    rank, world = rank_and_world()
    device = resolve_device(cfg.device)
    dataset = load_training_set(cfg)
    step_fn = build_step(cfg, device, num_ids=len(set(dataset.pids.tolist())))
    batches = open_batches(
        dataset,
        cfg,
        device,
        rank=rank,
        world_size=world,
        gpu_share=gpu_share,
        on_fallback=callback.on_fallback,
    )
    if not resume and rank == 0:  # written only once the options and the data passed every check
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
    start, last = _restore(step_fn, run_dir, device) if resume else (0, None)
    step_fn.distribute()
    return _loop(cfg, run_dir, step_fn, batches(start), start, last, callback, main=rank == 0)


def _restore(step_fn: TrainStep, run_dir: Path, device: torch.device) -> tuple[int, Path | None]:
    """Weights and Adam state from the newest checkpoint (architecture and options came from the folder)."""
    if not list_checkpoints(run_dir):
        return 0, None
    last = find_checkpoint(run_dir)
    state = read_checkpoint(last, device=device)
    step_fn.load_state(state)
    return state["step"], last


def _loop(
    cfg: TrainConfig,
    run_dir: Path,
    step_fn: TrainStep,
    stream: Iterator[Any],
    start: int,
    last: Path | None,
    callback: TrainCallback,
    *,
    main: bool,
) -> TrainResult:
    """Steps ``start`` .. ``train_iterations``: step, log, checkpoint, stop."""
    stop = _StopFlag()
    done, tick, tick_step = start, time.perf_counter(), start
    step_fn.net.train()
    with stop.installed(), callback.running(start, cfg.train_iterations):
        for step, images, labels in stream:
            # forward, backward, Adam step at this step's learning rate
            lr = lr_at(step, cfg)
            stats = step_fn(images, labels, lr)
            done = step + 1
            if step == start and step_fn.fallback is not None:  # the first call captures the graph
                callback.on_fallback(step_fn.fallback)

            # log: the only host synchronisation of the loop
            if done % cfg.log_every == 0 or done == cfg.train_iterations:
                metrics = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # waits for the GPU
                now = time.perf_counter()
                metrics.update(
                    lr=lr, images_per_s=(done - tick_step) * cfg.batch_size / max(now - tick, 1e-9)
                )
                tick, tick_step = now, done
                if main:
                    _append_log(run_dir, {"step": done, **metrics})
                callback.on_log(done, metrics)

            # checkpoint: periodically, at the end, and when asked to stop
            if done % cfg.checkpoint_frequency == 0 or done == cfg.train_iterations or stop.set:
                last = save_checkpoint(
                    run_dir, done, step_fn.model, step_fn.optimizer, cfg, identity=step_fn.identity
                ) if main else None
                callback.on_checkpoint(done, last, step_fn.model)
                step_fn.net.train()
            if stop.set:
                return TrainResult(step=done, checkpoint=last, interrupted=True)
    return TrainResult(step=done, checkpoint=last, interrupted=False)
