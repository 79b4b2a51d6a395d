"""The checks of a search-space file that its schema cannot make alone: across sections, against
TrainConfig, the file system, the registered networks and the data, and (when a search starts) against
the machine: its GPUs and the pretrained weights. Each failure is one located :class:`SpaceError`.

Only :func:`check_names` and :func:`check_pretrained` import torch (through ``reid_tune.models``), so
they run after the others.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ReidTuneError, SpaceError
from reid_tune.search.schema import BASELINE_KEY, SCHEDULE_USES, STR_PARAMS, Param, SearchSpec
from reid_tune.search.storage import STORAGE_SCHEMES, is_uri
from reid_tune.vocabulary import HEADS, NETWORKS

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
    "warmup_iterations",
    "checkpoint_frequency",
    "keep_checkpoints",
}

Loc = tuple[Any, ...]  # a path of keys and list indices in the YAML document


@dataclass(frozen=True)
class SpecFile:
    """A search-space file and the line of each key path in it: where its errors point."""

    path: Path
    lines: dict[Loc, int]

    def line(self, loc: Loc) -> int:
        """The 1-based line of the deepest YAML node on ``loc`` (the document's first line at worst)."""
        return next(self.lines[loc[:end]] for end in range(len(loc), -1, -1) if loc[:end] in self.lines)

    def error(self, loc: Loc, message: str) -> NoReturn:
        """Raise a SpaceError ``file:line: key: message`` for the value at ``loc``."""
        key = ".".join(str(part) for part in loc)
        raise SpaceError(f"{self.path}:{self.line(loc)}: {key + ': ' if key else ''}{message}")


def check_train(spec: SearchSpec, file: SpecFile) -> None:
    """``train:`` holds known TrainConfig options of the right type and range, none set elsewhere, and
    ``validate_every`` and ASHA's grace period fit in ``train_iterations``."""
    options = spec.train.options()
    for key in options:
        if key in _NOT_FIXED:
            file.error(("train", key), "set by data:, space: or the trial, not under train:")
    _train_options(options, file)
    iterations = spec.train.train_iterations
    if spec.train.validate_every > iterations:
        file.error(
            ("train", "validate_every"),
            f"{spec.train.validate_every}: expected <= train_iterations={iterations}",
        )
    scheduler = spec.search.scheduler
    if scheduler.type == "asha" and scheduler.grace_period > iterations:
        file.error(
            ("search", "scheduler", "grace_period"),
            f"{scheduler.grace_period}: expected <= train.train_iterations={iterations}",
        )


def _train_options(options: dict[str, Any], file: SpecFile) -> None:
    """TrainConfig's own checks of ``options``, located at the option its message names."""
    try:
        config_from_dict(options, source="train")
    except ReidTuneError as err:
        message = str(err).removeprefix("train: ")
        key = next(
            (k for k in options if message.startswith((f"{k}=", f"unknown option {k!r}"))),
            next(iter(options)),
        )
        file.error(("train", key), message)


def check_space(spec: SearchSpec, file: SpecFile) -> None:
    """No searched parameter is also fixed under ``train:``, and each schedule's parameters are given when
    a schedule the search can run reads them, and only then."""
    for name in spec.space:
        if name in spec.train.options():
            file.error(("space", name), "also fixed under train:; give it in one place")
    schedules = _schedules(spec)
    used = {name for schedule in schedules for name in SCHEDULE_USES[schedule]}
    listed = f"schedule {' or '.join(schedules)}"
    if "decay_start" in spec.params and "decay_start" not in used:
        file.error(("space", "decay_start"), f"not used by {listed}, expected no decay_start")
    if "milestones" in spec.train.options() and "milestones" not in used:
        file.error(("train", "milestones"), f"not used by {listed}, expected milestones with multistep only")
    if "decay_start" in used and "decay_start" not in spec.params:
        file.error(("space",), f"missing decay_start, which {listed} reads")


def _schedules(spec: SearchSpec) -> tuple[str, ...]:
    """The decay schedules the search's trials can run: searched, fixed under ``train:``, or the default."""
    if "schedule" in spec.params:
        return tuple(spec.params["schedule"].values)
    return (spec.train.options().get("schedule", "exponential"),)


def check_workers(spec: SearchSpec, file: SpecFile) -> None:
    """Several workers per trial hold whole GPUs (Ray's PACK placement would put two ranks of a trial on one
    GPU, which NCCL refuses) and split every ``batch_p`` the space can give evenly (each worker takes
    ``batch_p / workers`` identities of a batch)."""
    workers, gpus = spec.resources.workers, spec.resources.gpus_per_worker
    if workers == 1:
        return
    if not float(gpus).is_integer():
        file.error(
            ("resources", "gpus_per_worker"),
            f"{gpus}: expected a whole number of GPUs (0, 1, 2, ...) with resources.workers={workers}: Ray "
            f"could place two workers of a trial on one GPU, which NCCL refuses",
        )
    batch_p = spec.params["batch_p"]
    split = f"with resources.workers={workers} each worker takes batch_p / {workers} identities"
    if batch_p.kind == "int":
        low, high = batch_p.values
        multiples = list(range(-(-low // workers) * workers, high + 1, workers))
        instead = f"{{choice: {multiples}}}" if multiples else f"a choice of multiples of {workers}"
        file.error(
            ("space", "batch_p"),
            f"{batch_p.describe()}: {split}, but an int range gives every integer; use {instead}",
        )
    for value in batch_p.values:
        if value % workers:
            file.error(("space", "batch_p"), f"{value}: expected a multiple of {workers} ({split})")


def check_storage(spec: SearchSpec, file: SpecFile) -> None:
    """The storage is a local folder or a URI of a file system that Ray and pyarrow can reach."""
    scheme = urlsplit(spec.storage).scheme if is_uri(spec.storage) else "file"
    if scheme not in STORAGE_SCHEMES:
        file.error(
            ("storage",),
            f"{spec.storage}: unsupported scheme '{scheme}' (use a folder or one of "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)})",
        )


def check_files(spec: SearchSpec, file: SpecFile) -> None:
    """Every named file and folder exists."""
    checks = [("image_root", spec.data.image_root, Path.is_dir, "folder")]
    checks += [
        (key, getattr(spec.data, key), Path.is_file, "file")
        for key in ("train", "test_query", "test_gallery")
        if getattr(spec.data, key)
    ]
    for key, name, exists, what in checks:
        if not exists(Path(name)):
            file.error(("data", key), f"{name}: {what} not found")


def check_points(spec: SearchSpec, file: SpecFile) -> None:
    """Every starting point gives each searched parameter a value inside the space, and nothing else
    (``baseline: true|false`` aside)."""
    for i, (raw, point) in enumerate(zip(spec.search.start_points, spec.written_points())):
        where = ("search", "start_points", i)
        label = "the paper's " if raw == "paper" else ""
        for name, value in point.items():
            problem = _point_problem(name, value, spec.params)
            if problem:
                file.error((*where, *problem[0]), label + problem[1])
        missing = [name for name, param in spec.params.items() if param.searched and name not in point]
        if missing:
            file.error(
                where, f"{label}start point gives no {', '.join(missing)}: it needs every searched value"
            )


def _point_problem(name: str, value: Any, params: dict[str, Param]) -> tuple[Loc, str] | None:
    """Why ``name: value`` cannot be in a start point (where, below the point, and what), or None."""
    if name == BASELINE_KEY:
        return None if isinstance(value, bool) else ((name,), f"{value!r}: expected true or false")
    if name not in params:
        return (name,), f"{value!r}: {name} is not in space:"
    if not params[name].contains(value):
        return (), f"{name}={value!r}: outside space.{name} = {params[name].describe()}"
    return None


def check_names(spec: SearchSpec, file: SpecFile) -> None:
    """Every network and head named under ``train:`` or ``space:`` is registered."""
    registered = {"network": _registered("network"), "head": _registered("head")}
    for loc, name in _names(spec):
        if name not in registered[loc[-1]]:
            file.error(loc, f"{name!r}: expected one of {', '.join(registered[loc[-1]])}")


def _registered(kind: str) -> list[str]:
    """The registered networks or heads: the built-in ones unless ``reid_tune.models`` was imported (only
    then can more be registered), so that checking a file does not import torch."""
    models = sys.modules.get("reid_tune.models")
    if models is None:
        return sorted(NETWORKS if kind == "network" else HEADS)
    return models.list_networks() if kind == "network" else models.list_heads()


def _names(spec: SearchSpec) -> Iterator[tuple[Loc, Any]]:
    """Each network and head name the file gives, with its key: fixed under ``train:`` or in ``space:``."""
    options = spec.train.options()
    for key in STR_PARAMS:
        if key in options:
            yield ("train", key), options[key]
        for value in spec.params[key].values if key in spec.params else ():
            yield ("space", key), value


def check_batch(spec: SearchSpec, file: SpecFile, train_ids: int) -> None:
    """The largest P*K fits the batch limit and the largest P fits the ``train_ids`` training identities."""
    p_max = int(spec.params["batch_p"].bounds[1])
    k_max = int(spec.params["batch_k"].bounds[1])
    limit = spec.resources.max_batch_size
    if limit is not None and p_max * k_max > limit:
        file.error(
            ("space", "batch_p"),
            f"largest batch_p * batch_k = {p_max} * {k_max} = {p_max * k_max}: "
            f"expected <= resources.max_batch_size={limit}",
        )
    if p_max > train_ids:
        file.error(
            ("space", "batch_p"),
            f"batch_p up to {p_max}: the training split has only {train_ids} identities "
            f"(after holding out the validation identities)",
        )


def check_gpus(spec: SearchSpec, file: SpecFile, gpus: int) -> None:
    """A trial of a search on this machine alone (no Ray cluster) asks for at most its ``gpus``: Ray would
    keep a trial that asks for more waiting for ever."""
    workers, per_worker = spec.resources.workers, spec.resources.gpus_per_worker
    if workers * per_worker <= gpus:
        return
    per_trial = f" x {workers} workers = {workers * per_worker:g} GPUs a trial" if workers > 1 else ""
    has, fix = (
        ("no GPU", "gpus_per_worker: 0 to train on the CPU")
        if gpus == 0
        else (f"only {gpus} GPU(s)", f"gpus_per_worker x workers <= {gpus}")
    )
    file.error(
        ("resources", "gpus_per_worker"),
        f"{per_worker:g}{per_trial}: this machine has {has} and no Ray cluster is given; set {fix}, "
        f"or resources.address to join a Ray cluster that has GPUs",
    )


def check_pretrained(spec: SearchSpec, file: SpecFile) -> None:
    """``train.pretrained`` loads into every network the space can give (downloaded into torch.hub's cache
    when need be), so that weights that cannot be had are one error before the first trial, not a
    failure of every trial and its retries."""
    pretrained = spec.train.options().get("pretrained")
    if pretrained is None:
        return
    from reid_tune.models import check_pretrained as load

    networks = [name for loc, name in _names(spec) if loc[-1] == "network"] or [TrainConfig.network]
    for network in networks:
        try:
            load(network, pretrained)
        except ReidTuneError as err:
            file.error(("train", "pretrained"), str(err).removeprefix("pretrained="))
