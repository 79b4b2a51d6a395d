"""The training loop: PK batches, batch-hard triplet loss, Adam with the paper's decay, checkpoints and resume.

Reads top to bottom like nanoGPT's train.py: set-up, then per step: lr, forward/backward, step, log,
checkpoint, stop. A run folder holds ``config.json`` (every option), ``checkpoint-NNNNNN.pt`` files and
``log.jsonl`` (the logged statistics); :func:`train` with ``resume=True`` continues from the newest
checkpoint and reaches the same state as an uninterrupted run, since every batch and every augmentation
is a pure function of (seed, step).
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

import numpy as np
import torch

from reid_tune.augmentation import train_augment
from reid_tune.config import TrainConfig
from reid_tune.distributed import gather_batch, rank_and_world, wrap_model
from reid_tune.datasets import ReidDataset, check_trainable, load_csv, load_image
from reid_tune.errors import ReidTuneError
from reid_tune.losses import TripletLoss
from reid_tune.models import ReidModel, create_model, model_args
from reid_tune.sampler import PKSampler, shard_batch

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_GLOB = "checkpoint-*.pt"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: constant, then ``lr * decay_factor ** ((t - t0) / (T - t0))`` (triplet-reid)."""
    t0, total = cfg.decay_start_iteration, cfg.train_iterations
    if step <= t0 or t0 >= total:
        return cfg.learning_rate
    return cfg.learning_rate * cfg.decay_factor ** ((step - t0) / (total - t0))


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":  # the current GPU: Ray Train and torchrun select each worker's own
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


class TrainCallback:
    """Hooks the search layer overrides to report progress; the defaults do nothing."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Called every ``log_every`` steps with the batch statistics (floats)."""

    def on_checkpoint(self, step: int, path: Path | None, model: ReidModel) -> None:
        """Called after a checkpoint of ``step`` was written to ``path`` (None on workers other than rank 0)."""


@dataclass(frozen=True)
class TrainResult:
    """How a call of :func:`train` ended."""

    step: int  # iterations done
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool  # stopped early by SIGINT/SIGTERM


# ---------------------------------------------------------------- data


class PKBatches(torch.utils.data.Dataset):
    """Item ``step`` is the whole augmented PK batch of that step: (step, images, labels).

    A pure function of (seed, step), whatever process or worker computes it: resume-exact.
    """

    def __init__(self, dataset: ReidDataset, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1) -> None:
        self.fids = dataset.fids
        self.root = Path(cfg.image_root)
        self.sampler = PKSampler(dataset.pids, cfg.batch_p, cfg.batch_k, seed=cfg.seed)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    def __len__(self) -> int:
        return self.cfg.train_iterations

    def __getitem__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        indices = self.sampler.batch(step)
        positions = shard_batch(np.arange(len(indices)), batch_p=self.cfg.batch_p, batch_k=self.cfg.batch_k,
                                rank=self.rank, world_size=self.world_size)
        images = torch.stack([self._augmented(step, p, indices[p]) for p in positions])
        return step, images, torch.from_numpy(self.sampler.labels(indices[positions]))

    def _augmented(self, step: int, position: int, index: int) -> torch.Tensor:
        # one stream per (step, place in the global batch): the same pixels whatever the worker count
        rng = np.random.default_rng([self.cfg.seed, step, position])
        return train_augment(load_image(self.root / self.fids[index]), rng, input_size=self.cfg.input_size,
                             pre_crop_size=self.cfg.pre_crop_size, crop=self.cfg.crop_augment,
                             flip=self.cfg.flip_augment)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the trainer for cores


def batch_stream(batches: PKBatches, start: int, *, num_workers: int, pin: bool) -> Iterator[Any]:
    """Batches ``start .. train_iterations-1`` in order, decoded by ``num_workers`` processes."""
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, len(batches)), num_workers=num_workers,
        pin_memory=pin, worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )
    return iter(loader)


# ---------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The file of the checkpoint after ``step`` iterations."""
    return Path(run_dir) / f"checkpoint-{step:06d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first."""
    return sorted(Path(run_dir).glob(CHECKPOINT_GLOB))


def save_checkpoint(run_dir: Path, step: int, model: ReidModel, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> Path:
    """Write weights, optimizer state and options atomically; prune old ones per ``keep_checkpoints``."""
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "config": cfg.to_dict(), "model_args": model_args(model)}, tmp)
    tmp.replace(path)
    if cfg.keep_checkpoints:
        for old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
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
        raise ReidTuneError(f"{run_dir}: no checkpoint-*.pt in this run folder")
    return found[-1]


def load_model(path: Path, *, device: str | torch.device = "cpu") -> tuple[ReidModel, TrainConfig]:
    """Rebuild the network of a checkpoint file (architecture from the file) in eval mode."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ReidTuneError(f"{path}: cannot read checkpoint: {err}") from None
    model = create_model(**state["model_args"])
    model.load_state_dict(state["model"])
    cfg = TrainConfig(**state["config"])
    return model.to(device).eval(), cfg


# ---------------------------------------------------------------- the step


class TrainStep:
    """Forward, loss, backward and Adam step of one PK batch; returns the loss statistics (device tensors).

    ``model`` is the plain network (what checkpoints hold); ``net`` is what runs it, DDP when distributed.
    """

    def __init__(self, model: ReidModel, loss_fn: TripletLoss, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, bf16: bool, channels_last: bool) -> None:
        self.model, self.net, self.loss_fn, self.optimizer = model, model, loss_fn, optimizer
        self.device, self.bf16, self.channels_last = device, bf16, channels_last

    def distribute(self) -> None:
        """Run data-parallel across the initialised process group (a no-op for one worker)."""
        self.net = wrap_model(self.model, self.device)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of the (global) batch and its gradients in ``.grad``; mining spans every worker's share."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embeddings = self.net(images)
        embeddings, labels = gather_batch(embeddings.float(), labels)
        loss, stats = self.loss_fn(embeddings, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, stats

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, stats = self.forward_backward(images, labels)
        self.optimizer.step()
        return stats


def build_step(cfg: TrainConfig, device: torch.device) -> TrainStep:
    """Seeded model, loss and Adam for ``cfg`` on ``device``."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.network, cfg.head, embedding_dim=cfg.embedding_dim, pretrained=cfg.pretrained)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loss_fn = TripletLoss(margin=cfg.margin, metric=cfg.metric, mining=cfg.loss, precision_k=cfg.batch_k - 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    return TrainStep(model, loss_fn, optimizer, device=device, bf16=bf16, channels_last=channels_last)


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
        raise ReidTuneError(f"{run_dir}: already holds a run; pass --resume to continue it or pick a new folder")
    return cfg


