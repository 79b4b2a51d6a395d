"""Tune callbacks on the search driver: MLflow logging of every trial, the live trial table, and a
warning when trials wait for resources the Ray cluster does not have.

Both run in the one driver process, which sees every trial's results and its kept checkpoints;
the trials themselves know nothing of MLflow.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from rich.console import Console
from rich.live import Live
from rich.table import Table

from reid_tune.search import storage
from reid_tune.search.algorithms import PruningOptunaSearch, is_baseline, matches_point
from reid_tune.search.analysis import TrialRecord, reports_from_history, write_analysis
from reid_tune.search.keys import (
    ANALYSIS_ARTIFACTS,
    BASELINE_TAG,
    DATASET_TAG,
    FALLBACKS_KEY,
    METRIC,
    OUTCOME_TAG,
    PAPER_TAG,
    SHORT_NAMES,
    STOPPED_AT_TAG,
    SYSTEM_KEY,
    TIME_ATTR,
    TRAIN_LOG_KEY,
    VAL_MAP,
    VAL_PREFIX,
    VAL_RANK1,
    VAL_RANK1_NAME,
    VALIDATION_FILE,
    VALIDATION_KEYS,
)
from reid_tune.search.schema import SearchSpec
from reid_tune.search.trainable import SearchPaths, trial_config
from reid_tune.tracking.runs import SearchTracker


def best_checkpoint(paths: SearchPaths, trial_id: str) -> tuple[str, dict[str, Any]] | None:
    """The kept checkpoint folder (in the storage) of a trial with the highest validation mAP, and its
    validation.json."""
    run = storage.join(paths.train_runs, trial_id)
    scored = [
        (json.loads(text), folder)
        for folder in (storage.join(run, name) for name in storage.entries(run))
        if (text := storage.read_text(storage.join(folder, VALIDATION_FILE))) is not None
    ]
    if not scored:
        return None
    summary, folder = max(scored, key=lambda item: (item[0]["mAP"], item[0][TIME_ATTR]))
    return folder, summary


class _ParentRunCallback(tune.Callback):
    """A driver callback that writes to the search's MLflow runs; Tune pickles callbacks (and restores
    them on resume), so the MLflow client is made in ``setup``."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, spec: SearchSpec) -> None:
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.spec = spec
        self.tracker: SearchTracker | None = None

    def setup(self, **info: Any) -> None:
        self.tracker = SearchTracker.open(self.tracking_uri, self.experiment, self.parent_run_id)


