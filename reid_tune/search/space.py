"""The search-space file read into a :class:`SearchSpec` before anything starts, and what a search builds
from it: the validation split and each trial's TrainConfig.

Every mistake (YAML syntax, unknown key, wrong type, empty range, missing file, P*K above the batch
limit, more identities per batch than the training split has, a starting point outside the space, a
``batch_p`` or fractional GPU that several workers per trial cannot share) is
one :class:`SpaceError` naming ``file:line``, the key, its value and what was expected. Syntax, schema
and value errors come before anything imports torch, so a bad file answers at once. Relative paths are
taken from the current working directory, as on the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ReidTuneError, SpaceError
from reid_tune.search.checks import (
    Loc,
    SpecFile,
    check_batch,
    check_files,
    check_names,
    check_points,
    check_space,
    check_storage,
    check_train,
    check_workers,
)
from reid_tune.search.schema import INT_PARAMS, OPTION_PARAMS, PARAM_ERROR, STR_PARAMS, SearchSpec
from reid_tune.search.storage import absolute
from reid_tune.vocabulary import parse_margin

if TYPE_CHECKING:
    from reid_tune.validation import ValidationSplit

# ---------------------------------------------------------------- reading with line numbers


def read_yaml(path: Path) -> tuple[dict[str, Any], SpecFile]:
    """The YAML mapping in ``path``, and the file with the line of each key path."""
    if not path.is_file():
        raise SpaceError(f"{path}: search-space file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpaceError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping of sections (experiment, data, ...)")
    return data, SpecFile(path, dict(_node_lines(node)))


def _node_lines(node: yaml.Node, prefix: Loc = ()) -> Iterator[tuple[Loc, int]]:
    """(path, 1-based line) of every key and item in a composed YAML tree."""
    yield prefix, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _node_lines(value, (*prefix, key.value))
            yield (*prefix, key.value), key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _node_lines(item, (*prefix, i))


def parse_spec(data: dict[str, Any], file: SpecFile) -> SearchSpec:
    """The document validated against the schema, ``space:`` parsed (no checks across sections or files)."""
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        file.error(_error_loc(first), _pydantic_message(first))


def _pydantic_message(error: dict[str, Any]) -> str:
    """One line from one pydantic error: its message and the offending value."""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "missing key"
    value = error.get("input")
    plain = error["type"] == PARAM_ERROR or isinstance(value, dict) or message.startswith(repr(value))
    return message if plain else f"{value!r}: {message}"


def _error_loc(error: dict[str, Any]) -> Loc:
    """The YAML path of a pydantic error, without pydantic's labels of union branches."""
    labels = ("int", "float", "str", "bool")
    return tuple(
        part for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in labels))
    )


# ---------------------------------------------------------------- the whole file


def read_spec(path: str | Path) -> SearchSpec:
    """A search-space file parsed against its schema only (its data, storage and network unchecked): enough
    to name the search's tracking store and experiment, e.g. after its data has moved."""
    return parse_spec(*read_yaml(Path(path)))


def load_spec(path: str | Path, *, prepare_data: bool = True) -> SearchSpec:
    """Read and fully validate a search-space file; with ``prepare_data`` generate the demo data first."""
    data, file = read_yaml(Path(path))
    spec = parse_spec(data, file)
    for check in (check_train, check_space, check_workers, check_points, check_storage):
        check(spec, file)
    if prepare_data and spec.data.generate_demo and not Path(spec.data.image_root).exists():
        from reid_tune.synthetic import generate_demo

        generate_demo(spec.data.image_root)
    check_files(spec, file)
    check_names(spec, file)  # the first to import torch
    check_batch(spec, file, _training_identities(spec, file))
    return absolute_paths(spec)


def _training_identities(spec: SearchSpec, file: SpecFile) -> int:
    """How many identities the validation split leaves for training (an error at ``validation:`` if it
    cannot be drawn)."""
    try:
        split = validation_split(spec)
    except ReidTuneError as err:
        file.error(("validation", spec.validation.size_key), str(err))
    return len(set(split.train.pids.tolist()))


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


# ---------------------------------------------------------------- what a search builds from it


def validation_split(spec: SearchSpec) -> ValidationSplit:
    """The seeded hold-out of training identities the search validates on (a pure function of the
    training CSV and ``validation:``, so the driver draws the same split on every run and resume)."""
    from reid_tune.datasets import load_csv
    from reid_tune.validation import hold_out

    return hold_out(
        load_csv(spec.data.train),
        spec.data.convention,
        identities=spec.validation.identities,
        fraction=spec.validation.fraction,
        seed=spec.validation.seed,
    )


# Parameters given as fractions of the training iterations, and the TrainConfig option each one sets.
ITERATION_FRACTIONS = {"decay_start": "decay_start_iteration", "warmup": "warmup_iterations"}


def train_config(spec: SearchSpec, sampled: dict[str, Any], train_set: Path) -> TrainConfig:
    """The TrainConfig of one trial: fixed options, sampled values, and its reduced training list."""
    values = {name: param.values[0] for name, param in spec.params.items() if not param.searched}
    values.update(sampled)
    options = {
        **spec.train.options(),
        "train_set": str(train_set),
        "image_root": spec.data.image_root,
        "batch_p": values["batch_p"],
        "batch_k": values["batch_k"],
        "margin": parse_margin(values["margin"]),
        "learning_rate": float(values["lr"]),
        "decay_factor": float(values["decay_factor"]),
        "checkpoint_frequency": spec.train.validate_every,
        "keep_checkpoints": 1,  # in the worker's scratch folder; Ray Train keeps the best ones
        **{
            option: round(values[name] * spec.train.train_iterations)
            for name, option in ITERATION_FRACTIONS.items()
            if name in values
        },
        **{k: values[k] for k in INT_PARAMS[2:] + STR_PARAMS + OPTION_PARAMS if k in values},
    }
    return config_from_dict(options, source="trial")
