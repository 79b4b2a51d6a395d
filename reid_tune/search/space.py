"""The search-space file: a YAML document validated into a :class:`SearchSpec` before anything starts.

Every mistake (unknown key, wrong type, empty range, missing file, P*K above the batch limit, more
identities per batch than the training split has, a starting point outside the space) is one
:class:`ReidTuneError` naming ``file:line``, the key, its value and what was expected.
Relative paths are taken from the current working directory, as on the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.datasets import CONVENTIONS, load_csv
from reid_tune.errors import ReidTuneError
from reid_tune.models import list_heads, list_networks
from reid_tune.search.storage import STORAGE_SCHEMES, absolute, is_uri
from reid_tune.validation import ValidationSplit, hold_out

# The paper's Market-1501 settings (Hermans et al. 2017, Sec. 4): P=18, K=4, soft margin, lr 3e-4,
# decay from iteration 15k of 25k down to 0.001 of the learning rate.
PAPER_POINT: dict[str, Any] = {
    "batch_p": 18,
    "batch_k": 4,
    "margin": "soft",
    "lr": 3e-4,
    "decay_start": 0.6,
    "decay_factor": 0.001,
}

# Searchable names, what kind of value each takes, and which ones a space must give.
INT_PARAMS = ("batch_p", "batch_k", "embedding_dim")
FLOAT_PARAMS = ("lr", "decay_start", "decay_factor")
STR_PARAMS = ("head", "network")
REQUIRED_PARAMS = ("batch_p", "batch_k", "margin", "lr", "decay_start", "decay_factor")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")

# TrainConfig fields set by the data, the space or the trial itself, never under `train:`.
_NOT_FIXED = {
    "train_set",
    "image_root",
    "batch_p",
    "batch_k",
    "margin",
    "learning_rate",
    "decay_start_iteration",
    "decay_factor",
    "checkpoint_frequency",
    "keep_checkpoints",
}

Scalar = int | float | str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------- one searched parameter


@dataclass(frozen=True)
class Param:
    """One entry of ``space:``: a constant, a (log-)uniform or integer range (inclusive), or a choice."""

    name: str
    kind: str  # "constant", "uniform", "loguniform", "int" or "choice"
    values: tuple[Scalar, ...]  # (value,), (low, high) or the choices

    @property
    def searched(self) -> bool:
        """Whether the searcher picks this value (a constant is not searched)."""
        return self.kind != "constant"

    @property
    def bounds(self) -> tuple[float, float]:
        """Smallest and largest numeric value this parameter can take ('soft' counts as 0)."""
        numbers = [v if isinstance(v, (int, float)) else 0 for v in self.values]
        return min(numbers), max(numbers)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a starting point must be)."""
        if self.kind in ("constant", "choice"):
            return value in self.values
        if self.kind == "int" and not _is_int(value):
            return False
        return _is_number(value) and self.values[0] <= value <= self.values[1]

    def describe(self) -> str:
        """How the YAML wrote it, e.g. ``loguniform [0.0001, 0.001]``."""
        return str(self.values[0]) if self.kind == "constant" else f"{self.kind} {list(self.values)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_param(name: str, raw: Any) -> Param:
    """Read one ``space:`` entry (``{uniform: [lo, hi]}``, ``{loguniform: ..}``, ``{int: ..}``,
    ``{choice: [...]}`` or a plain value) and check its kind and range for ``name``."""
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
            raise ValueError(f"expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}} or a plain value")
        kind, values = next(iter(raw.items()))
        if not isinstance(values, list) or not values:
            raise ValueError(f"{kind}: expected a non-empty list")
        param = Param(name, kind, tuple(values))
        if kind != "choice":
            _check_range(param)
    else:
        param = Param(name, "constant", (raw,))
    for value in param.values:
        _check_value(name, value)
    return param


