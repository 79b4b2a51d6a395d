"""The training loop: PK batches, batch-hard triplet loss, Adam with the paper's decay, checkpoints and resume.

Reads top to bottom like nanoGPT's train.py: set-up, then per step: lr, forward/backward, step, log,
checkpoint, stop. A run folder holds ``config.json`` (every option), ``checkpoint-NNNNNN.pt`` files and
``log.jsonl`` (the logged statistics); :func:`train` with ``resume=True`` continues from the newest
checkpoint and reaches the same state as an uninterrupted run, since every batch and every augmentation
is a pure function of (seed, step).

On a GPU the step is one CUDA graph replay (:class:`GraphedTrainStep`, bf16 autocast, channels_last).
On a GPU and on the CPU, batches come from a decoded uint8 cache augmented on the device
(``reid_tune.gpu_data``) whenever it fits ``cache_limit_gib``: no JPEG is decoded per step, so a GPU
loop neither waits for the host nor needs more than one CPU core, and a CPU loop leaves every core to
the step. The eager step and the DataLoader path remain behind ``cuda_graph`` and ``data_path``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
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
from reid_tune.gpu_data import DeviceBatches, resolve_data_path
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
    """``auto`` is the GPU when there is one, else the CPU; a bare ``cuda`` is the current GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # Ray Train and torchrun select each worker's own
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


BatchSource = Callable[[int], Iterator[Any]]  # start step -> (step, images, labels) up to the last step


