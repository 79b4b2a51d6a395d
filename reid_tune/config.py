"""Training configuration: one frozen dataclass, defaults = the paper's Market-1501 settings, validated on load."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from reid_tune.atomic import write_text
from reid_tune.errors import ConfigError, InputError
from reid_tune.vocabulary import (
    DATA_PATHS,
    LOSSES,
    METRICS,
    PRECISIONS,
    SCHEDULES,
    choose,
    is_int,
    is_number,
    parse_margin,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (Hermans et al. 2017, Sec. 4 and triplet-reid's train.py)."""

    # data
    train_set: str = ""  # triplet-reid CSV: pid,relative/path
    image_root: str = ""  # the CSV's paths are relative to this folder
    # network
    network: str = "resnet50"  # see reid_tune.models.list_networks()
    head: str = "fc1024"  # fc1024, direct, and their _normalize variants
    embedding_dim: int = 128
    pretrained: str | None = None  # None, "imagenet", a torchvision weights name, or a local .pth file
    # PK batches: P identities x K images each
    batch_p: int = 18
    batch_k: int = 4
    # input: resize to pre_crop, then a random crop of input size (pixels, H x W)
    input_height: int = 256
    input_width: int = 128
    pre_crop_height: int = 288
    pre_crop_width: int = 144
    crop_augment: bool = True  # False resizes straight to the input size
    flip_augment: bool = True
    # loss
    loss: str = "batch_hard"  # or batch_all
    margin: float | str = "soft"  # a float (hinge), "soft" (softplus) or "none"
    metric: str = "euclidean"  # euclidean, sqeuclidean, cityblock
    # optimisation: Adam; the schedule (SCHEDULES) decays the lr:
    #   exponential (triplet-reid): constant, then from decay_start_iteration down to lr * decay_factor
    #   multistep (BoT): times decay_factor at each milestone (fractions of train_iterations)
    #   cosine: constant, then a half cosine from decay_start_iteration down to lr * decay_factor
    learning_rate: float = 3e-4
    train_iterations: int = 25_000
    schedule: str = "exponential"
    decay_start_iteration: int = 15_000  # exponential, cosine; >= train_iterations: no decay
    decay_factor: float = 0.001
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep only (BoT: 40 and 70 of 120 epochs)
    warmup_iterations: int = 0  # linear warm-up from lr * warmup_factor (BoT: 10 epochs from 0.1)
    warmup_factor: float = 0.1
    weight_decay: float = 0.0  # Adam's L2 penalty (BoT: 5e-4)
    # Bag of Tricks (Luo et al. 2019), all off by default: the paper's recipe stays the default
    id_loss_weight: float = 0.0  # > 0: a classifier over the training identities, cross-entropy (BoT: 1)
    label_smoothing: float = 0.0  # epsilon of the ID loss (BoT: 0.1)
    bnneck: bool = False  # BatchNorm (no bias) after the embedding: triplet before, ID loss and retrieval after
    last_stride: int = 2  # 1: a ResNet's last stage keeps its resolution (BoT)
    random_erasing: float = 0.0  # probability a training image gets a random box of the mean (BoT: 0.5)
    center_loss_weight: float = 0.0  # center loss on the triplet feature (BoT: 0.0005)
    center_lr: float = 0.5  # the centers' own SGD learning rate (BoT)
    # bookkeeping
    checkpoint_frequency: int = 1_000  # iterations between checkpoints
    keep_checkpoints: int = 0  # 0 keeps every checkpoint, like triplet-reid
    log_every: int = 10  # iterations between logged statistics
    seed: int = 0
    # speed
    device: str = "auto"  # auto = cuda when available
    precision: str = "auto"  # auto = bf16 autocast on a GPU, exact fp32 on the CPU; tf32: TF32 on a GPU
    channels_last: bool | None = None  # None = on a GPU only
    num_workers: int = 2  # image decoding processes (the cpu data path)
    # data path: "cpu" decodes JPEGs every step in num_workers processes; "device" decodes the set once
    # into a uint8 cache and augments on the device, GPU or CPU (reid_tune.gpu_data); "auto": device
    # whenever the cache takes at most cache_limit_gib, else cpu
    data_path: str = "auto"
    cache_dir: str = ""  # node-local folder of decoded caches; "" = $REID_TUNE_CACHE or ~/.cache/reid-tune
    cache_limit_gib: float = 64.0  # the largest cache data_path=auto uses (GiB of uint8 pixels)
    cache_headroom_gib: float = 16.0  # GPU memory the cache must leave free, else it stays in host memory
    cuda_graph: bool | None = None  # the whole step as one CUDA graph; None = on a GPU with one worker
    compile: bool = False  # torch.compile the network

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "input_height", "input_width", "train_iterations",
                     "checkpoint_frequency", "log_every"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _require(self.batch_p >= 2, "batch_p", self.batch_p, ">= 2")
        _require(self.batch_k >= 2, "batch_k", self.batch_k, ">= 2 (batch-hard needs a positive)")
        _require(self.pre_crop_height >= self.input_height, "pre_crop_height", self.pre_crop_height,
                 f">= input_height={self.input_height}")
        _require(self.pre_crop_width >= self.input_width, "pre_crop_width", self.pre_crop_width,
                 f">= input_width={self.input_width}")
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _require(0 < self.decay_factor <= 1, "decay_factor", self.decay_factor, "in (0, 1]")
        choose("schedule", self.schedule, SCHEDULES)
        _require(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
                 "milestones", self.milestones, "increasing fractions of train_iterations in (0, 1)")
        _require(0 < self.warmup_factor <= 1, "warmup_factor", self.warmup_factor, "in (0, 1]")
        _require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        _require(0 <= self.random_erasing <= 1, "random_erasing", self.random_erasing, "in [0, 1]")
        _require(self.last_stride in (1, 2), "last_stride", self.last_stride, "1 or 2")
        for name in ("warmup_iterations", "weight_decay", "id_loss_weight", "center_loss_weight", "center_lr"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.decay_start_iteration >= 0, "decay_start_iteration", self.decay_start_iteration, ">= 0")
        for name in ("keep_checkpoints", "num_workers", "seed"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _require(self.loss in LOSSES, "loss", self.loss, f"one of {', '.join(LOSSES)}")
        _require(self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        _require(self.data_path in DATA_PATHS, "data_path", self.data_path, f"one of {', '.join(DATA_PATHS)}")
        for name in ("cache_limit_gib", "cache_headroom_gib"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        choose("metric", self.metric, METRICS)
        parse_margin(self.margin)

    @property
    def batch_size(self) -> int:
        """Images per step, P x K."""
        return self.batch_p * self.batch_k

    @property
    def input_size(self) -> tuple[int, int]:
        """Network input (H, W)."""
        return (self.input_height, self.input_width)

    @property
    def pre_crop_size(self) -> tuple[int, int]:
        """Resize target before cropping (H, W)."""
        return (self.pre_crop_height, self.pre_crop_width)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (type-checked like a loaded file)."""
        return config_from_dict({**self.to_dict(), **changes}, source="override")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every option."""
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write every option to ``path`` as JSON (atomically)."""
        write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a config written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: cannot read the stored options: {err}") from None
        return config_from_dict(data, source=str(path))


def _require(ok: bool, key: str, value: Any, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {expectation}")


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits the field's annotation (int for float is fine; bool is not an int)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - our own dataclass annotations
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return is_number(value)
    if annotation is int:
        return is_int(value)
    if typing.get_origin(annotation) is tuple:  # a tuple of numbers (a list in JSON and YAML)
        return isinstance(value, (list, tuple)) and all(is_number(v) for v in value)
    return isinstance(value, annotation)


def _coerced(annotation: str, value: Any) -> Any:
    """``value`` as its field stores it: an int given for a float is a float, a list a tuple of floats."""
    if annotation == "float" and isinstance(value, int):
        return float(value)
    if annotation.startswith("tuple") and isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return value


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a validated :class:`TrainConfig`; unknown keys and wrong types name ``source`` and the key."""
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(known))}")
        if not _accepts(known[key].type, value):
            raise ConfigError(f"{source}: {key}={value!r}: expected {known[key].type}")
    values = {k: _coerced(known[k].type, v) for k, v in data.items()}
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