def _check_range(param: Param) -> None:
    if len(param.values) != 2:
        raise ValueError(f"{param.kind}: expected [low, high], got {len(param.values)} values")
    low, high = param.values
    number = _is_int if param.kind == "int" else _is_number
    if not (number(low) and number(high)):
        raise ValueError(f"{param.kind}: expected {'integers' if param.kind == 'int' else 'numbers'}")
    if not low < high:
        raise ValueError(f"{param.kind} [{low}, {high}]: empty range, expected low < high")
    if param.kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform [{low}, {high}]: expected low > 0")
    if param.kind == "int" and param.name not in INT_PARAMS:
        raise ValueError(f"int range: {param.name} is not an integer option")
    if param.kind in ("uniform", "loguniform") and param.name in INT_PARAMS + STR_PARAMS:
        raise ValueError(
            f"{param.kind}: {param.name} takes {'integers' if param.name in INT_PARAMS else 'names'}"
            f" (use int or choice)"
        )


def _check_value(name: str, value: Any) -> None:
    """The value rules of each searchable name (the ranges TrainConfig accepts)."""
    if name in INT_PARAMS:
        ok = _is_int(value) and value >= (2 if name.startswith("batch") else 1)
        expected = "an integer >= 2" if name.startswith("batch") else "an integer >= 1"
    elif name in STR_PARAMS:
        names = _registered(name)
        ok, expected = value in names, f"one of {', '.join(names)}"
    elif name == "margin":
        ok = value in ("soft", "none") or (_is_number(value) and value >= 0)
        expected = "'soft', 'none' or a number >= 0"
    elif name == "lr":
        ok, expected = _is_number(value) and value > 0, "a number > 0"
    elif name == "decay_start":
        ok, expected = _is_number(value) and 0 <= value <= 1, "a fraction of the iterations in [0, 1]"
    else:  # decay_factor
        ok, expected = _is_number(value) and 0 < value <= 1, "a number in (0, 1]"
    if not ok:
        raise ValueError(f"{value!r}: expected {expected}")


def _registered(name: str) -> list[str]:
    """The registered networks or heads (what ``network`` and ``head`` may name)."""
    return list_networks() if name == "network" else list_heads()


# ---------------------------------------------------------------- sections


class DataSpec(_Strict):
    """Where the images are, and the test lists used only by ``reid-tune promote``."""

    train: str
    image_root: str
    convention: Literal[CONVENTIONS]  # type: ignore[valid-type]
    test_query: str | None = None
    test_gallery: str | None = None
    generate_demo: bool = False


class ValidationSpec(_Strict):
    """The seeded hold-out of training identities that the search maximises mAP on."""

    identities: Annotated[int, Field(ge=2)] | None = None
    fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> ValidationSpec:
        if (self.identities is None) == (self.fraction is None):
            raise ValueError("give exactly one of identities and fraction")
        return self


