"""Training speed on this machine: images/s of the trial's step, eager and as a CUDA graph, and of 1, 2 and
4 trials sharing one GPU (Ray's fractional ``gpus_per_worker``), each trial in its own process.

A step is timed on a random PK batch already on the device (the data paths are checked, not timed), after
untimed calls that capture the graph and let cuDNN autotune; the device is synchronised before each reading.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from reid_tune.config import TrainConfig
from reid_tune.doctor import report
from reid_tune.doctor.checks import gpus_for, needs_gpus
from reid_tune.doctor.report import FAIL, PASS, Outcome, Result, attempt
from reid_tune.doctor.target import Target, trial_step

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue
    from multiprocessing.synchronize import Barrier

WARMUP = {"cuda": 2, "cpu": 1}  # untimed calls first: a graph's capture, cuDNN's autotuning, allocations
SECONDS = 2.0  # the least time a reading of the step takes: its timed steps repeat until then
PACKINGS = (1, 2, 4)  # trials sharing one GPU
PACK_SECONDS = 5.0  # the window every sharing trial is timed over, together
PACK_CHUNK = 5  # steps between readings of the clock while sharing
BARRIER_TIMEOUT_S = 600


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(
    cfg: TrainConfig, *, steps: int, seconds: float = 0.0, ready: Barrier | None = None
) -> tuple[float, str]:
    """Images/s of ``cfg``'s step over ``steps`` timed calls, repeated until ``seconds`` have passed
    (``ready`` is waited for before the clock starts), and a note if a CUDA graph fell back to eager."""
    device = torch.device(cfg.device)
    step = trial_step(cfg, device)
    images = torch.randn(cfg.batch_size, 3, *cfg.input_size, device=device)
    images = images.contiguous(memory_format=step.memory_format)
    labels = torch.arange(cfg.batch_p, device=device).repeat_interleave(cfg.batch_k)

    def run(count: int) -> int:
        for _ in range(count):
            step(images, labels, cfg.learning_rate)
        _sync(device)
        return count

    run(WARMUP.get(device.type, 1))
    if ready is not None:
        ready.wait(timeout=BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    done = run(steps)
    while time.perf_counter() - start < seconds:
        done += run(steps)
    note = f" (the graph fell back to eager: {step.fallback.reason})" if step.fallback else ""
    return done * cfg.batch_size / (time.perf_counter() - start), note


def _speed(cfg: TrainConfig, steps: int) -> Outcome:
    rate, note = step_rate(cfg, steps=steps, seconds=SECONDS)
    return PASS, f"{rate:,.0f} images/s, {1000 * cfg.batch_size / rate:,.1f} ms/step{note}"


def step_speeds(target: Target, steps: int) -> list[Result]:
    """The trial's step eager, and as a CUDA graph on a GPU: images/s at its batch."""
    found = [attempt("eager step", lambda: _speed(target.cfg.replace(cuda_graph=False), steps))]
    if not gpus_for(target):
        return [*found, needs_gpus("CUDA-graph step", 1, target)]
    return [*found, attempt("CUDA-graph step", lambda: _speed(target.cfg.replace(cuda_graph=True), steps))]


# ---------------------------------------------------------------- trials sharing a GPU


def _sharing_trial(rank: int, cfg: TrainConfig, count: int, ready: Barrier, rates: SimpleQueue) -> None:
    """One of ``count`` trial processes on the GPU: its images/s over the window they share."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // count))
    rates.put(step_rate(cfg, steps=PACK_CHUNK, seconds=PACK_SECONDS, ready=ready)[0])


def shared_rates(cfg: TrainConfig, count: int) -> list[float]:
    """Images/s of each of ``count`` trials of ``cfg`` timed together on its GPU."""
    spawn = mp.get_context("spawn")
    ready, rates = spawn.Barrier(count), spawn.SimpleQueue()
    mp.spawn(_sharing_trial, args=(cfg, count, ready, rates), nprocs=count)
    return [rates.get() for _ in range(count)]


def _sharing_row(cfg: TrainConfig, count: int) -> tuple[list[str], float, bool]:
    """A table row for ``count`` trials, their total images/s (0 when they failed) and whether they failed
    otherwise than by running out of memory (the error's last line in the row)."""
    head = [str(count), f"{1 / count:g}"]
    try:
        rates = shared_rates(cfg, count)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        if "OutOfMemoryError" in str(err):
            return [*head, "out of memory", ""], 0.0, False
        last = [line for line in str(err).splitlines() if line.strip()][-1]
        return [*head, "failed", last[:120]], 0.0, True
    return [*head, f"{sum(rates):,.0f}", " + ".join(f"{r:,.0f}" for r in rates)], sum(rates), False


def sharing(target: Target) -> tuple[list[list[str]], Result]:
    """1, 2 and 4 trials sharing the checks' GPU: a table row each, and which packing trains the most."""
    if not gpus_for(target):
        return [], needs_gpus("trials per GPU", 1, target)
    torch.cuda.empty_cache()  # what the checks left is not the trials'
    rows, totals, failed = [], {}, False
    for count in PACKINGS:
        row, totals[count], bad = _sharing_row(target.cfg, count)
        rows.append(row)
        failed |= bad
    return rows, _best(totals, failed)


def _best(totals: dict[int, float], failed: bool) -> Result:
    best = max(totals, key=totals.get)
    if failed or not totals[best]:
        return Result("trials per GPU", FAIL, "a sharing trial failed (see the table)")
    return Result(
        "trials per GPU",
        PASS,
        f"{best} (gpus_per_worker: {1 / best:g}) trains the most images/s: {totals[best]:,.0f}",
    )


def report_throughput(target: Target, steps: int) -> list[Result]:
    """The step's speed and the best packing of trials on a GPU, then the packings' table (on a GPU)."""
    cfg = target.cfg
    speeds = step_speeds(target, steps)
    rows, packing = sharing(target)
    found = report.results(
        f"Throughput on {cfg.device}: {cfg.network}, {cfg.batch_size} images of {cfg.input_height}x"
        f"{cfg.input_width} a step, timed over {steps}+ steps and {SECONDS:g}+ s",
        [*speeds, packing],
    )
    if rows:
        report.table(
            f"Trials sharing {cfg.device}, each its own process, timed together for {PACK_SECONDS:g} s",
            ["trials", "gpus_per_worker", "images/s", "each"],
            rows,
        )
    return found