def load_training_set(cfg: TrainConfig) -> ReidDataset:
    """The training CSV, checked: images exist, identities have >= 2 images, enough identities for P."""
    dataset = load_csv(cfg.train_set, image_root=cfg.image_root, check_images=True)
    check_trainable(dataset, min_images=2)
    num_ids = len(set(dataset.pids.tolist()))
    if num_ids < cfg.batch_p:
        raise ReidTuneError(f"{cfg.train_set}: batch_p={cfg.batch_p} but the set has only {num_ids} identities")
    return dataset


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


def train(cfg: TrainConfig | None, run_dir: Path, *, resume: bool = False,
          callback: TrainCallback | None = None, progress: bool = False) -> TrainResult:
    """Train one model into ``run_dir``; with ``resume`` continue it from its newest checkpoint.

    Under an initialised process group (e.g. a Ray Train worker) every worker runs this with its share
    of each PK batch; rank 0 alone writes the run folder, every worker gets the callbacks.

    Example::

        cfg = TrainConfig(train_set="data/market1501_train.csv", image_root="Market-1501-v15.09.15")
        train(cfg, Path("runs/market"), progress=True)
    """
    run_dir = Path(run_dir)
    cfg = run_options(cfg, run_dir, resume=resume)
    rank, world = rank_and_world()
    device = resolve_device(cfg.device)
    dataset = load_training_set(cfg)
    step_fn = build_step(cfg, device)
    if not resume and rank == 0:  # written only once the options and the data passed every check
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
    start, last = _restore(step_fn, run_dir, device) if resume else (0, None)
    step_fn.distribute()
    batches = PKBatches(dataset, cfg, rank=rank, world_size=world)
    return _loop(cfg, run_dir, step_fn, batches, start, last, callback or TrainCallback(),
                 progress=progress and rank == 0, main=rank == 0)


def _restore(step_fn: TrainStep, run_dir: Path, device: torch.device) -> tuple[int, Path | None]:
    """Weights and Adam state from the newest checkpoint (architecture and options came from the folder)."""
    if not list_checkpoints(run_dir):
        return 0, None
    last = find_checkpoint(run_dir)
    state = torch.load(last, map_location=device, weights_only=True)
    step_fn.model.load_state_dict(state["model"])
    step_fn.optimizer.load_state_dict(state["optimizer"])
    return state["step"], last


def _loop(cfg: TrainConfig, run_dir: Path, step_fn: TrainStep, batches: PKBatches, start: int,
          last: Path | None, callback: TrainCallback, *, progress: bool, main: bool) -> TrainResult:
    """Steps ``start`` .. ``train_iterations``: step, log, checkpoint, stop."""
    device = step_fn.device
    stream = batch_stream(batches, start, num_workers=cfg.num_workers, pin=device.type == "cuda")
    stop = _StopFlag()
    bar = _Bar(cfg, start) if progress else contextlib.nullcontext()
    done, tick, tick_step = start, time.perf_counter(), start
    step_fn.net.train()
    with stop.installed(), bar as live:
        for step, images, labels in stream:
            # forward, backward, Adam step at this step's learning rate
            lr = lr_at(step, cfg)
            stats = step_fn(images, labels, lr)
            done = step + 1

            # log: the only host synchronisation of the loop
            if done % cfg.log_every == 0 or done == cfg.train_iterations:
                now = time.perf_counter()
                metrics = {k: float(v) for k, v in stats.items()}
                metrics.update(lr=lr, images_per_s=(done - tick_step) * cfg.batch_size / max(now - tick, 1e-9))
                tick, tick_step = now, done
                if main:
                    _append_log(run_dir, {"step": done, **metrics})
                callback.on_log(done, metrics)
                if live is not None:
                    live.update(done, metrics)

            # checkpoint: periodically, at the end, and when asked to stop
            if done % cfg.checkpoint_frequency == 0 or done == cfg.train_iterations or stop.set:
                last = save_checkpoint(run_dir, done, step_fn.model, step_fn.optimizer, cfg) if main else None
                callback.on_checkpoint(done, last, step_fn.model)
                step_fn.net.train()
            if stop.set:
                return TrainResult(step=done, checkpoint=last, interrupted=True)
    return TrainResult(step=done, checkpoint=last, interrupted=False)


class _Bar:
    """A rich progress bar showing loss, lr, images/s and time left."""

    def __init__(self, cfg: TrainConfig, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.task = self.progress.add_task("train", total=cfg.train_iterations, completed=start, info="")

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        info = (f"loss {metrics['loss_mean']:.4f}  lr {metrics['lr']:.2e}  "
                f"{metrics['images_per_s']:.0f} img/s  active {metrics['active_fraction']:.0%}")
        self.progress.update(self.task, completed=step, info=info)

