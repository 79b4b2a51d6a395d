"""Training speed: images/s of one trial by precision, batch size and step kind, of trials sharing a device,
and of the two data paths.

    python benchmarks/bench_train.py                # one GPU, TriNet at 256x128: meant to take ~6 min on an H200
    python benchmarks/bench_train.py --smoke        # a tiny network on the CPU, under a minute (CI)
    python benchmarks/bench_train.py --only share --processes 1,2,4,6 --share-batch 18x4
    python benchmarks/bench_train.py --device cpu --network lunet_small --input 128x64 \
        --share-precision fp32 --only paths --seconds 30    # the data paths against the bare step on a CPU

Needs PyTorch, torchvision, numpy and pillow only (no Ray, no MLflow) and runs from a checkout. A trial
is ``reid_tune.steps.build_step``'s step (CUDA graph or eager) fed a synthetic batch already on the
device; each runs in its own process, so N trials are N processes sharing the device, timed over the
same window after warm-up (graph capture, cuDNN autotuning). "CPU cores" is a process's CPU time over
wall time in that window. The data table, on synthetic 128x64 JPEGs, times the one-time cache build,
one batch of the device path (``DeviceBatches.batch``) against the CPU path's decoding and augmentation
on one core (``PKBatches``). The paths table times the share configuration's whole step in this process,
fed three ways in turn for ``--rounds`` rounds (each feed's median round is shown): the bare step on a
synthetic batch already on the device, the step fed by the decoded-cache path (``DeviceBatches``), and
by the DataLoader path (``num_workers`` decoding processes, whose CPU time "CPU cores" leaves out), each
also as a share of the bare step. A configuration that runs out of memory is reported as OOM; any other
failure is reported in its row and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's reid_tune, uninstalled

from reid_tune.config import TrainConfig  # noqa: E402
from reid_tune.datasets import ReidDataset  # noqa: E402
from reid_tune.devices import resolve_device  # noqa: E402
from reid_tune.gpu_data import DeviceBatches, cache_image_size, decode_cache  # noqa: E402
from reid_tune.steps import build_step  # noqa: E402
from reid_tune.training_data import BatchSource, PKBatches, open_batches  # noqa: E402

CHUNK = 10  # calls between device synchronisations while timing
TRIAL_TIMEOUT_S = 600  # a trial process that has not reported by then counts as hung
TABLES = ("steps", "share", "data", "paths")


@dataclass(frozen=True)
class Timing:
    """Throughput of one timed window."""

    images_per_s: float
    ms_per_call: float
    cpu_cores: float


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], images_per_call: int, seconds: float, device: torch.device) -> Timing:
    """Call ``call`` in chunks until ``seconds`` have passed, each chunk ending with a device sync."""
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(CHUNK):
            call()
        calls += CHUNK
        _sync(device)
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    return Timing(calls * images_per_call / wall, 1000 * wall / calls, (time.process_time() - cpu0) / wall)


Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (images, labels)


def synthetic_batch(cfg: TrainConfig, device: torch.device, memory_format: torch.memory_format) -> Batch:
    """One random PK batch already on the device, in the network's layout, returned for every step."""
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, *cfg.input_size, generator=gen, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.arange(cfg.batch_p, device=device).repeat_interleave(cfg.batch_k)
    return lambda _step: (images, labels)


def time_steps(cfg: TrainConfig, *, seconds: float, warmup: int, batch: Batch | None = None,
               barrier: multiprocessing.synchronize.Barrier | None = None) -> Timing:
    """Images/s of ``cfg``'s training step on ``batch(step)`` (default: :func:`synthetic_batch`)."""
    device = resolve_device(cfg.device)
    step = build_step(cfg, device)
    step.distribute()
    batch = batch or synthetic_batch(cfg, device, step.memory_format)
    steps = itertools.count()

    def call() -> None:
        step(*batch(next(steps)), cfg.learning_rate)

    for _ in range(warmup):
        call()
    _sync(device)
    if barrier is not None:
        barrier.wait()  # every trial's window starts together
    return timed(call, cfg.batch_size, seconds, device)


