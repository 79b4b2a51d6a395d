"""The search: an Optuna-guided Ray Tune run of :func:`run_trial`, with ASHA, tracked in MLflow.

``run_search`` validates the file, checks that this machine can run its trials (the GPUs of a local
search, the pretrained weights), checks the tracking store, draws the validation split, connects to
Ray, builds the Tuner (:func:`build_tuner`: the searcher and scheduler of :mod:`algorithms`, the
MLflow callbacks) or restores it (``resume``), and summarises the best trial against the paper's
settings on the same validation split (:mod:`summary`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune import ExperimentAnalysis

from reid_tune.errors import ReidTuneError
from reid_tune.search import storage
from reid_tune.search.algorithms import ImageBudget, PruningOptunaSearch, build_scheduler, build_searcher
from reid_tune.search.callbacks import MlflowLogger, PendingWatch, SearchReport, TrialTable
from reid_tune.search.checks import check_gpus, check_pretrained
from reid_tune.search.keys import (
    BEST_TAG,
    DATASET_TAG,
    IMAGES_KEY,
    METRIC,
    MODEL_NAME_TAG,
    SPLIT_ARTIFACT,
    STATE_FILE,
    STORAGE_TAG,
    TRIAL_TAG,
)
from reid_tune.search.schema import SearchSpec
from reid_tune.search.space import load_spec, read_yaml, validation_split
from reid_tune.search.summary import SearchSummary, describe_search, summarize, summary_note, summary_tags
from reid_tune.search.trainable import SearchPaths, run_trial
from reid_tune.tracking.runs import SearchTracker, runs_view
from reid_tune.tracking.store import client_for, resolve_tracking_uri
from reid_tune.validation import ValidationSplit, write_split

_UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
DRIVER_CPUS = 0.01  # what a trial's Tune function holds while its TorchTrainer runs (Ray wants > 0)


# ---------------------------------------------------------------- Tune pieces


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Ray Tune distributions of the searched parameters (``int`` ranges are inclusive)."""
    make = {
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "int": lambda v: tune.randint(v[0], v[1] + 1),
        "choice": lambda v: tune.choice(list(v)),
    }
    return {name: make[p.kind](p.values) for name, p in spec.params.items() if p.searched}


def trainable(spec: SearchSpec, split: ValidationSplit) -> Any:
    """The Tune function with the spec and split bound; it barely uses a CPU itself (its Train workers do)."""
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec, split=split), {"cpu": DRIVER_CPUS})


def build_tuner(
    spec: SearchSpec,
    paths: SearchPaths,
    split: ValidationSplit,
    callbacks: list[Any],
    *,
    searcher: PruningOptunaSearch,
    resume: bool,
) -> Any:
    """A new Tuner for ``spec``, or the interrupted one restored from ``paths.root`` (with the searcher,
    scheduler and callbacks it was created with, in their saved state)."""
    if resume and tune.Tuner.can_restore(paths.root):
        return tune.Tuner.restore(
            paths.root, trainable(spec, split), resume_unfinished=True, resume_errored=False
        )
    return tune.Tuner(
        trainable(spec, split),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher,
            scheduler=build_scheduler(spec),
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=paths.experiment,
            storage_path=paths.storage,
            callbacks=callbacks,
            stop=ImageBudget(searcher, spec.baseline_points()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        ),
    )


def cluster_address(spec: SearchSpec) -> str | None:
    """The Ray cluster the search joins: ``resources.address``, else ``RAY_ADDRESS``; None: this machine."""
    return spec.resources.address or os.environ.get("RAY_ADDRESS")


def connect_ray(spec: SearchSpec) -> None:
    """Join the Ray cluster of ``resources.address`` or ``RAY_ADDRESS``, else start a local one sized
    for the trials (reuses a session already started in this process)."""
    if ray.is_initialized():
        return
    address = cluster_address(spec)
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    per_trial = spec.resources.workers * spec.resources.cpus_per_worker + DRIVER_CPUS
    start_local_ray(max(os.cpu_count() or 1, math.ceil(spec.search.max_concurrent_trials * per_trial)))