def open_batches(dataset: ReidDataset, cfg: TrainConfig, device: torch.device, *, rank: int = 0,
                 world_size: int = 1) -> BatchSource:
    """The run's data path (see ``TrainConfig.data_path``): decoded cache on the device, or a DataLoader."""
    if resolve_data_path(cfg, len(dataset)) == "device":
        return DeviceBatches.from_dataset(dataset, cfg, device, rank=rank, world_size=world_size).stream
    batches = PKBatches(dataset, cfg, rank=rank, world_size=world_size)
    return functools.partial(batch_stream, batches, num_workers=cfg.num_workers, pin=device.type == "cuda")


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

    ``model`` is the plain network (what checkpoints hold); ``net`` is what runs it: DDP when
    distributed, compiled when asked.
    """

    def __init__(self, model: ReidModel, loss_fn: TripletLoss, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, bf16: bool, channels_last: bool, compile: bool = False) -> None:
        self.model, self.net, self.loss_fn, self.optimizer = model, model, loss_fn, optimizer
        self.device, self.bf16, self.channels_last, self.compile = device, bf16, channels_last, compile

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of image batches the network gets."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def distribute(self) -> None:
        """Make ``net``: data-parallel across the initialised process group (if any), compiled if asked.

        Call once, after loading weights.
        """
        net = wrap_model(self.model, self.device)
        self.net = torch.compile(net) if self.compile else net

    def load_state(self, state: dict[str, Any]) -> None:
        """Weights and Adam state of a checkpoint; this step's optimizer options (lr tensor, fused...) stay."""
        self.model.load_state_dict(state["model"])
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, options):
            group.update(kept)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step; a tensor lr is filled in place (no host sync, graph-safe)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of the (global) batch and its gradients in ``.grad``; mining spans every worker's share."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        # no autocast weight cache: CUDA graph capture requires it, and each weight is cast once anyway
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            embeddings = self.net(images)
        embeddings, labels = gather_batch(embeddings.float(), labels)
        loss, stats = self.loss_fn(embeddings, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, stats

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward_backward`, then the optimizer step at the current learning rate."""
        _, stats = self.forward_backward(images, labels)
        self.optimizer.step()
        return stats

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        self.set_lr(lr)
        return self.update(images, labels)


class GraphedTrainStep(TrainStep):
    """:class:`TrainStep` replayed as one CUDA graph: forward, loss, backward and Adam in a single launch.

    At P=18 K=4 an eager step is launch-bound; a replay is not. The first call warms up on a side
    stream (cuDNN autotuning, lazy allocations, Adam's state), rolls those steps back, and captures
    one step reading static batch buffers; Adam is capturable with its lr a device tensor, so the
    schedule needs no re-capture. The returned statistics are static tensors, overwritten by every call.
    """

    WARMUP_STEPS = 3  # eager steps before capture, as PyTorch's whole-network capture example

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        if self.graph is None:
            self._capture(images, labels)
        self.set_lr(lr)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_stats

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Static buffers shaped like this batch, warm-up (rolled back), then the capture of one update."""
        self.static_images = torch.empty(images.shape, device=self.device, memory_format=self.memory_format)
        self.static_labels = torch.empty(labels.shape, dtype=labels.dtype, device=self.device)
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        with rolled_back(self.model, self.optimizer), warnings.catch_warnings():
            # Adam says capturable=True is slow outside a graph; the warm-up must run outside one
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_STEPS):
                    self.update(self.static_images, self.static_labels)
            torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_stats = self.update(self.static_images, self.static_labels)


@contextlib.contextmanager
def rolled_back(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo the block's training steps in place: weights, buffers and optimizer state as before.

    State the block created (Adam's first moments and step count) is zeroed, which is Adam's fresh state.
    Tensors keep their storage, so a graph captured afterwards sees the restored values.
    """
    weights = [t.clone() for t in model.state_dict().values()]
    moments = {p: {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}
    yield
    with torch.no_grad():
        for tensor, saved in zip(model.state_dict().values(), weights):
            tensor.copy_(saved)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if param in moments:
                    value.copy_(moments[param][key])
                else:
                    value.zero_()


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``fp32``, ``tf32`` or ``bf16``: ``auto`` is bf16 autocast on a GPU, exact fp32 elsewhere."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def use_cuda_graph(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the step runs as a CUDA graph: ``None`` means on a GPU with one worker (DDP stays eager)."""
    world = rank_and_world()[1]
    if cfg.cuda_graph is None:
        return device.type == "cuda" and world == 1
    if cfg.cuda_graph and device.type != "cuda":
        raise ReidTuneError(f"cuda_graph=True: needs a CUDA device, not device={cfg.device!r}")
    if cfg.cuda_graph and world > 1:
        raise ReidTuneError(f"cuda_graph=True: runs with one worker only, not {world}; use cuda_graph=null")
    return cfg.cuda_graph


def _configure_gpu(device: torch.device, precision: str) -> None:
    """Process-wide GPU settings: ``device`` current, cuDNN autotuning, TF32 only when asked.

    Graphs capture and replay on the current device; shapes never change, so autotuning pays once;
    fp32 stays exact fp32 (under bf16 autocast TF32 would only touch the few ops left in fp32).
    """
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def _adam(model: ReidModel, cfg: TrainConfig, device: torch.device, *, graphed: bool) -> torch.optim.Adam:
    """triplet-reid's Adam; on a GPU fused, with a device-tensor lr, capturable when graphed."""
    if device.type != "cuda":
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    lr = torch.tensor(cfg.learning_rate, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=graphed)


def build_step(cfg: TrainConfig, device: torch.device) -> TrainStep:
    """Seeded model, loss and Adam for ``cfg`` on ``device``, graphed or eager (see ``cfg.cuda_graph``)."""
    graphed = use_cuda_graph(cfg, device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.network, cfg.head, embedding_dim=cfg.embedding_dim, pretrained=cfg.pretrained)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loss_fn = TripletLoss(margin=cfg.margin, metric=cfg.metric, mining=cfg.loss, precision_k=cfg.batch_k - 1)
    precision = resolve_precision(cfg, device)
    if on_gpu:
        _configure_gpu(device, precision)
    kind = GraphedTrainStep if graphed else TrainStep
    return kind(model, loss_fn, _adam(model, cfg, device, graphed=graphed), device=device,
                bf16=precision == "bf16", channels_last=channels_last, compile=cfg.compile)


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
    batches = open_batches(dataset, cfg, device, rank=rank, world_size=world)
    if not resume and rank == 0:  # written only once the options and the data passed every check
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
    start, last = _restore(step_fn, run_dir, device) if resume else (0, None)
    step_fn.distribute()
    return _loop(cfg, run_dir, step_fn, batches(start), start, last, callback or TrainCallback(),
                 progress=progress and rank == 0, main=rank == 0)


def _restore(step_fn: TrainStep, run_dir: Path, device: torch.device) -> tuple[int, Path | None]:
    """Weights and Adam state from the newest checkpoint (architecture and options came from the folder)."""
    if not list_checkpoints(run_dir):
        return 0, None
    last = find_checkpoint(run_dir)
    state = torch.load(last, map_location=device, weights_only=True)
    step_fn.load_state(state)
    return state["step"], last


def _loop(cfg: TrainConfig, run_dir: Path, step_fn: TrainStep, stream: Iterator[Any], start: int,
          last: Path | None, callback: TrainCallback, *, progress: bool, main: bool) -> TrainResult:
    """Steps ``start`` .. ``train_iterations``: step, log, checkpoint, stop."""
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
                metrics = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # waits for the GPU
                now = time.perf_counter()
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