class MlflowLogger(_ParentRunCallback):
    """Logs each trial into its nested MLflow run: parameters, per-iteration statistics, validation
    mAP/CMC per validation and, when it ends, its best checkpoint with embeddings and CMC plot."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        spec: SearchSpec,
        paths: SearchPaths,
    ) -> None:
        super().__init__(tracking_uri, experiment, parent_run_id, spec)
        self.paths = paths

    def _open(self, trial: Trial, trials: list[Trial]) -> str:
        cfg = trial_config(self.spec, trial.config)
        params = {**cfg.to_dict(), "decay_start": trial.config.get("decay_start"), "trial_id": trial.trial_id}
        tags = {
            DATASET_TAG: self.spec.data.train,
            PAPER_TAG: str(matches_point(trial.config, self.spec.paper_point())).lower(),
            BASELINE_TAG: str(is_baseline(trial.config, self.spec)).lower(),
        }
        return self.tracker.trial_run(trial.trial_id, name=run_name(trial, trials), params=params, tags=tags)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._open(trial, trials)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        run_id = self._open(trial, trials)
        for tag, value in json.loads(result.get(FALLBACKS_KEY) or "{}").items():  # e.g. a failed CUDA graph
            self.tracker.client.set_tag(run_id, tag, value)
        if result.get(SYSTEM_KEY):
            self.tracker.log_system(trial.trial_id, json.loads(result[SYSTEM_KEY]))
        if METRIC not in result:
            return
        validation = {mlflow_name(key): result[key] for key in VALIDATION_KEYS.values()}
        records = json.loads(result.get(TRAIN_LOG_KEY, "[]"))
        self.tracker.log_result(trial.trial_id, int(result[TIME_ATTR]), records, validation)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, trials, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, trials, failed=True)

    def _finish(self, trial: Trial, trials: list[Trial], *, failed: bool) -> None:
        self._open(trial, trials)
        best = best_checkpoint(self.paths, trial.trial_id)
        trained = int((trial.last_result or {}).get(TIME_ATTR, 0))
        budget = self.spec.train.train_iterations
        outcome = "failed" if failed else "full_budget" if trained >= budget else "stopped_early"
        tags = {OUTCOME_TAG: outcome} | ({} if outcome == "full_budget" else {STOPPED_AT_TAG: str(trained)})
        note = trial_note(self.spec, trial, run_name(trial, trials), outcome, trained, best and best[1])
        if best is None:
            self.tracker.finish_trial(trial.trial_id, None, failed=failed, tags=tags, note=note)
            return
        with storage.local_copy(best[0]) as folder:
            self.tracker.finish_trial(trial.trial_id, folder, failed=failed, tags=tags, note=note)


def run_name(trial: Trial, trials: list[Trial]) -> str:
    """A trial's MLflow run name: its number in the search, then its Ray trial id (``t03-3f438151``),
    so the runs sort in trial order and still name the Ray trial."""
    return f"t{trials.index(trial) + 1:02d}-{trial.trial_id}" if trial in trials else trial.trial_id


def mlflow_name(key: str) -> str:
    """The MLflow name of a reported validation number: ``val_mAP`` -> ``eval/mAP``."""
    return VAL_PREFIX + key.removeprefix("val_")


def describe_settings(config: dict[str, Any]) -> str:
    """The searched values in a line: ``P=18 K=4 margin=soft lr=3.00e-04 ...``."""
    return " ".join(f"{SHORT_NAMES.get(k, k)}={short(v)}" for k, v in config.items())


def trial_note(
    spec: SearchSpec,
    trial: Trial,
    name: str,
    outcome: str,
    trained: int,
    validation: dict[str, Any] | None,
) -> str:
    """A trial run's description: what it ran, on which data, how it ended and its best validation."""
    budget = spec.train.train_iterations
    ended = {
        "full_budget": f"Trained its full budget of {budget} iterations.",
        "stopped_early": f"Stopped early by the search at iteration {trained} of {budget}.",
        "failed": f"Failed after {trained} of {budget} iterations (Ray's error file: {trial.path}).",
    }[outcome]
    role = (
        " It runs the paper's settings (a baseline: never stopped early)."
        if matches_point(trial.config, spec.paper_point())
        else " A baseline of the search (never stopped early)."
        if is_baseline(trial.config, spec)
        else ""
    )
    result = (
        "No validation."
        if validation is None
        else f"Best validation mAP {validation['mAP']:.2%} (rank-1 {validation['rank-1']:.2%}) at iteration "
        f"{validation[TIME_ATTR]}, on the search's {spec.validation.identities} held-out training identities."
    )
    return (
        f"Trial {name} of search {spec.experiment} (Ray trial {trial.trial_id}): "
        f"{describe_settings(trial.config)}; trained on {spec.data.train}.{role}\n\n{ended} {result}"
    )


