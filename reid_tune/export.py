"""Exporting a trained embedding network for deployment, as triplet-reid's freeze.py does for TensorFlow:
ONNX (for ONNX Runtime, TensorRT, OpenVINO) or TorchScript (for libtorch and TorchServe).

Only the network that embeds is exported, in eval mode: BoT's BNNeck is part of it (retrieval uses the
feature after it), the classifier and centers of the identity losses are not. The batch size is dynamic;
the input size and preprocessing go into the file's metadata (every value JSON), so another runtime can
feed it. A file is written only when it embeds like the PyTorch network (:data:`PARITY_TOLERANCE`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import reid_tune
from reid_tune.atomic import atomic_path
from reid_tune.augmentation import Preprocessing
from reid_tune.checkpoints import checkpoint_step, load_model
from reid_tune.config import TrainConfig
from reid_tune.datasets import load_csv, load_image
from reid_tune.errors import ConfigError, InputError, ReidTuneError
from reid_tune.models import ReidModel, model_args
from reid_tune.synthetic import person_images
from reid_tune.vocabulary import EXPORT_FORMATS, choose, one_line

PARITY_TOLERANCE = 1e-4  # max |exported - PyTorch| over the check's embeddings
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
METADATA_FILE = "reid_tune.json"  # TorchScript: the metadata, an extra file of the archive
_EXAMPLE_BATCH = 2  # the batch the network is traced with (1 would fix the batch size at 1)
_RUNTIMES = {"onnx": "ONNX Runtime", "torchscript": "TorchScript"}
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}
_NEEDED_METADATA = ("input_size", "pre_crop_size", "input_name", "output_name")  # to embed with a file


def export_metadata(model: ReidModel, cfg: TrainConfig, *, source: str, step: int | None) -> dict[str, Any]:
    """What a deployment needs to know, as JSON values: the input and its preprocessing, the output and
    how to compare it, the architecture and where the weights come from."""
    return {
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "batch_size": "dynamic",
        **Preprocessing.of(cfg).describe(),
        "output_name": OUTPUT_NAME,
        **model_args(model),
        "metric": cfg.metric,
        "source": source,
        "step": step,
        "reid_tune_version": reid_tune.__version__,
    }


# --- writing ---------------------------------------------------------------------------------------


def _write_onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path) -> None:
    """torch.export's ONNX program of ``model`` (batch dimension dynamic), with ``metadata`` as the
    model's metadata_props."""
    import onnx

    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )  # fmt: skip
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    proto.doc_string = "reid-tune person re-identification embedder: images -> embeddings"
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _torchscript() -> Iterator[None]:
    """TorchScript without PyTorch's deprecation warnings: deprecated upstream, yet what libtorch and
    TorchServe load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def _write_torchscript(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path) -> None:
    """``model`` traced (no data-dependent branches in eval mode), saved with ``metadata`` as JSON."""
    with _torchscript():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript}  # vocabulary.EXPORT_FORMATS


def check_output(out: Path) -> None:
    """Fail before any work when ``out`` cannot be written: a folder, or below a file or a read-only
    folder."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: is a folder, expected the path of the file to write")
    existing = next(folder for folder in out.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise InputError(f"{out}: {existing} is a file, expected a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"{out}: {existing} is not writable")


# --- loading ---------------------------------------------------------------------------------------


class ExportedModel(nn.Module):
    """An exported embedding network ready to run: images (B, 3, H, W) float32 -> embeddings (B, E),
    with the metadata written at export (:func:`export_metadata`)."""

    format: str
    metadata: dict[str, Any]

    def preprocessing(self) -> Preprocessing:
        """The preprocessing its metadata records."""
        return Preprocessing(tuple(self.metadata["input_size"]), tuple(self.metadata["pre_crop_size"]))


class OnnxModel(ExportedModel):
    """An ONNX file run by ONNX Runtime (on its CPU, or CUDA when ``providers`` ask for it)."""

    format = "onnx"

    def __init__(self, path: Path, *, providers: list[str] | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no notes on the providers it did not use
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # ONNX Runtime raises its own types for a file that is no ONNX model
            raise InputError(f"{path}: not an ONNX model ({one_line(err)})") from None
        props = self.session.get_modelmeta().custom_metadata_map  # key -> a JSON text each
        self.metadata = _checked(path, lambda: {key: json.loads(value) for key, value in props.items()})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = {INPUT_NAME: images.detach().to("cpu", torch.float32).numpy()}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], inputs)[0])