class TrainSpec(_Strict):
    """Fixed training settings: any TrainConfig option that is not searched, plus the validation interval."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    train_iterations: Annotated[int, Field(ge=1)]
    validate_every: Annotated[int, Field(ge=1)]

    def options(self) -> dict[str, Any]:
        """The TrainConfig options given here."""
        return {"train_iterations": self.train_iterations, **(self.model_extra or {})}


StartPoint = Literal["paper"] | dict[str, Scalar | bool]
BASELINE_KEY = "baseline"  # in a start point: `baseline: true` trains it to the end and compares with it


class SchedulerSpec(_Strict):
    """ASHA on validation mAP (times in training iterations), or none."""

    type: Literal["asha", "none"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2


class SearchSection(_Strict):
    """The searcher, the scheduler and how many trials run."""

    searcher: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    startup_trials: Annotated[int, Field(ge=0)] = 10  # TPE samples at random until this many trials ended
    stopped_as: Literal["pruned", "complete"] = "pruned"  # "complete": Ray's OptunaSearch, to compare
    start_points: list[StartPoint] = ["paper"]
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: Annotated[int, Field(ge=1)] = 8
    max_images: Annotated[int, Field(ge=1)] | None = None  # trials stop once they trained this many
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1
    max_failures: Annotated[int, Field(ge=0)] = 2
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2


class ResourcesSpec(_Strict):
    """Ray Train workers per trial and what each one holds (fractional GPUs share a GPU)."""

    workers: Annotated[int, Field(ge=1)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0
    max_batch_size: Annotated[int, Field(ge=4)] | None = None
    address: str | None = None  # a Ray cluster ("auto"); default: RAY_ADDRESS, else a local one


class MlflowSpec(_Strict):
    """Where runs are tracked, what each trial's run records, and the name a promoted model is
    registered under."""

    tracking_uri: str | None = None
    experiment: str | None = None
    registered_model: str | None = None
    system_metrics: bool = True  # CPU, memory and GPU of each trial where it trains, under system/
    system_metrics_every_s: Annotated[float, Field(gt=0)] = 10.0


class SearchSpec(_Strict):
    """A whole search-space file."""

    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    data: DataSpec
    validation: ValidationSpec
    train: TrainSpec
    space: dict[str, Any]
    search: SearchSection = SearchSection()
    resources: ResourcesSpec = ResourcesSpec()
    storage: str = "ray_results"
    mlflow: MlflowSpec = MlflowSpec()

    # ---- derived values

    @property
    def params(self) -> dict[str, Param]:
        """The parsed ``space:`` entries (checked by :func:`check_space`)."""
        return {name: parse_param(name, raw) for name, raw in self.space.items()}

    @property
    def tracking_experiment(self) -> str:
        """The MLflow experiment (default: the search's name)."""
        return self.mlflow.experiment or self.experiment

    @property
    def model_name(self) -> str:
        """The registered-model name ``promote`` uses (default: the search's name)."""
        return self.mlflow.registered_model or self.experiment

    def written_points(self) -> list[dict[str, Any]]:
        """The starting points as written, with ``paper`` spelled out: the paper's settings, and for a
        searched ``embedding_dim``, ``head`` or ``network`` TriNet's (TrainConfig's defaults)."""
        params = self.params
        trinet = {f.name: f.default for f in fields(TrainConfig) if f.name in INT_PARAMS[2:] + STR_PARAMS}
        paper = {**PAPER_POINT, **{k: v for k, v in trinet.items() if k in params and params[k].searched}}
        return [paper if p == "paper" else p for p in self.search.start_points]

    def start_points(self) -> list[dict[str, Any]]:
        """The starting points with ``paper`` spelled out (only the searched parameters)."""
        params = self.params
        return [
            {k: v for k, v in p.items() if k != BASELINE_KEY and params[k].searched}
            for p in self.written_points()
        ]

    def paper_point(self) -> dict[str, Any] | None:
        """The searched values of the paper's settings, when they are a starting point."""
        return (
            self.start_points()[self.search.start_points.index("paper")]
            if "paper" in self.search.start_points
            else None
        )

    def baseline_points(self) -> list[dict[str, Any]]:
        """The start points that always train their full budget: the paper's and those marked baseline."""
        return [
            point
            for raw, point in zip(self.search.start_points, self.start_points())
            if raw == "paper" or raw.get(BASELINE_KEY) is True
        ]

    def validation_split(self) -> ValidationSplit:
        """The seeded hold-out of training identities the search validates on (a pure function of the
        training CSV and ``validation:``, so the driver draws the same split on every run and resume)."""
        return hold_out(
            load_csv(self.data.train),
            self.data.convention,
            identities=self.validation.identities,
            fraction=self.validation.fraction,
            seed=self.validation.seed,
        )

    def train_config(self, sampled: dict[str, Any], train_set: Path) -> TrainConfig:
        """The TrainConfig of one trial: fixed options, sampled values, and its reduced training list."""
        values = {name: param.values[0] for name, param in self.params.items() if not param.searched}
        values.update(sampled)
        iterations = self.train.train_iterations
        options = {
            **self.train.options(),
            "train_set": str(train_set),
            "image_root": self.data.image_root,
            "batch_p": values["batch_p"],
            "batch_k": values["batch_k"],
            "margin": float(values["margin"]) if _is_number(values["margin"]) else values["margin"],
            "learning_rate": float(values["lr"]),
            "decay_start_iteration": round(values["decay_start"] * iterations),
            "decay_factor": float(values["decay_factor"]),
            "checkpoint_frequency": self.train.validate_every,
            "keep_checkpoints": 1,  # in the worker's scratch folder; Ray Train keeps the best ones
            **{k: values[k] for k in INT_PARAMS[2:] + STR_PARAMS if k in values},
        }
        return config_from_dict(options, source="trial")


# ---------------------------------------------------------------- loading with line numbers


def _node_lines(node: yaml.Node, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], int]]:
    """(path, 1-based line) of every key and item in a composed YAML tree."""
    yield prefix, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _node_lines(value, (*prefix, key.value))
            yield (*prefix, key.value), key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _node_lines(item, (*prefix, i))