class SearchReport(_ParentRunCallback):
    """Keeps the parent run's search-level analysis (``search/``: history, importance and parallel
    coordinates plots, trials.csv) current: redrawn whenever a trial ends, and once more at the end.

    It reads the trials' validations from MLflow (written by :class:`MlflowLogger`, which runs first),
    their status from Tune and their Optuna states from the searcher; Tune pickles this callback with
    the searcher, so both are restored together on ``--resume``.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        spec: SearchSpec,
        searcher: PruningOptunaSearch,
    ) -> None:
        super().__init__(tracking_uri, experiment, parent_run_id, spec)
        self.searcher = searcher
        self.searched = [name for name, param in spec.params.items() if param.searched]
        self._ended: dict[str, str] = {}  # trial id -> TERMINATED or ERROR, before Tune sets it

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._ended[trial.trial_id] = Trial.TERMINATED
        self.refresh(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._ended[trial.trial_id] = Trial.ERROR
        self.refresh(trials)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.refresh(trials)

    def records(self, trials: list[Trial]) -> list[TrialRecord]:
        """What the analysis needs of every trial."""
        histories = self.tracker.trial_histories((VAL_MAP, VAL_RANK1_NAME))
        return [self._record(trial, *histories.get(trial.trial_id, ("", {}))) for trial in trials]

    def _record(self, trial: Trial, run_id: str, history: dict[str, list[Any]]) -> TrialRecord:
        optuna_trial = self.searcher.optuna_trial(trial.trial_id)
        return TrialRecord(
            trial_id=trial.trial_id,
            run_id=run_id,
            params={name: trial.config.get(name) for name in self.searched},
            batch_size=trial_config(self.spec, trial.config).batch_size,
            reports=reports_from_history(history.get(VAL_MAP, []), history.get(VAL_RANK1_NAME, [])),
            tune_status=self._ended.get(trial.trial_id, trial.status),
            optuna_state="" if optuna_trial is None else optuna_trial.state.name,
            baseline=is_baseline(trial.config, self.spec),
            budget=self.spec.train.train_iterations,
        )

    def refresh(self, trials: list[Trial]) -> None:
        """Redraw the analysis and replace the parent run's copy; a failure warns, the search goes on."""
        try:
            self._refresh(trials)
        except Exception as err:  # noqa: BLE001 - a plot or an upload must not end the search
            warnings.warn(f"search analysis not refreshed: {type(err).__name__}: {err}", stacklevel=2)

    def _refresh(self, trials: list[Trial]) -> None:
        with tempfile.TemporaryDirectory(prefix="reid-search-") as folder:
            paths = write_analysis(
                self.records(trials),
                self.searcher.study,
                Path(folder),
                title=f"search {self.spec.experiment}",
            )
            self.tracker.log_parent_files(paths, ANALYSIS_ARTIFACTS)


