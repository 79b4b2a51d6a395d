"""The functional checks: this machine's training paths against each other on the trial's own batch.

Each check is a function registered with :func:`check`, returning (status, detail); a check that needs
more GPUs than the checks' device offers is SKIPPED, saying so, and one that raises FAILs. New checks slot
in with the decorator. The comparisons: the CUDA-graph step against the eager step (losses and weight
updates over a few steps), the decoded cache's batches against the DataLoader's (the same augmented
pixels), a bf16 autocast forward against fp32, and two DDP processes against one (global mining); and
the GPU defects a reading of the code found: the other loss graphed, a capture beside the DataLoader's
pin-memory thread, a CPU run resumed as a graph.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reid_tune.augmentation import _draw_flips, _draw_offsets, train_augment
from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset, load_image
from reid_tune.devices import resolve_precision
from reid_tune.doctor.report import FAIL, PASS, SKIPPED, Outcome, Result, attempt
from reid_tune.doctor.target import Target, trial_step
from reid_tune.gpu_data import DeviceBatches, cache_image_size, step_seed
from reid_tune.sampler import shard_batch
from reid_tune.steps import TrainStep
from reid_tune.training_data import PKBatches, batch_stream
from reid_tune.vocabulary import LOSSES

STEPS = 3  # training steps, or batches, each comparison runs
TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}  # relative differences of two step kinds, by precision
PIXEL_TOLERANCE = 1e-4  # of normalised pixels: one uint8 level is about 0.017
BF16_TOLERANCE = 3e-2  # relative error of bf16 autocast embeddings against fp32


@dataclass(frozen=True)
class Check:
    """A registered check: its name, the GPUs it needs, and the function that runs it."""

    name: str
    gpus: int
    run: Callable[[Target], Outcome]


CHECKS: list[Check] = []


def check(
    name: str, *, gpus: int = 0
) -> Callable[[Callable[[Target], Outcome]], Callable[[Target], Outcome]]:
    """Register a check (run in registration order) that needs ``gpus`` CUDA GPUs."""

    def register(run: Callable[[Target], Outcome]) -> Callable[[Target], Outcome]:
        CHECKS.append(Check(name, gpus, run))
        return run

    return register


def run_checks(target: Target) -> list[Result]:
    """Every registered check on ``target``: skipped when the checks' device offers too few GPUs."""
    return [_run(c, target) for c in CHECKS]


def gpus_for(target: Target) -> int:
    """The CUDA GPUs the checks may use: none when they run on the CPU."""
    return torch.cuda.device_count() if target.cfg.device.startswith("cuda") else 0


def needs_gpus(name: str, count: int, target: Target) -> Result:
    """``name`` SKIPPED: it needs ``count`` CUDA GPUs, and says what the checks run on."""
    found = gpus_for(target)
    need = "a CUDA GPU" if count == 1 else f"{count} CUDA GPUs"
    return Result(name, SKIPPED, f"needs {need}; this run has {found or 'none'} (device {target.cfg.device})")


def _run(registered: Check, target: Target) -> Result:
    if gpus_for(target) < registered.gpus:
        return needs_gpus(registered.name, registered.gpus, target)
    return attempt(registered.name, lambda: registered.run(target))


def _device(target: Target) -> torch.device:
    return torch.device(target.cfg.device)


def first_batch(target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 0 of the trial (images and labels on its device), from the decoded cache."""
    return DeviceBatches.from_dataset(target.dataset, target.cfg, _device(target)).batch(0)


# ---------------------------------------------------------------- CUDA graph against eager


@contextlib.contextmanager
def _same_kernels() -> Iterator[None]:
    """cuDNN's deterministic algorithms, without autotuning, for the block: two step kinds run the same
    kernels (build_step turns autotuning on; call ``torch.backends.cudnn.benchmark = False`` after it)."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _flat(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    """The floating-point tensors, as one fp32 vector (a copy)."""
    return torch.cat([t.detach().float().flatten() for t in tensors if t.is_floating_point()])


def compare_steps(
    reference: TrainStep,
    other: TrainStep,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    rtol: float,
) -> Outcome:
    """Both steps, from the same weights, train ``STEPS`` times on the batch (the lr halving each time):
    PASS when their losses and their weight updates agree within ``rtol`` (relative)."""
    before = _flat(reference.model.state_dict().values())
    losses = [
        tuple(float(step(images, labels, lr / 2**i)["loss_mean"]) for step in (reference, other))
        for i in range(STEPS)
    ]
    loss_error = max(abs(a - b) / max(abs(a), 1e-12) for a, b in losses)
    after = _flat(reference.model.state_dict().values())
    gap = _flat(other.model.state_dict().values()) - after
    update_error = float(gap.norm() / (after - before).norm().clamp_min(1e-30))
    status = PASS if max(loss_error, update_error) <= rtol else FAIL
    return status, (
        f"{STEPS} steps on one batch: losses within {loss_error:.1e}, weight updates within "
        f"{update_error:.1e} (relative; tolerance {rtol:g})"
    )


@check("CUDA-graph step = eager step", gpus=1)
def graphed_step(target: Target) -> Outcome:
    """The trial's step as one CUDA graph against the same step run eagerly."""
    return _graphed_against_eager(target, target.cfg)


@check("CUDA-graph step = eager step, with the other loss", gpus=1)
def graphed_other_loss(target: Target) -> Outcome:
    """The same with the loss the trial does not use (batch_all captures since its mining is masked, not
    indexed): a search may search the loss."""
    other = next(loss for loss in LOSSES if loss != target.cfg.loss)
    outcome = _graphed_against_eager(target, target.cfg.replace(loss=other))
    return outcome[0], f"loss {other}: {outcome[1]}"


@check("CUDA graph captures beside the DataLoader's pin-memory thread", gpus=1)
def capture_beside_pinning(target: Target) -> Outcome:
    """Graphed steps fed by the CPU data path (worker processes, pinned batches): the capture is
    thread-local, so the pin-memory thread cannot break it."""
    cfg, device = target.cfg.replace(cuda_graph=True), _device(target)
    graphed = trial_step(cfg, device)
    stream = batch_stream(PKBatches(target.dataset, cfg), 0, num_workers=1, pin=True)
    for _, images, labels in itertools.islice(stream, STEPS):
        graphed(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), cfg.learning_rate)
    if graphed.fallback is not None:
        return FAIL, f"the graph did not capture beside the DataLoader ({graphed.fallback.reason})"
    return PASS, f"{STEPS} graphed steps on DataLoader batches pinned by its thread"