def _located(
    path: Path, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...], message: str
) -> ReidTuneError:
    """An error naming ``file:line`` of the deepest YAML node on ``loc``."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            line = lines[loc[:end]]
            break
    key = ".".join(str(part) for part in loc)
    return ReidTuneError(f"{path}:{line}: {key + ': ' if key else ''}{message}")


def _pydantic_message(error: dict[str, Any]) -> str:
    """One line from one pydantic error: its message and the offending value."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "missing key"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or message.startswith(repr(value)) else f"{value!r}: "
    return f"{shown}{message}"


def _error_loc(error: dict[str, Any]) -> tuple[Any, ...]:
    """The YAML path of a pydantic error, without pydantic's labels of union branches."""
    labels = ("int", "float", "str", "bool")
    return tuple(
        part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in labels))
    )


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """The YAML mapping in ``path`` and the line of each key path."""
    if not path.is_file():
        raise ReidTuneError(f"{path}: search-space file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ReidTuneError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ReidTuneError(f"{path}: expected a mapping of sections (experiment, data, ...)")
    return data, dict(_node_lines(node))


def parse_spec(path: Path, data: dict[str, Any], lines: dict[tuple[Any, ...], int]) -> SearchSpec:
    """Validate the document's structure and value ranges (no file-system checks)."""
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise _located(path, lines, _error_loc(first), _pydantic_message(first)) from None


# ---------------------------------------------------------------- checks across keys and against the data


def check_train(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """``train:`` holds known TrainConfig options of the right type and range, none set elsewhere."""
    options = spec.train.options()
    for key in options:
        if key in _NOT_FIXED:
            raise _located(path, lines, ("train", key), "set by data:, space: or the trial, not under train:")
    _train_options(options, path, lines)
    for key in STR_PARAMS:
        if key in options and options[key] not in _registered(key):
            raise _located(
                path,
                lines,
                ("train", key),
                f"{options[key]!r}: expected one of {', '.join(_registered(key))}",
            )
    if spec.train.validate_every > spec.train.train_iterations:
        raise _located(
            path,
            lines,
            ("train", "validate_every"),
            f"{spec.train.validate_every}: expected <= train_iterations={spec.train.train_iterations}",
        )


def _train_options(options: dict[str, Any], path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """TrainConfig's own checks of ``options``, located at the option its message names."""
    try:
        config_from_dict(options, source="train")
    except ReidTuneError as err:
        message = str(err).removeprefix("train: ")
        key = next(
            (k for k in options if message.startswith((f"{k}=", f"unknown option {k!r}"))),
            next(iter(options)),
        )
        raise _located(path, lines, ("train", key), message) from None


def check_space(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """Known names, valid distributions, the required ones present, none also fixed under ``train:``."""
    known = INT_PARAMS + FLOAT_PARAMS + STR_PARAMS + ("margin",)
    for name, raw in spec.space.items():
        if name not in known:
            raise _located(
                path, lines, ("space", name), f"unknown parameter; expected one of {', '.join(known)}"
            )
        if name in spec.train.options():
            raise _located(path, lines, ("space", name), "also fixed under train:; give it in one place")
        try:
            parse_param(name, raw)
        except ValueError as err:
            raise _located(path, lines, ("space", name), str(err)) from None
    missing = [name for name in REQUIRED_PARAMS if name not in spec.space]
    if missing:
        raise _located(path, lines, ("space",), f"missing {', '.join(missing)}")
    scheduler = spec.search.scheduler
    if scheduler.type == "asha" and scheduler.grace_period > spec.train.train_iterations:
        raise _located(
            path,
            lines,
            ("search", "scheduler", "grace_period"),
            f"{scheduler.grace_period}: expected <= train.train_iterations={spec.train.train_iterations}",
        )


def check_storage(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """The storage is a local folder or a URI of a file system that Ray and pyarrow can reach."""
    scheme = urlsplit(spec.storage).scheme if is_uri(spec.storage) else "file"
    if scheme not in STORAGE_SCHEMES:
        raise _located(
            path,
            lines,
            ("storage",),
            f"{spec.storage}: unsupported scheme '{scheme}' (use a folder or one of "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)})",
        )


def check_files(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """Every named file and folder exists."""
    checks = [("image_root", spec.data.image_root, Path.is_dir, "folder")]
    checks += [
        (key, getattr(spec.data, key), Path.is_file, "file")
        for key in ("train", "test_query", "test_gallery")
        if getattr(spec.data, key)
    ]
    for key, name, exists, what in checks:
        if not exists(Path(name)):
            raise _located(path, lines, ("data", key), f"{name}: {what} not found")


def check_points(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> None:
    """Every starting point gives each searched parameter a value inside the space, and nothing else
    (``baseline: true|false`` aside)."""
    params = spec.params
    for i, (raw, point) in enumerate(zip(spec.search.start_points, spec.written_points())):
        where = ("search", "start_points", i)
        label = "the paper's " if raw == "paper" else ""
        for name, value in point.items():
            _check_point_value(
                name, value, params, lambda key, text: _located(path, lines, key, label + text), where
            )
        missing = [name for name, param in params.items() if param.searched and name not in point]
        if missing:
            raise _located(
                path,
                lines,
                where,
                f"{label}start point gives no {', '.join(missing)}: it needs every searched value",
            )


def _check_point_value(
    name: str,
    value: Any,
    params: dict[str, Param],
    error: Callable[..., ReidTuneError],
    where: tuple[Any, ...],
) -> None:
    """Raise ``error(location, message)`` when ``name: value`` cannot be in the start point at ``where``."""
    if name == BASELINE_KEY:
        if not isinstance(value, bool):
            raise error((*where, name), f"{value!r}: expected true or false")
    elif name not in params:
        raise error((*where, name), f"{value!r}: {name} is not in space:")
    elif not params[name].contains(value):
        raise error(where, f"{name}={value!r}: outside space.{name} = {params[name].describe()}")


def check_batch(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int], train_ids: int) -> None:
    """The largest P*K fits the batch limit and the largest P fits the training identities."""
    p_max = int(spec.params["batch_p"].bounds[1])
    k_max = int(spec.params["batch_k"].bounds[1])
    limit = spec.resources.max_batch_size
    if limit is not None and p_max * k_max > limit:
        raise _located(
            path,
            lines,
            ("space", "batch_p"),
            f"largest batch_p * batch_k = {p_max} * {k_max} = {p_max * k_max}: "
            f"expected <= resources.max_batch_size={limit}",
        )
    if p_max > train_ids:
        raise _located(
            path,
            lines,
            ("space", "batch_p"),
            f"batch_p up to {p_max}: the training split has only {train_ids} identities "
            f"(after holding out the validation identities)",
        )


def validation_split(spec: SearchSpec, path: Path, lines: dict[tuple[Any, ...], int]) -> ValidationSplit:
    """The seeded hold-out of ``validation:`` (an error at its line if it cannot be drawn)."""
    key = "identities" if spec.validation.identities is not None else "fraction"
    try:
        return spec.validation_split()
    except ReidTuneError as err:
        raise _located(path, lines, ("validation", key), str(err)) from None


def load_spec(path: str | Path, *, prepare_data: bool = True) -> SearchSpec:
    """Read and fully validate a search-space file; with ``prepare_data`` generate the demo data first."""
    path = Path(path)
    data, lines = read_yaml(path)
    spec = parse_spec(path, data, lines)
    check_train(spec, path, lines)
    check_space(spec, path, lines)
    if prepare_data and spec.data.generate_demo and not Path(spec.data.image_root).exists():
        from reid_tune.synthetic import generate_demo

        generate_demo(spec.data.image_root)
    check_files(spec, path, lines)
    check_points(spec, path, lines)
    check_storage(spec, path, lines)
    train_ids = len(set(validation_split(spec, path, lines).train.pids.tolist()))
    check_batch(spec, path, lines, train_ids)
    return absolute_paths(spec)


def absolute_paths(spec: SearchSpec) -> SearchSpec:
    """``spec`` with its files and a local storage made absolute: trials and Ray workers run in other
    folders (a storage URI stays as it is)."""
    data = {
        key: str(Path(value).resolve())
        for key, value in spec.data.model_dump().items()
        if key in ("train", "image_root", "test_query", "test_gallery") and value is not None
    }
    return spec.model_copy(
        update={"data": spec.data.model_copy(update=data), "storage": absolute(spec.storage)}
    )
