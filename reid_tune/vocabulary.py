"""The words reid-tune accepts, each defined once: the CLI, the config, the YAML schema and the modules
all read their choices from here, so a new metric or excluder is one line. Imports nothing heavy."""

from __future__ import annotations

import math
import numbers
from typing import Any

from reid_tune.errors import ConfigError

METRICS = ("euclidean", "sqeuclidean", "cityblock")  # distances between embeddings
EXCLUDERS = ("market1501", "duke", "cuhk03", "diagonal", "none")  # gallery entries a query ignores
CAMERA_EXCLUDERS = ("market1501", "duke", "cuhk03")  # the excluders that read cameras from file names
CONVENTIONS = ("market1501", "duke", "cuhk03", "none")  # file-name conventions (pid, camera); also excluders
DATASET_KINDS = ("market1501", "duke", "cuhk03", "folder")  # what `reid-tune prepare` converts
CROP_AUGMENTS = ("center", "five", "avgpool")  # test-time crops
AGGREGATORS = ("mean", "normalized_mean")  # how test-time views are combined
EMBED_FORMATS = ("h5", "csv")
EXPORT_FORMATS = ("onnx", "torchscript")  # what `reid-tune export` writes
LOSSES = ("batch_hard", "batch_all")
SCHEDULES = ("exponential", "multistep", "cosine")  # how the learning rate decays
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
DATA_PATHS = ("auto", "cpu", "device")
MARGIN_WORDS = ("soft", "none")  # softplus, no margin; else a number >= 0 (hinge)
# The built-in networks and heads (reid_tune.models registers them; users may register more).
NETWORKS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "lunet_small")
HEADS = ("fc1024", "fc1024_normalize", "direct", "direct_normalize")


def is_int(value: Any) -> bool:
    """An integer (Python's or numpy's) that is not a bool (YAML's ``true`` is no batch size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (int, float, numpy's) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_margin(value: str | float) -> float | str:
    """A margin as ``float >= 0``, ``'soft'`` (softplus) or ``'none'`` (no margin); strings like '0.2' too."""
    if isinstance(value, str) and value.strip().lower() in MARGIN_WORDS:
        return value.strip().lower()
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = math.nan
    if isinstance(value, bool) or not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin={value!r}: expected a number >= 0, 'soft' or 'none'")
    return margin


def choose(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    """A one-line error unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: unknown; expected one of {', '.join(choices)}")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message collapsed onto one line and truncated, for one-line user errors."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