def _trial(cfg: TrainConfig, seconds: float, warmup: int, threads: int,
           barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    """One trial process: report ('ok', Timing), ('OOM', text) or ('error', text)."""
    torch.set_num_threads(threads)
    try:
        results.put(("ok", time_steps(cfg, seconds=seconds, warmup=warmup, barrier=barrier)))
    except torch.cuda.OutOfMemoryError:
        barrier.abort()
        results.put(("OOM", "out of memory"))
    except Exception as err:  # noqa: BLE001 - reported in the table; the others must not wait forever
        barrier.abort()
        results.put(("error", f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"))


def run_trials(cfg: TrainConfig, count: int, *, seconds: float, warmup: int) -> list[tuple[str, object]]:
    """``count`` trial processes sharing the device, timed together; one (status, Timing or text) each."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(count), spawn.Queue()
    threads = max(1, (os.cpu_count() or 1) // count) if cfg.device == "cpu" else 1
    trials = [spawn.Process(target=_trial, args=(cfg, seconds, warmup, threads, barrier, results))
              for _ in range(count)]
    for trial in trials:
        trial.start()
    reports = []
    for _ in trials:
        try:
            reports.append(results.get(timeout=TRIAL_TIMEOUT_S))
        except queue.Empty:  # a trial died without a word, or hangs
            barrier.abort()
            reports.append(("error", "no report (the process crashed or hung)"))
    for trial in trials:
        trial.join(timeout=30)
        if trial.is_alive():
            trial.kill()
    return reports


# ---------------------------------------------------------------- the three tables


def step_config(args: argparse.Namespace, precision: str, batch: tuple[int, int], graph: bool) -> TrainConfig:
    """A training config of this benchmark's network and input size (the pre-crop size is 9/8 of it)."""
    height, width = args.input
    return TrainConfig(network=args.network, batch_p=batch[0], batch_k=batch[1], input_height=height,
                       input_width=width, pre_crop_height=height * 9 // 8, pre_crop_width=width * 9 // 8,
                       precision=precision, device=args.device, cuda_graph=graph, compile=args.compile)


def _timing_cells(reports: Sequence[tuple[str, object]]) -> tuple[list[str], bool]:
    """(images/s, ms/step, CPU cores) summed over trials, or the failure; and whether something failed."""
    failures = [text for status, text in reports if status != "ok"]
    if failures:
        return [failures[0], "", ""], any(status == "error" for status, _ in reports)
    timings = [t for _, t in reports]
    each = " + ".join(f"{t.images_per_s:,.0f}" for t in timings)
    per_trial = f" ({each})" if len(timings) > 1 else ""
    return [f"{sum(t.images_per_s for t in timings):,.0f}{per_trial}",
            f"{np.mean([t.ms_per_call for t in timings]):.1f}",
            f"{sum(t.cpu_cores for t in timings):.2f}"], False


def step_table(args: argparse.Namespace) -> tuple[list[list[str]], bool]:
    """One trial per configuration: precision x batch x step kind."""
    rows, failed = [], False
    for precision, batch, graph in itertools.product(args.precisions, args.batches, args.graph_modes):
        cfg = step_config(args, precision, batch, graph)
        cells, bad = _timing_cells(run_trials(cfg, 1, seconds=args.seconds, warmup=args.warmup))
        rows.append([precision, f"{batch[0]}x{batch[1]}", "graph" if graph else "eager", *cells])
        failed |= bad
    return rows, failed


def share_table(args: argparse.Namespace) -> tuple[list[list[str]], bool]:
    """1, 2, 4 ... trials of one configuration sharing the device: the sum of their images/s."""
    cfg = step_config(args, args.share_precision, args.share_batch, args.graph_modes[0])
    rows, failed = [], False
    for count in args.processes:
        cells, bad = _timing_cells(run_trials(cfg, count, seconds=args.seconds, warmup=args.warmup))
        rows.append([str(count), *cells])
        failed |= bad
    return rows, failed


def synthetic_jpegs(folder: Path, count: int, *, per_id: int = 8) -> ReidDataset:
    """``count`` Market-sized (128x64) JPEGs of smooth random colour fields, ``per_id`` per identity."""
    rng = np.random.default_rng(0)
    fids = [f"{i // per_id:04d}_{i % per_id}.jpg" for i in range(count)]
    for fid in fids:
        coarse = Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8))
        coarse.resize((64, 128), Image.Resampling.BICUBIC).save(folder / fid, quality=90)
    return ReidDataset(np.array([fid[:4] for fid in fids]), np.array(fids), "synthetic")


@contextlib.contextmanager
def jpeg_trial(args: argparse.Namespace) -> Iterator[tuple[ReidDataset, TrainConfig]]:
    """``--data-images`` synthetic JPEGs in a temporary folder, and the share configuration training on them."""
    trial = step_config(args, args.share_precision, args.share_batch, args.graph_modes[0])
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        dataset = synthetic_jpegs(Path(folder), args.data_images)
        yield dataset, trial.replace(image_root=folder, cache_dir=f"{folder}/cache", num_workers=args.num_workers)


def data_table(args: argparse.Namespace) -> list[list[str]]:
    """The one-time cache build, a device-path batch and a CPU-path batch on one core."""
    device = resolve_device(args.device)
    with jpeg_trial(args) as (dataset, cfg):
        rows = [_cache_build_row(dataset, cfg)]
        placements = [(f"on {device}", 0.0)] + ([("in host memory", 1e9)] if device.type == "cuda" else [])
        for where, headroom in placements:
            batches = DeviceBatches.from_dataset(dataset, cfg.replace(cache_headroom_gib=headroom), device)
            steps = itertools.count()
            timing = timed(lambda: batches.batch(next(steps)), cfg.batch_size, args.seconds / 2, device)
            rows.append([f"device path: DeviceBatches.batch, cache {where}", str(device), *_cells(timing)])
        rows.append(_cpu_path_row(dataset, cfg, args.seconds / 2))
    return rows


def paths_table(args: argparse.Namespace) -> list[list[str]]:
    """The whole step on a synthetic batch (bare), fed by the decoded cache, and fed by the DataLoader.

    ``--rounds`` rounds each time the three in turn, and each feed's median round is reported, so a load
    that comes and goes on a shared machine hits the three alike. A feed is opened for its window only:
    DataLoader workers never run in another feed's window.
    """
    device = resolve_device(args.device)
    feeds = {f"bare step: a synthetic batch on {device}": None, "decoded-cache path: DeviceBatches": "device",
             f"DataLoader path: JPEGs, {args.num_workers} workers": "cpu"}
    timings: dict[str, list[Timing]] = {name: [] for name in feeds}
    with jpeg_trial(args) as (dataset, cfg):
        for _, (name, data_path) in itertools.product(range(args.rounds), feeds.items()):
            batch = _fed(open_batches(dataset, cfg.replace(data_path=data_path), device)) if data_path else None
            window = args.seconds / args.rounds
            timings[name].append(time_steps(cfg, seconds=window, warmup=args.warmup, batch=batch))
            del batch  # stops the DataLoader's workers
    medians = {name: sorted(rounds, key=lambda t: t.images_per_s)[len(rounds) // 2]
               for name, rounds in timings.items()}
    bare = next(iter(medians.values())).images_per_s
    return [[name, f"{t.images_per_s:,.0f}", f"{t.images_per_s / bare:.0%}", f"{t.ms_per_call:.1f}",
             f"{t.cpu_cores:.2f}"] for name, t in medians.items()]


def _fed(source: BatchSource) -> Batch:
    """The batches of ``source`` in step order from step 0, one per call."""
    stream = source(0)
    return lambda _step: next(stream)[1:]


def _cache_build_row(dataset: ReidDataset, cfg: TrainConfig) -> list[str]:
    """Images/s of decoding and resizing the whole set once, with every available core."""
    started = time.perf_counter()
    decode_cache(dataset.fids, cfg.image_root, cache_image_size(cfg), cache_dir=cfg.cache_dir)
    rate = len(dataset) / (time.perf_counter() - started)
    cores = len(os.sched_getaffinity(0))
    return ["cache build, once (PIL decode + resize)", f"{cores} threads", f"{rate:,.0f}", "", ""]


def _cpu_path_row(dataset: ReidDataset, cfg: TrainConfig, seconds: float) -> list[str]:
    """Images/s of the DataLoader path's work (decode, resize, augment) in one thread, as one worker does."""
    batches, steps = PKBatches(dataset, cfg), itertools.count()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = timed(lambda: batches[next(steps)], cfg.batch_size, seconds, torch.device("cpu"))
    finally:
        torch.set_num_threads(torch_threads)
    return ["cpu path: PKBatches (decode + augment)", "1 core", *_cells(timing)]


def _cells(timing: Timing) -> list[str]:
    return [f"{timing.images_per_s:,.0f}", f"{timing.ms_per_call:.2f}", f"{timing.cpu_cores:.2f}"]


# ---------------------------------------------------------------- output


def hardware(device: torch.device) -> str:
    """The accelerator (or CPU model), core count and library versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"device {device}: {name}; CPU: {cpu}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    for i, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- command line


def _pair(text: str) -> tuple[int, int]:
    """``18x4`` (P x K) or ``256x128`` (H x W) as two ints."""
    first, second = text.lower().split("x")
    return int(first), int(second)


def _list(kind: Callable[[str], object]) -> Callable[[str], list]:
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options; ``--smoke`` replaces the sizes by tiny ones on the CPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--network", default="resnet50")
    parser.add_argument("--input", type=_pair, default=(256, 128), help="network input HxW")
    parser.add_argument("--precisions", type=_list(str), default=["fp32", "tf32", "bf16"])
    parser.add_argument("--batches", type=_list(_pair), default=[(18, 4), (64, 4)], help="PxK,...")
    parser.add_argument("--graph", choices=["on", "off", "both"], help="step kinds (default: both on a GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--processes", type=_list(int), default=[1, 2, 4], help="trials sharing the device")
    parser.add_argument("--share-batch", type=_pair, default=(18, 4))
    parser.add_argument("--share-precision", default="bf16")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed window per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--data-images", type=int, default=4096, help="synthetic JPEGs for the data tables")
    parser.add_argument("--num-workers", type=int, default=TrainConfig.num_workers,
                        help="decoding processes of the DataLoader path (paths table)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the paths table (median reported)")
    parser.add_argument("--only", type=_list(str), default=list(TABLES), help="tables to print")
    parser.add_argument("--smoke", action="store_true", help="lunet_small, 64x32, P=4 K=2, 2 trials, CPU")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(TABLES)
    if unknown:
        parser.error(f"--only {','.join(sorted(unknown))}: choose from {','.join(TABLES)}")
    if args.smoke:
        args.device, args.network, args.input, args.precisions = "cpu", "lunet_small", (64, 32), ["fp32"]
        args.batches, args.share_batch, args.share_precision = [(4, 2)], (4, 2), "fp32"
        args.processes, args.seconds, args.warmup, args.data_images, args.rounds = [2], 0.5, 2, 64, 1
    on_gpu = resolve_device(args.device).type == "cuda"
    graph = args.graph or ("both" if on_gpu else "off")
    args.graph_modes = {"on": [True], "off": [False], "both": [True, False]}[graph]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(hardware(device))
    print(f"{args.network} at {args.input[0]}x{args.input[1]}, {args.seconds:g} s per configuration"
          f"{', compiled' if args.compile else ''}")
    failed = False
    timing_header = ["images/s", "ms/step", "CPU cores"]
    p, k = args.share_batch
    share = f"{args.share_precision}, {p}x{k}, {'graph' if args.graph_modes[0] else 'eager'}"
    if "steps" in args.only:
        rows, bad = step_table(args)
        print_table("One trial (synthetic batches on the device)",
                    ["precision", "PxK", "step", *timing_header], rows)
        failed |= bad
    if "share" in args.only:
        rows, bad = share_table(args)
        print_table(f"Trials sharing {device} ({share}): images/s summed", ["trials", *timing_header], rows)
        failed |= bad
    if "data" in args.only:
        print_table(f"Data paths ({p}x{k} batches, synthetic 128x64 JPEGs)",
                    ["per call", "on", "images/s", "ms/call", "CPU cores"], data_table(args))
    if "paths" in args.only:
        print_table(f"Whole steps by data path ({share}, synthetic 128x64 JPEGs)",
                    ["step fed by", "images/s", "of bare", *timing_header[1:]], paths_table(args))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
