"""Embedding speed of an exported network: images/s at batch 64 for PyTorch eager, TorchScript and ONNX
Runtime, on the CPU and, when there is one, the GPU.

    python benchmarks/bench_embed.py            # resnet50 and lunet_small at 256x128 (~2 min on 2 cores)
    python benchmarks/bench_embed.py --smoke    # lunet_small at 64x32, batch 8 (seconds; CI)

Each network (random weights, fc1024 head, 128-d) is exported by ``reid_tune.export.export_model``
(parity-checked) and the three runtimes embed the same batch of generated person images, already
preprocessed: decoding and resizing JPEGs cost the same for every runtime and are left out. All run in
this process with the same number of CPU threads (torch's, given to ONNX Runtime as intra-op threads),
in fp32; each is warmed up, then timed for ``--seconds`` (at least ``--rounds`` batches) and reported as
images/s over the median batch time, with its ratio to eager PyTorch on the same device and its largest
difference from eager's embeddings. ONNX Runtime runs on a GPU only with the onnxruntime-gpu package (its
CUDAExecutionProvider); without it that row says so. Needs PyTorch, onnx and onnxruntime (no Ray, no
MLflow) and runs from a checkout.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's reid_tune, uninstalled

from reid_tune.augmentation import Preprocessing  # noqa: E402
from reid_tune.config import TrainConfig  # noqa: E402
from reid_tune.export import export_model, load_exported, parity_images  # noqa: E402
from reid_tune.models import create_model  # noqa: E402

Embedder = Callable[[torch.Tensor], torch.Tensor]


def _timed(embed: Embedder, images: torch.Tensor, *, seconds: float, rounds: int) -> float:
    """Median seconds per batch after two warm-up batches (CUDA work synchronised in each)."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(2):
            embed(images)
        sync()
        deadline = time.perf_counter() + seconds
        while len(times) < rounds or time.perf_counter() < deadline:
            start = time.perf_counter()
            embed(images)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _onnx_session(path: Path, device: str, threads: int) -> Embedder | str:
    """ONNX Runtime on ``device`` with ``threads`` intra-op threads, or why it cannot run there."""
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "n/a: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        providers = ["CUDAExecutionProvider", *providers]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.cpu().numpy()})[0])


def _rows(network: str, size: tuple[int, int], batch: int, device: str, args: argparse.Namespace,
          folder: Path) -> list[tuple[str, ...]]:
    """One row per runtime for ``network`` on ``device``."""
    cfg = TrainConfig(train_set="-", image_root="-", network=network, input_height=size[0],
                      input_width=size[1], pre_crop_height=size[0], pre_crop_width=size[1])
    torch.manual_seed(0)
    model = create_model(network, "fc1024", embedding_dim=128).eval()
    images, _ = parity_images(Preprocessing.of(cfg), count=batch)
    files = {fmt: folder / f"{network}.{fmt}" for fmt in ("onnx", "torchscript")}
    for fmt, path in files.items():
        if not path.exists():
            export_model(model, cfg, path, fmt=fmt, source="bench_embed", images=images[: min(batch, 8)])
    runtimes: dict[str, Embedder | str] = {
        "PyTorch eager": model.to(device),
        "TorchScript": load_exported(files["torchscript"], "torchscript", device=device),
        "ONNX Runtime": _onnx_session(files["onnx"], device, torch.get_num_threads()),
    }
    on_device = images.to(device)
    with torch.no_grad():
        expected = model(on_device).cpu()
    rows, eager = [], None
    for name, embed in runtimes.items():
        if isinstance(embed, str):
            rows.append((network, device, name, embed, "", ""))
            continue
        seconds = _timed(embed, on_device, seconds=args.seconds, rounds=args.rounds)
        eager = eager or seconds
        with torch.no_grad():
            difference = (embed(on_device).cpu() - expected).abs().max().item()
        rows.append((network, device, name, f"{batch / seconds:,.0f}", f"{eager / seconds:.2f}x",
                     f"{difference:.1e}"))
    return rows


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("network", "device", "runtime", "images/s", "vs eager", "max |diff|")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="lunet_small at 64x32, batch 8: seconds")
    parser.add_argument("--networks", default="resnet50,lunet_small", help="comma-separated network names")
    parser.add_argument("--input", default="256x128", help="input size HxW")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per runtime, at least")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per runtime, at least")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: the CPU, and the GPU when there is one")
    args = parser.parse_args()
    if args.smoke:
        args.networks, args.input, args.batch, args.seconds, args.rounds = "lunet_small", "64x32", 8, 0.2, 2
    size = tuple(int(v) for v in args.input.split("x"))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (PyTorch "
          f"and ONNX Runtime); GPU: {gpu}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"batch {args.batch}, input {size[0]}x{size[1]}, fp32, random weights, median batch time\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        for network in args.networks.split(","):
            for device in devices:
                rows += _rows(network, size, args.batch, device, args, Path(tmp))
    _print_table(rows)


if __name__ == "__main__":
    main()