class TorchScriptModel(ExportedModel):
    """A TorchScript archive loaded by ``torch.jit.load``, as a libtorch service would."""

    format = "torchscript"

    def __init__(self, path: Path, *, device: str | torch.device = "cpu") -> None:
        super().__init__()
        extra = {METADATA_FILE: ""}
        try:
            with _torchscript():
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except (RuntimeError, ValueError) as err:
            raise InputError(f"{path}: not a TorchScript archive ({one_line(err)})") from None
        self.metadata = _checked(path, lambda: json.loads(extra[METADATA_FILE] or "{}"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def _checked(path: Path, decode: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A file's metadata, as ``decode`` reads its JSON; a file without reid-tune's is an error naming what
    it lacks."""
    try:
        metadata = decode()
    except json.JSONDecodeError:
        metadata = {}
    missing = [key for key in _NEEDED_METADATA if key not in metadata]
    if missing:
        raise InputError(f"{path}: no {missing[0]} in its metadata, expected a file of reid-tune export")
    return metadata


def onnx_providers(device: str | torch.device) -> list[str]:
    """ONNX Runtime's providers for ``device``: CUDA first on a GPU when this ONNX Runtime has it."""
    import onnxruntime

    cuda = torch.device(device).type == "cuda"
    if cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_exported(path: str | Path, fmt: str, *, device: str | torch.device = "cpu") -> ExportedModel:
    """The exported file ``path`` of format ``fmt``, ready to embed on ``device``."""
    choose("format", fmt, EXPORT_FORMATS)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file, expected an exported {fmt} model")
    if fmt == "onnx":
        return OnnxModel(path, providers=onnx_providers(device))
    return TorchScriptModel(path, device=device)


# --- parity ----------------------------------------------------------------------------------------


def parity_images(
    prep: Preprocessing, *, dataset: Path | None = None, image_root: Path | None = None, count: int = 16
) -> tuple[torch.Tensor, str]:
    """Up to ``count`` preprocessed images to compare on (N, 3, H, W): the first of ``dataset``'s list, or
    generated persons; and where they come from, in words."""
    if count < 1:
        raise ConfigError(f"parity images={count}: expected at least 1")
    if dataset is None:
        images, where = person_images(count, prep.input_size), f"{count} generated person images"
    else:
        root = Path(image_root) if image_root is not None else Path(dataset).parent
        fids = load_csv(dataset).fids[:count]
        images, where = [load_image(root / fid) for fid in fids], f"{len(fids)} images of {dataset}"
    return torch.cat([prep.views(image) for image in images]), where


@torch.no_grad()
def parity(model: nn.Module, exported: nn.Module, images: torch.Tensor) -> float:
    """The largest |exported - model| over the embeddings of ``images``, run as one batch and the first
    image alone (the batch size is dynamic)."""
    expected = model(images)
    whole, single = exported(images), exported(images[:1])
    if whole.shape != expected.shape:
        raise ReidTuneError(f"exported model: output {tuple(whole.shape)}, expected {tuple(expected.shape)}")
    return max((whole - expected).abs().max().item(), (single - expected[:1]).abs().max().item())


# --- export ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """A written export: its file, format, metadata, and how it compared with PyTorch."""

    path: Path
    format: str
    metadata: dict[str, Any]
    parity: float
    checked_on: str
    size_bytes: int

    def summary(self) -> str:
        """What was written, what it takes and gives, and its parity, a line each."""
        m = self.metadata
        height, width = m["input_size"]
        neck = " + BNNeck" if m["bnneck"] else ""
        step = f", iteration {m['step']}" if m["step"] is not None else ""
        lines = {
            "wrote": f"{self.path} ({self.format}, {self.size_bytes / 2**20:.1f} MiB)",
            "network": f"{m['network']} + {m['head']}{neck}, from {m['source']}{step}",
            "input": f"{m['input_name']}: {m['input_dtype']} {m['input_layout']} "
            f"[batch, 3, {height}, {width}], batch size {m['batch_size']}",
            "preprocess": f"{m['channel_order']}, {m['resize']} resize to {height}x{width}, "
            f"/ {1 / m['pixel_scale']:g}, mean {_numbers(m['mean'])}, std {_numbers(m['std'])}",
            "output": f"{m['output_name']}: float32 [batch, {m['embedding_dim']}], compared by {m['metric']}",
            "parity": f"max |{_RUNTIMES[self.format]} - PyTorch| = {self.parity:.1e} on {self.checked_on} "
            f"(one batch, and one image alone), within {PARITY_TOLERANCE:g}",
        }
        return "\n".join(f"{label:<11}{text}" for label, text in lines.items())


def _numbers(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def format_of(out: Path) -> str:
    """The export format an output file's suffix names: .onnx, or .pt/.pth/.ts (TorchScript)."""
    suffix = Path(out).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ConfigError(f"--out {out}: no --format given and the suffix is not one of "
                          f"{', '.join(_SUFFIXES)}, expected --format {' or '.join(EXPORT_FORMATS)}")
    return _SUFFIXES[suffix]


def export_checkpoint(
    checkpoint: Path,
    out: str | Path,
    *,
    fmt: str,
    source: str | None = None,
    dataset: Path | None = None,
    image_root: Path | None = None,
    count: int = 16,
) -> Export:
    """:func:`export_model` of a checkpoint file's network, checked on ``count`` images of ``dataset``
    (else generated persons); ``source`` names where the file came from (default: its path)."""
    model, cfg = load_model(checkpoint)
    images, where = parity_images(Preprocessing.of(cfg), dataset=dataset, image_root=image_root, count=count)
    return export_model(model, cfg, out, fmt=fmt, source=source or str(checkpoint),
                        step=checkpoint_step(checkpoint), images=images, checked_on=where)


def export_model(
    model: ReidModel,
    cfg: TrainConfig,
    out: str | Path,
    *,
    fmt: str,
    source: str,
    step: int | None = None,
    images: torch.Tensor,
    checked_on: str = "the given images",
) -> Export:
    """Write ``model`` (on the CPU, eval mode) to ``out`` as ``fmt`` with its metadata, then load the file
    and compare it with ``model`` on ``images``; nothing is written unless they agree."""
    choose("format", fmt, EXPORT_FORMATS)
    out = Path(out)
    check_output(out)
    model = model.to("cpu").eval()
    metadata = export_metadata(model, cfg, source=source, step=step)
    with atomic_path(out) as temp:
        _WRITERS[fmt](model, images[:1].repeat(_EXAMPLE_BATCH, 1, 1, 1), metadata, temp)
        difference = parity(model, load_exported(temp, fmt), images)
        if not difference <= PARITY_TOLERANCE:
            raise ReidTuneError(
                f"{out}: the {fmt} export embeds {difference:.1e} away from PyTorch, expected at most "
                f"{PARITY_TOLERANCE:g}; nothing written"
            )
        size = temp.stat().st_size
    return Export(out, fmt, metadata, difference, checked_on, size)