@check("a CPU run resumes on the GPU as a CUDA graph", gpus=1)
def cpu_run_resumed_on_gpu(target: Target) -> Outcome:
    """A step's state from the CPU (contiguous Adam moments) loaded into the graphed GPU step
    (channels_last parameters, fused Adam): the moments take their parameters' layout, the graph captures."""
    cfg, device = target.cfg, _device(target)
    images, labels = first_batch(target)
    cpu = trial_step(cfg.replace(device="cpu", cuda_graph=False), torch.device("cpu"))
    cpu(images.cpu(), labels.cpu(), cfg.learning_rate)
    graphed = trial_step(cfg.replace(cuda_graph=True), device)
    graphed.load_state({"model": cpu.model.state_dict(), "optimizer": cpu.optimizer.state_dict()})
    loss = float(graphed(images, labels, cfg.learning_rate)["loss_mean"])
    state = graphed.optimizer.state
    strays = sum(v.stride() != p.stride() for p in state for v in state[p].values() if v.shape == p.shape)
    if graphed.fallback is not None or strays or not np.isfinite(loss):
        reason = graphed.fallback.reason if graphed.fallback else f"{strays} moments laid out unlike params"
        return FAIL, f"loss {loss:.4f}; {reason}"
    return PASS, f"resumed and stepped as a graph: loss {loss:.4f}, every moment laid out like its parameter"


def _graphed_against_eager(target: Target, cfg: TrainConfig) -> Outcome:
    """``cfg``'s step as one CUDA graph against the same step run eagerly, on the trial's first batch."""
    device = _device(target)
    images, labels = first_batch(target)
    with _same_kernels():
        eager = trial_step(cfg.replace(cuda_graph=False), device)
        graphed = trial_step(cfg.replace(cuda_graph=True), device)
        torch.backends.cudnn.benchmark = False
        status, detail = compare_steps(
            eager,
            graphed,
            images,
            labels,
            lr=cfg.learning_rate,
            rtol=TOLERANCE[resolve_precision(cfg, device)],
        )
    if graphed.fallback is not None:
        return FAIL, f"the graph did not capture; training falls back to eager ({graphed.fallback.reason})"
    return status, detail


# ---------------------------------------------------------------- decoded cache against DataLoader


