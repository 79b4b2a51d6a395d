"""The search: an Optuna-guided Ray Tune run of :func:`run_trial`, with ASHA, tracked in MLflow.

``run_search`` validates the file, checks the tracking store, draws the validation split, connects to
Ray, builds the Tuner (:func:`build_tuner`) or restores it (``resume``), and summarises the best
trial against the paper's settings on the same validation split.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from reid_tune.errors import ReidTuneError
from reid_tune.search import storage
from reid_tune.search.callbacks import MlflowLogger, TrialTable, matches_point
from reid_tune.search.space import SearchSpec, load_spec
from reid_tune.search.trainable import (
    METRIC,
    SPLIT_ARTIFACT,
    STATE_FILE,
    TIME_ATTR,
    SearchPaths,
    run_trial,
)
from reid_tune.tracking import DATASET_TAG, MODEL_NAME_TAG, SearchTracker, client_for, resolve_tracking_uri
from reid_tune.validation import ValidationSplit, write_split

_UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
STORAGE_TAG = "reid_tune.storage"  # on the parent run: the search's folder (or URI) in the storage
DRIVER_CPUS = 0.01  # what a trial's Tune function holds while its TorchTrainer runs (Ray wants > 0)


@dataclass(frozen=True)
class TrialSummary:
    """One trial's outcome: its sampled settings and best validation numbers."""

    trial_id: str
    status: str
    config: dict[str, Any]
    val_mAP: float | None
    val_rank1: float | None
    step: int | None


@dataclass(frozen=True)
class SearchSummary:
    """How a search ended: every trial, the best one, and the trial of the paper's settings."""

    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    interrupted: bool
    best: TrialSummary | None
    paper: TrialSummary | None


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


def build_searcher(spec: SearchSpec) -> Any:
    """Ray Tune's OptunaSearch with a seeded TPE (or random) sampler, starting from the given points."""
    seed = spec.search.seed
    sampler = (
        optuna.samplers.TPESampler(seed=seed)
        if spec.search.searcher == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    return OptunaSearch(sampler=sampler, points_to_evaluate=spec.start_points() or None)


def build_scheduler(spec: SearchSpec) -> Any:
    """ASHA on validation mAP with the training iteration as its clock, or None."""
    scheduler = spec.search.scheduler
    if scheduler.type == "none":
        return None
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=spec.train.train_iterations,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def trainable(spec: SearchSpec, split: ValidationSplit) -> Any:
    """The Tune function with the spec and split bound; it barely uses a CPU itself (its Train workers do)."""
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec, split=split), {"cpu": DRIVER_CPUS})


def build_tuner(
    spec: SearchSpec, paths: SearchPaths, split: ValidationSplit, callbacks: list[Any], *, resume: bool
) -> Any:
    """A new Tuner for ``spec``, or the interrupted one restored from ``paths.root``."""
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
            search_alg=build_searcher(spec),
            scheduler=build_scheduler(spec),
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=paths.experiment,
            storage_path=paths.storage,
            callbacks=callbacks,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        ),
    )


def connect_ray(spec: SearchSpec) -> None:
    """Join the Ray cluster of ``resources.address`` or ``RAY_ADDRESS``, else start a local one sized
    for the trials (reuses a session already started in this process)."""
    if ray.is_initialized():
        return
    address = spec.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    per_trial = spec.resources.workers * spec.resources.cpus_per_worker + DRIVER_CPUS
    start_local_ray(max(os.cpu_count() or 1, math.ceil(spec.search.max_concurrent_trials * per_trial)))


def start_local_ray(num_cpus: int) -> None:
    """A local Ray instance with its dashboard, which serves the state API that Ray Train needs to
    release finished worker groups. Its address goes into the environment the Ray processes inherit,
    so another Ray instance on the same machine cannot confuse the state API's auto-detection."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, log_to_driver=False
    )


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


# ---------------------------------------------------------------- summary


def _trial_summary(result: Any) -> TrialSummary:
    """Best validation numbers over a trial's reports (a ResultGrid entry)."""
    frame = result.metrics_dataframe
    best = (
        None
        if frame is None or METRIC not in frame or frame[METRIC].isna().all()
        else frame.loc[frame[METRIC].idxmax()]
    )
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    return TrialSummary(
        trial_id=trial_id,
        status="ERROR" if result.error else "TERMINATED",
        config=dict(result.config or {}),
        val_mAP=None if best is None else float(best[METRIC]),
        val_rank1=None if best is None else float(best["val_rank1"]),
        step=None if best is None else int(best[TIME_ATTR]),
    )


def summarize(spec: SearchSpec, results: Any, parent_run_id: str, *, interrupted: bool) -> SearchSummary:
    """Rank the trials by their best validation mAP; pick out the paper's settings."""
    trials = [_trial_summary(result) for result in results]
    scored = [t for t in trials if t.val_mAP is not None]
    paper = next((t for t in trials if matches_point(t.config, spec.paper_point())), None)
    return SearchSummary(
        experiment=spec.experiment,
        parent_run_id=parent_run_id,
        trials=trials,
        interrupted=interrupted,
        best=max(scored, key=lambda t: t.val_mAP, default=None),
        paper=paper,
    )


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


def run_search(
    spec_file: str | Path, *, resume: bool = False, smoke_test: bool = False, tracking_uri: str | None = None
) -> SearchSummary:
    """Run (or resume) the search of a search-space file; returns its summary."""
    spec_file = Path(spec_file)
    spec = load_spec(spec_file)
    if smoke_test:
        spec = smoke(spec)
    paths = SearchPaths(spec.storage, spec.experiment)
    split = spec.validation_split()
    tracker = start_tracking(spec, spec_file, paths, split, resume=resume, tracking_uri=tracking_uri)
    connect_ray(spec)
    logger = MlflowLogger(
        tracker.client.tracking_uri, spec.tracking_experiment, tracker.parent_run_id, spec, paths
    )
    tuner = build_tuner(spec, paths, split, [logger, TrialTable(spec)], resume=resume)
    results = tuner.fit()
    interrupted = _unfinished(paths, spec.search.num_samples)
    summary = summarize(spec, results, tracker.parent_run_id, interrupted=interrupted)
    tracker.finish(
        metrics=_summary_metrics(summary),
        tags=_summary_tags(summary),
        status="KILLED" if interrupted else "FINISHED",
    )
    return summary


def _unfinished(paths: SearchPaths, num_samples: int) -> bool:
    """Whether the saved search still has trials to run or to start (it was interrupted)."""
    trials = ExperimentAnalysis(paths.root).trials
    return len(trials) < num_samples or any(trial.status in _UNFINISHED for trial in trials)


def _summary_metrics(summary: SearchSummary) -> dict[str, float]:
    metrics = {}
    if summary.best is not None:
        metrics.update(best_val_mAP=summary.best.val_mAP, best_val_rank1=summary.best.val_rank1)
    if summary.paper is not None and summary.paper.val_mAP is not None:
        metrics.update(paper_val_mAP=summary.paper.val_mAP, paper_val_rank1=summary.paper.val_rank1)
    return metrics


def _summary_tags(summary: SearchSummary) -> dict[str, str]:
    tags = {"reid_tune.best_trial_id": summary.best.trial_id} if summary.best else {}
    if summary.paper is not None:
        tags["reid_tune.paper_trial_id"] = summary.paper.trial_id
    return tags