class TrialTable(tune.Callback):
    """The trials as the search goes: on a terminal a live table (status, sampled settings, iteration,
    validation numbers); otherwise (a log file, CI) a progress line every ``line_every_s`` seconds and the
    final table."""

    def __init__(self, spec: SearchSpec, *, refresh_s: float = 1.0, line_every_s: float = 30.0) -> None:
        self.columns = [name for name, param in spec.params.items() if param.searched]
        self.refresh_s, self.line_every_s, self._shown = refresh_s, line_every_s, 0.0
        self.console: Console | None = None
        self.live: Live | None = None

    def setup(self, **info: Any) -> None:
        self.console = wide_console()
        self._shown = time.monotonic()
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        every = self.refresh_s if self.live is not None else self.line_every_s
        if self.console is None or time.monotonic() - self._shown < every:
            return
        self._shown = time.monotonic()
        if self.live is not None:
            self.live.update(self.table(trials), refresh=True)
        else:
            self.console.print(progress_line(trials), highlight=False)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Called when the search ends or is interrupted: draw the final state, stop redrawing."""
        if self.live is not None:
            self.live.update(self.table(trials), refresh=True)
            self.live.stop()
            self.live = None
        elif self.console is not None:
            self.console.print(self.table(trials))
        self.console = None

    def table(self, trials: list[Trial]) -> Table:
        """The current state of every trial."""
        table = Table(title="trials", title_justify="left", pad_edge=False)
        for name in ["trial", "status", *(SHORT_NAMES[c] for c in self.columns), "iter", "mAP", "R1", "best"]:
            table.add_column(name, justify="left" if name in ("trial", "status") else "right")
        for trial in trials:
            last = trial.last_result or {}
            table.add_row(
                run_name(trial, trials),
                trial.status.lower(),
                *(short(trial.config.get(name)) for name in self.columns),
                short(last.get(TIME_ATTR)),
                percent(last.get(METRIC)),
                percent(last.get(VAL_RANK1)),
                percent(best_mAP(trial)),
            )
        return table


class PendingWatch(tune.Callback):
    """Warns once when a trial has run ``after_s`` seconds without a result while no node of the Ray
    cluster, nor any node type its autoscaler may add, can hold one of its Train workers: such a trial
    waits for ever, silently (a search without a cluster fails at start instead: checks.check_gpus).

    The Tune trial itself holds almost nothing, so it runs; its TorchTrainer is what waits."""

    def __init__(self, spec: SearchSpec, *, after_s: float = 60.0) -> None:
        self.worker = {"CPU": spec.resources.cpus_per_worker, "GPU": spec.resources.gpus_per_worker}
        self.after_s = after_s
        self._reported: set[str] = set()
        self._since: dict[str, float] = {}  # trial id -> when it was first seen running without a result
        self._looked, self._warned = -math.inf, False

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self._reported.add(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        waiting = [t for t in trials if t.status == Trial.RUNNING and t.trial_id not in self._reported]
        waited = max((now - self._since.setdefault(t.trial_id, now) for t in waiting), default=-math.inf)
        if self._warned or waited < self.after_s or now - self._looked < self.after_s:
            return
        self._looked = now
        offer = ClusterOffer.now()
        if not offer.holds(self.worker):
            self._warned = True
            print(f"warning: {offer.refusal(self.worker, waited)}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ClusterOffer:
    """What a Ray cluster has for one worker: the resources of its nodes and of its autoscaler's node
    types (where Ray publishes them: autoscaler v2), by name."""

    nodes: list[dict[str, float]]
    node_types: dict[str, dict[str, float]]

    @classmethod
    def now(cls) -> ClusterOffer:
        """The cluster this process is connected to, now."""
        config = ray._private.state.state.get_cluster_config()
        groups = config.node_group_configs if config is not None else []
        return cls(
            [node["Resources"] for node in ray.nodes() if node["Alive"]],
            {group.name: dict(group.resources) for group in groups},
        )

    def holds(self, bundle: dict[str, float]) -> bool:
        """Whether some node, or some node type, has every resource of ``bundle``."""
        offers = [*self.nodes, *self.node_types.values()]
        return any(all(offer.get(key, 0) >= amount for key, amount in bundle.items()) for offer in offers)

    def refusal(self, bundle: dict[str, float], waited: float) -> str:
        """Why trials wait: what one worker asks for, and what the nodes and node types have."""
        nodes = Counter(_amounts(node, bundle) for node in self.nodes)
        types = ", ".join(f"{name} ({_amounts(offer, bundle)})" for name, offer in self.node_types.items())
        return (
            f"trials have waited {waited:.0f} s for Ray Train workers of {_amounts(bundle, bundle)} each "
            f"(resources.cpus_per_worker, resources.gpus_per_worker), which no node of the cluster has: "
            f"its nodes: {', '.join(f'{n} x ({amounts})' for amounts, n in nodes.items()) or 'none'}; "
            f"autoscaler node types: {types or 'none published'}; lower them in the search file or add "
            f"nodes that have them (ignore this while nodes are still starting)"
        )


def _amounts(resources: dict[str, float], bundle: dict[str, float]) -> str:
    """The amounts of ``bundle``'s resources in ``resources``, e.g. ``6 CPU, 0.5 GPU``."""
    return ", ".join(f"{resources.get(key, 0):g} {key}" for key in bundle)


def best_mAP(trial: Trial) -> float | None:
    """A trial's best validation mAP so far (None before its first validation)."""
    return trial.metric_analysis.get(METRIC, {}).get("max")


def progress_line(trials: list[Trial]) -> str:
    """The search in one line: trials by status, and the best validation mAP so far with its trial."""
    counts = Counter(trial.status.lower() for trial in trials)
    states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    scored = [t for t in trials if best_mAP(t) is not None]
    best = max(scored, key=best_mAP, default=None)
    leader = "" if best is None else f"; best val mAP {best_mAP(best):.1%} ({run_name(best, trials)})"
    return f"{time.strftime('%H:%M:%S')} trials: {states}{leader}"


def wide_console() -> Console:
    """A console for tables: the terminal's width, or 120 columns when writing to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def short(value: Any) -> str:
    """A setting in a few characters."""
    if isinstance(value, float):
        return f"{value:.3g}" if 1e-2 <= abs(value) < 1e3 else f"{value:.2e}"
    return "" if value is None else str(value)


def percent(value: float | None) -> str:
    """A rate as a percentage, or nothing."""
    return "" if value is None else f"{value:.1%}"