def device_draws(cfg: TrainConfig, step: int, device: torch.device) -> list[tuple[bool, int, int]]:
    """(flipped, top, left) of each image of batch ``step`` as the device path draws them: its generator,
    seeded alike, drawing flips, then tops, then lefts (``augmentation.batch_train_augment``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(cfg.seed, step))
    height, width = cache_image_size(cfg)
    flips = _draw_flips(cfg.batch_size, generator, enabled=cfg.flip_augment)
    tops = _draw_offsets(cfg.batch_size, height - cfg.input_height, generator, enabled=cfg.crop_augment)
    lefts = _draw_offsets(cfg.batch_size, width - cfg.input_width, generator, enabled=cfg.crop_augment)
    return list(zip(flips.tolist(), tops.tolist(), lefts.tolist()))


class ReplayedBatches(PKBatches):
    """The DataLoader path's batches, each image flipped and cropped as the device path does it at that step:
    the paths draw from different generators (numpy's per image, torch's per batch), all else is shared."""

    def __init__(self, dataset: ReidDataset, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(dataset, cfg)
        self.device, self.drawn = device, (-1, [])

    def _augmented(self, step: int, position: int, index: int) -> torch.Tensor:
        if self.drawn[0] != step:
            self.drawn = step, device_draws(self.cfg, step, self.device)
        flip, top, left = self.drawn[1][position]
        offsets = iter((top, left))  # train_augment draws random() < 0.5 to flip, then the top, the left
        rng = SimpleNamespace(random=lambda: 0.0 if flip else 1.0, integers=lambda low, high: next(offsets))
        cfg = self.cfg
        return train_augment(
            load_image(self.root / self.fids[index]),
            rng,
            input_size=cfg.input_size,
            pre_crop_size=cfg.pre_crop_size,
            crop=cfg.crop_augment,
            flip=cfg.flip_augment,
        )


@check("decoded-cache batches = DataLoader batches")
def cached_batches(target: Target) -> Outcome:
    """The device path's first batches (decoded cache, augmented on the device) against the DataLoader's,
    random erasing off (its boxes come from each path's own generator; their statistics are tested)."""
    cfg, device = target.cfg.replace(random_erasing=0.0), _device(target)
    cached = DeviceBatches.from_dataset(target.dataset, cfg, device)
    loaded = batch_stream(ReplayedBatches(target.dataset, cfg, device), 0, num_workers=0, pin=False)
    worst = 0.0
    for step, images, labels in itertools.islice(loaded, STEPS):
        want, want_labels = cached.batch(step)
        if not torch.equal(labels, want_labels.cpu()):
            return FAIL, f"batch {step}: the paths drew other identities or images"
        worst = max(worst, float((images - want.cpu()).abs().max()))
    status = PASS if worst <= PIXEL_TOLERANCE else FAIL
    return status, (
        f"{STEPS} batches of {cfg.batch_size} augmented images on {device}: largest pixel "
        f"difference {worst:.1e} (tolerance {PIXEL_TOLERANCE:g})"
    )


# ---------------------------------------------------------------- bf16 autocast against fp32


@check("bf16 autocast forward = fp32 forward")
def bf16_forward(target: Target) -> Outcome:
    """The trial's network on its batch, under bf16 autocast and in fp32 (BatchNorm on its running
    statistics: an untrained network's batch statistics would amplify any rounding)."""
    cfg, device = target.cfg, _device(target)
    precision = resolve_precision(cfg, device)
    if precision != "bf16":
        return SKIPPED, (
            f"the trial trains in {precision} on {device.type} (precision {cfg.precision}); "
            f"--precision bf16 checks bf16 here"
        )
    step = trial_step(cfg.replace(cuda_graph=False), device)
    images = first_batch(target)[0].contiguous(memory_format=step.memory_format)
    model = step.model.eval()
    with torch.no_grad():
        exact = model(images)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            rounded = model(images).float()
    error = float((rounded - exact).norm() / exact.norm())
    status = PASS if bool(rounded.isfinite().all()) and error <= BF16_TOLERANCE else FAIL
    return status, (
        f"embeddings of {len(images)} images: relative error {error:.1e} (tolerance {BF16_TOLERANCE:g})"
    )


# ---------------------------------------------------------------- two DDP processes against one


def _gradients(step: TrainStep) -> torch.Tensor:
    return _flat(p.grad for p in step.model.parameters() if p.grad is not None)


def _ddp_worker(
    rank: int, cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, init: str, out: str
) -> None:
    """One of two DDP workers on GPU ``rank``: its identities' share of the batch, the loss mined over the
    whole batch; rank 0 saves the loss and the gradients to ``out``."""
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    try:
        device = torch.device("cuda", rank)
        step = trial_step(cfg.replace(device=str(device)), device)
        step.distribute()
        mine = shard_batch(
            np.arange(len(labels)), batch_p=cfg.batch_p, batch_k=cfg.batch_k, rank=rank, world_size=2
        )
        loss, _ = step.forward_backward(images[mine], labels[mine])
        if rank == 0:
            torch.save({"loss": loss.detach().cpu(), "gradients": _gradients(step).cpu()}, out)
        dist.barrier()  # no rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@check("2-process DDP step = 1 process (global mining)", gpus=2)
def ddp_step(target: Target) -> Outcome:
    """Two DDP processes (GPUs 0 and 1, SyncBatchNorm) against one process on the whole batch: the same
    loss and gradients, as every anchor mines the whole batch."""
    cfg = target.cfg.replace(device="cuda:0", cuda_graph=False)
    images, labels = first_batch(target)
    single = trial_step(cfg, torch.device(cfg.device))
    loss = float(single.forward_backward(images, labels)[0].detach())
    with tempfile.TemporaryDirectory(prefix="reid-tune-doctor-ddp-") as folder:
        out = Path(folder) / "rank0.pt"
        mp.spawn(
            _ddp_worker, args=(cfg, images.cpu(), labels.cpu(), f"file://{folder}/init", str(out)), nprocs=2
        )
        got = torch.load(out, weights_only=True)
    want = _gradients(single).cpu()
    loss_error = abs(float(got["loss"]) - loss) / max(abs(loss), 1e-12)
    gradient_error = float((got["gradients"] - want).norm() / want.norm().clamp_min(1e-30))
    rtol = TOLERANCE[resolve_precision(cfg, torch.device(cfg.device))]
    status = PASS if max(loss_error, gradient_error) <= rtol else FAIL
    return status, (
        f"loss within {loss_error:.1e}, gradients within {gradient_error:.1e} (relative; tolerance {rtol:g})"
    )