def start_local_ray(num_cpus: int) -> None:
    """A local Ray instance with its dashboard, which serves the state API that Ray Train needs to
    release finished worker groups, and the GPUs PyTorch sees (those :func:`check_runnable` counted).
    Its address goes into the environment the Ray processes inherit, so another Ray instance on the same
    machine cannot confuse the state API's auto-detection."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a local instance turns token authentication on by itself, and says so on every search
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # each trial's Tune function holds 0.01 CPU by design, so a small machine runs more Python workers than
    # its cores; without this Ray warns about it on every search
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(16, num_cpus)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=torch.cuda.device_count(),
        include_dashboard=True,
        dashboard_port=port,
        log_to_driver=False,
    )


def check_runnable(spec: SearchSpec, spec_file: Path) -> None:
    """One error at the file's line, before Ray starts or anything is written, for what would stall or
    fail every trial: more GPUs a trial than this machine has when no cluster is given (on a cluster,
    :class:`PendingWatch` warns instead: it may add nodes) and pretrained weights that cannot be had."""
    _, file = read_yaml(spec_file)
    if cluster_address(spec) is None:
        check_gpus(spec, file, torch.cuda.device_count())
    check_pretrained(spec, file)


# ---------------------------------------------------------------- the search's files and parent run


def _read_state(paths: SearchPaths) -> dict[str, str]:
    text = storage.read_text(paths.state)
    if text is None:
        raise ReidTuneError(f"{paths.root}: nothing to resume (no {STATE_FILE}); start it without --resume")
    return json.loads(text)


def start_tracking(
    spec: SearchSpec,
    spec_file: Path,
    paths: SearchPaths,
    split: ValidationSplit,
    *,
    resume: bool,
    tracking_uri: str | None,
) -> SearchTracker:
    """The search's MLflow parent run: created with the file and the split's CSVs, or reopened on resume."""
    if resume:
        state = _read_state(paths)
        client = client_for(tracking_uri or state["tracking_uri"])
        tracker = SearchTracker(client, spec.tracking_experiment, state["parent_run_id"])
        tracker.reopen()
        return tracker
    if storage.entries(paths.root):
        raise ReidTuneError(
            f"{paths.root}: already holds a search; pass --resume to continue it, or choose "
            f"another experiment name or storage"
        )
    uri = resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    client = client_for(uri)
    with tempfile.TemporaryDirectory(prefix="reid-tune-split-") as folder:
        files = write_split(split, Path(folder))
        tracker = SearchTracker.start(
            client,
            spec.tracking_experiment,
            search_id=uuid.uuid4().hex,
            run_name=spec.experiment,
            params=_search_params(spec),
            tags={DATASET_TAG: spec.data.train, MODEL_NAME_TAG: spec.model_name, STORAGE_TAG: paths.root},
            files=[(spec_file, ""), *((path, SPLIT_ARTIFACT) for path in files.values())],
        )
        tracker.describe(describe_search(spec))
    state = {"search_id": tracker.search_id, "parent_run_id": tracker.parent_run_id, "tracking_uri": uri}
    storage.write_text(paths.state, json.dumps(state, indent=2) + "\n")
    return tracker


def _search_params(spec: SearchSpec) -> dict[str, Any]:
    """The parent run's parameters: data, validation, fixed settings, space and search options."""
    flat = {f"data.{k}": v for k, v in spec.data.model_dump().items()}
    flat.update({f"validation.{k}": v for k, v in spec.validation.model_dump().items()})
    flat.update({f"train.{k}": v for k, v in spec.train.options().items()})
    flat["train.validate_every"] = spec.train.validate_every
    flat.update({f"space.{name}": param.describe() for name, param in spec.params.items()})
    flat.update({f"search.{k}": v for k, v in spec.search.model_dump().items()})
    flat.update({f"resources.{k}": v for k, v in spec.resources.model_dump().items()})
    return flat


# ---------------------------------------------------------------- the whole search


def smoke(spec: SearchSpec) -> SearchSpec:
    """The same search shrunk to CI size: two 10-iteration trials, validated every 5."""
    train = spec.train.model_copy(update={"train_iterations": 10, "validate_every": 5})
    scheduler = spec.search.scheduler.model_copy(update={"grace_period": 5})
    concurrent = min(spec.search.max_concurrent_trials, 2)
    search = spec.search.model_copy(
        update={"num_samples": 2, "max_concurrent_trials": concurrent, "scheduler": scheduler}
    )
    return spec.model_copy(update={"train": train, "search": search})


def quiet_start_up() -> None:
    """Keep the console for the search: Tune's legacy reporter at verbosity 0 (no experiment box, no
    TensorBoard hint: the runs are in MLflow), Tune's INFO lines and Optuna's study notices off.
    Warnings and errors still show; each setting is only a default."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_search(
    spec_file: str | Path,
    *,
    spec: SearchSpec | None = None,
    resume: bool = False,
    smoke_test: bool = False,
    tracking_uri: str | None = None,
) -> SearchSummary:
    """Run (or resume) the search of a search-space file (``spec``: the file, already loaded); returns
    its summary."""
    spec_file = Path(spec_file)
    quiet_start_up()
    spec = spec or load_spec(spec_file)
    if smoke_test:
        spec = smoke(spec)
    check_runnable(spec, spec_file)
    paths = SearchPaths(spec.storage, spec.experiment)
    split = validation_split(spec)
    tracker = start_tracking(spec, spec_file, paths, split, resume=resume, tracking_uri=tracking_uri)
    connect_ray(spec)
    searcher = build_searcher(spec)
    run = (tracker.client.tracking_uri, spec.tracking_experiment, tracker.parent_run_id, spec)
    callbacks = [
        MlflowLogger(*run, paths),
        SearchReport(*run, searcher),
        TrialTable(spec),
        PendingWatch(spec),
    ]
    tuner = build_tuner(spec, paths, split, callbacks, searcher=searcher, resume=resume)
    results = tuner.fit()
    interrupted = _unfinished(paths, spec)
    summary = dataclasses.replace(
        summarize(spec, results, tracker.parent_run_id, interrupted=interrupted),
        browse=runs_view(tracker.client.tracking_uri, tracker.experiment_id, space=spec_file,
                         space_uri=spec.mlflow.tracking_uri),
    )
    runs = tracker.trial_runs()
    tracker.mark(BEST_TAG, [summary.best.trial_id] if summary.best else [], runs)
    tracker.finish(
        tags=summary_tags(summary),
        note=summary_note(summary, spec, {r.data.tags[TRIAL_TAG]: r.info.run_name for r in runs}),
        status="KILLED" if interrupted else "FINISHED",
    )
    return summary


def _unfinished(paths: SearchPaths, spec: SearchSpec) -> bool:
    """Whether the saved search still has trials to run or to start (it was interrupted), rather than
    all its trials done or its ``max_images`` spent."""
    trials = ExperimentAnalysis(paths.root).trials
    if any(trial.status in _UNFINISHED for trial in trials):
        return True
    spent = sum((trial.last_result or {}).get(IMAGES_KEY, 0) for trial in trials)
    budget = spec.search.max_images
    return len(trials) < spec.search.num_samples and (budget is None or spent < budget)
