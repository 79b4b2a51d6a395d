"""The search-space file's schema: its sections as pydantic models, and the ``space:`` parameter language.

A :class:`SearchSpec` is what a YAML document must look like; it parses ``space:`` into :class:`Param`
values once, when it is validated. Imports nothing heavy (no torch, Ray, Optuna or MLflow).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ConfigError
from reid_tune.vocabulary import CONVENTIONS, is_int, is_number, parse_margin

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
FLOAT_PARAMS = ("lr", "decay_start", "decay_factor", "warmup")
STR_PARAMS = ("head", "network")
# TrainConfig options searched under their own names and checked as TrainConfig checks them: the decay
# schedule and BoT's tricks (Luo et al. 2019). Numbers take ranges; words, booleans and strides a choice.
OPTION_PARAMS = (
    "schedule",
    "weight_decay",
    "id_loss_weight",
    "label_smoothing",
    "bnneck",
    "last_stride",
    "random_erasing",
    "center_loss_weight",
    "warmup_factor",
)
KNOWN_PARAMS = INT_PARAMS + FLOAT_PARAMS + STR_PARAMS + OPTION_PARAMS + ("margin",)
REQUIRED_PARAMS = ("batch_p", "batch_k", "margin", "lr", "decay_factor")  # decay_start: per schedule
# The parameters (in space:) or options (under train:) each decay schedule reads besides decay_factor.
SCHEDULE_USES = {"exponential": ("decay_start",), "cosine": ("decay_start",), "multistep": ("milestones",)}
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
PARAM_ERROR = "param"  # the pydantic error type of a bad ``space:`` entry (its message names the value)

Scalar = int | float | str


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
        if self.kind == "int" and not is_int(value):
            return False
        return is_number(value) and self.values[0] <= value <= self.values[1]

    def describe(self) -> str:
        """How the YAML wrote it, e.g. ``loguniform [0.0001, 0.001]``."""
        return str(self.values[0]) if self.kind == "constant" else f"{self.kind} {list(self.values)}"


def parse_param(name: str, raw: Any) -> Param:
    """Read one ``space:`` entry (``{uniform: [lo, hi]}``, ``{loguniform: ..}``, ``{int: ..}``,
    ``{choice: [...]}`` or a plain value) and check its kind and range for ``name`` (a ConfigError if not)."""
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
            raise ConfigError(f"expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}} or a plain value")
        kind, values = next(iter(raw.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{kind}: expected a non-empty list")
        param = Param(name, kind, tuple(values))
        if kind != "choice":
            _check_range(param)
    else:
        param = Param(name, "constant", (raw,))
    for value in param.values:
        _check_value(name, value)
    return param


def _check_range(param: Param) -> None:
    """A range is ``[low, high]`` with low < high, of the kind of numbers its parameter takes."""
    if len(param.values) != 2:
        raise ConfigError(f"{param.kind}: expected [low, high], got {len(param.values)} values")
    low, high = param.values
    number = is_int if param.kind == "int" else is_number
    if not (number(low) and number(high)):
        raise ConfigError(f"{param.kind}: expected {'integers' if param.kind == 'int' else 'numbers'}")
    if not low < high:
        raise ConfigError(f"{param.kind} [{low}, {high}]: empty range, expected low < high")
    if param.kind == "loguniform" and low <= 0:
        raise ConfigError(f"loguniform [{low}, {high}]: expected low > 0")
    if param.kind == "int" and param.name not in INT_PARAMS:
        raise ConfigError(f"int range: {param.name} is not an integer option")
    if param.name in OPTION_PARAMS and _option_type(param.name) != "float":
        raise ConfigError(f"{param.kind}: {param.name} takes {_option_type(param.name)} values (use choice)")
    if param.kind in ("uniform", "loguniform") and param.name in INT_PARAMS + STR_PARAMS:
        raise ConfigError(
            f"{param.kind}: {param.name} takes {'integers' if param.name in INT_PARAMS else 'names'}"
            f" (use int or choice)"
        )


def _check_value(name: str, value: Any) -> None:
    """The value rules of each searchable name (the ranges TrainConfig accepts); registered network and
    head names are checked later, by :func:`reid_tune.search.checks.check_names`."""
    if name == "margin":
        parse_margin(value)
        return
    if name in OPTION_PARAMS:
        config_from_dict({name: value}, source="space")
        return
    if name in INT_PARAMS:
        ok = is_int(value) and value >= (2 if name.startswith("batch") else 1)
        expected = "an integer >= 2" if name.startswith("batch") else "an integer >= 1"
    elif name in STR_PARAMS:
        ok, expected = isinstance(value, str), f"a {name} name"
    elif name == "lr":
        ok, expected = is_number(value) and value > 0, "a number > 0"
    elif name in ("decay_start", "warmup"):
        ok, expected = is_number(value) and 0 <= value <= 1, "a fraction of the iterations in [0, 1]"
    else:  # decay_factor
        ok, expected = is_number(value) and 0 < value <= 1, "a number in (0, 1]"
    if not ok:
        raise ConfigError(f"{value!r}: expected {expected}")


def _option_type(name: str) -> str:
    """The type TrainConfig declares for option ``name`` ('float', 'bool', 'int', 'str')."""
    return next(f.type for f in fields(TrainConfig) if f.name == name)


def parse_space(space: dict[str, Any]) -> dict[str, Param]:
    """Every entry of ``space:`` parsed: known names only, each valid, the required ones present (a pydantic
    ValidationError located at the entry if not, for the schema's own error report)."""
    params = {}
    for name, raw in space.items():
        try:
            if name not in KNOWN_PARAMS:
                raise ConfigError(f"unknown parameter; expected one of {', '.join(KNOWN_PARAMS)}")
            params[name] = parse_param(name, raw)
        except ConfigError as err:
            raise _space_error((name,), raw, str(err)) from None
    missing = [name for name in REQUIRED_PARAMS if name not in space]
    if missing:
        raise _space_error((), space, f"missing {', '.join(missing)}")
    return params


def _space_error(loc: tuple[str, ...], raw: Any, message: str) -> ValidationError:
    """A pydantic error at ``space.<loc>``, so that it is located like any other schema error."""
    error = PydanticCustomError(PARAM_ERROR, "{message}", {"message": message})
    details = InitErrorDetails(type=error, loc=("space", *loc), input=raw)
    return ValidationError.from_exception_data("space", [details])


# ---------------------------------------------------------------- sections


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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
    rerank: bool = False  # rank the validation by k-reciprocal re-ranked distances (reid_tune.rerank)

    @model_validator(mode="after")
    def _one_size(self) -> ValidationSpec:
        if (self.identities is None) == (self.fraction is None):
            raise ValueError("give exactly one of identities and fraction")
        return self

    @property
    def size_key(self) -> str:
        """The key that sizes the hold-out: ``identities`` or ``fraction``."""
        return "identities" if self.identities is not None else "fraction"


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
    space: dict[str, Any]  # as written; parsed into `params`
    search: SearchSection = SearchSection()
    resources: ResourcesSpec = ResourcesSpec()
    storage: str = "ray_results"
    mlflow: MlflowSpec = MlflowSpec()

    _params: dict[str, Param] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _parse_space(self) -> SearchSpec:
        self._params = parse_space(self.space)
        return self

    # ---- derived values

    @property
    def params(self) -> dict[str, Param]:
        """The parsed ``space:`` entries, by name (parsed once, when the file was validated)."""
        return self._params

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
        searched ``embedding_dim``, ``head``, ``network``, schedule or BoT trick TriNet's (TrainConfig's
        defaults: the exponential schedule, every trick off)."""
        named = INT_PARAMS[2:] + STR_PARAMS + OPTION_PARAMS
        trinet = {f.name: f.default for f in fields(TrainConfig) if f.name in named}
        searched = {k: v for k, v in trinet.items() if k in self.params and self.params[k].searched}
        paper = {**PAPER_POINT, **searched}
        return [paper if p == "paper" else p for p in self.search.start_points]

    def start_points(self) -> list[dict[str, Any]]:
        """The starting points with ``paper`` spelled out (only the searched parameters)."""
        return [
            {k: v for k, v in p.items() if k != BASELINE_KEY and self.params[k].searched}
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
