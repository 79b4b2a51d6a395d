"""A search's MLflow runs: one parent run per search, one nested run per trial.

One process writes (the search driver, through :class:`SearchTracker`), so trials finishing at the
same time never contend for SQLite's lock. Runs are found again by tags, so a resumed search keeps
its parent run and never duplicates a trial's run. No Ray here; :mod:`reid_tune.search` feeds it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from reid_tune.search.keys import (
    BEST_METRIC,
    BEST_STEP_TAG,
    CHECKPOINT_ARTIFACTS,
    CMC_PLOT,
    CODE_TAG,
    KIND_TAG,
    NOTE_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SAMPLE_TIME,
    SEARCH_TAG,
    SYSTEM_CPU,
    TIME_ATTR,
    TRAIN_PREFIX,
    TRAINING_KIND,
    TRIAL_TAG,
    VAL_MAP,
    VALIDATION_ARTIFACTS,
    VALIDATION_FILE,
)
from reid_tune.tracking.plots import cmc_plot
from reid_tune.tracking.store import now_ms, resolve_tracking_uri
from reid_tune.tracking.versioning import code_version

_BATCH = 500  # metrics per log_batch call (MLflow allows 1000)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if new; a SQLite store keeps its artifacts beside the database
    (``mlruns/NAME``), not in whatever folder the search happens to run from. The experiment is tagged
    as model training, so MLflow 3's UI opens on its runs."""
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get(KIND_TAG) != TRAINING_KIND:
            client.set_experiment_tag(found.experiment_id, KIND_TAG, TRAINING_KIND)
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})


def _params(values: dict[str, Any]) -> list[Param]:
    """MLflow parameters of ``values``, sorted by name."""
    return [Param(key, str(value)) for key, value in sorted(values.items())]


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Log ``metrics`` in batches MLflow accepts."""
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH])


def _close(client: MlflowClient, run_id: str, *, tags: dict[str, str], note: str, status: str) -> None:
    """End a run with ``status``, its last tags and its description."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {**tags, NOTE_TAG: note}.items()])
    client.set_terminated(run_id, status=status)


def runs_view(tracking_uri: str, experiment_id: str, *, space: str | Path, space_uri: str | None) -> str:
    """Where to browse a search's runs table (MLflow 3's UI opens on its GenAI overview whatever the
    experiment's kind tag says): on a tracking server the page's URL; for a local store the ``reid-tune
    ui`` command that serves it, naming the store when the search file's (``space_uri``) is another."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"
    other = "" if resolve_tracking_uri(space_uri) == tracking_uri else f" --tracking-uri {tracking_uri}"
    return f"reid-tune ui {space}{other}"


class SearchTracker:
    """The MLflow side of one search: its parent run and the nested run of each trial."""

    def __init__(self, client: MlflowClient, experiment: str, parent_run_id: str) -> None:
        self.client, self.parent_run_id = client, parent_run_id
        self.experiment_id = _experiment_id(client, experiment)
        self.search_id = client.get_run(parent_run_id).data.tags[SEARCH_TAG]
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged_step: dict[str, int] = {}  # trial id -> last step whose metrics are logged
        self._best: dict[str, float] = {}  # trial id -> best validation mAP logged
        self._system_steps: dict[str, int] = {}  # trial id -> system samples logged

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, parent_run_id: str) -> SearchTracker:
        """The tracker of an existing search's parent run."""
        return cls(
            MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), experiment, parent_run_id
        )

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment: str,
        *,
        search_id: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        files: Iterable[tuple[Path, str]],
    ) -> SearchTracker:
        """Create the parent run of a new search, with its parameters, tags and files (path, artifact dir)."""
        run = client.create_run(
            _experiment_id(client, experiment),
            run_name=run_name,
            tags={**tags, SEARCH_TAG: search_id, ROLE_TAG: "search", CODE_TAG: code_version()},
        )
        client.log_batch(run.info.run_id, params=_params(params))
        for path, folder in files:
            client.log_artifact(run.info.run_id, str(path), folder)
        return cls(client, experiment, run.info.run_id)

    def reopen(self) -> None:
        """Mark the parent run running again (a resumed search)."""
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def trial_run(self, trial_id: str, *, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The run of ``trial_id`` (``name`` in the UI): created (nested under the search) or found
        again after a resume."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{SEARCH_TAG}` = '{self.search_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, VAL_MAP)
            self._logged_step[trial_id] = max((m.step for m in history), default=0)
            self._best[trial_id] = max((m.value for m in history), default=float("-inf"))
            system = self.client.get_metric_history(run_id, SYSTEM_CPU)
            self._system_steps[trial_id] = max((m.step + 1 for m in system), default=0)
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={
                    **tags,
                    SEARCH_TAG: self.search_id,
                    ROLE_TAG: "trial",
                    TRIAL_TAG: trial_id,
                    PARENT_TAG: self.parent_run_id,
                    CODE_TAG: code_version(),
                },
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=_params(params))
        self._runs[trial_id] = run_id
        return run_id

    def log_result(
        self, trial_id: str, step: int, records: list[dict[str, float]], validation: dict[str, float]
    ) -> None:
        """Per-iteration training statistics (``train/*``) and the validation numbers at ``step`` (named
        ``eval/*``, with ``eval/best_mAP`` the best so far). Steps already logged (re-reported after a resume
        from an older checkpoint) are skipped."""
        done = self._logged_step.get(trial_id, 0)
        if step <= done:
            return
        now = now_ms()
        metrics = [
            Metric(f"{TRAIN_PREFIX}{key}", float(value), now, int(record[TIME_ATTR]))
            for record in records
            if record[TIME_ATTR] > done
            for key, value in record.items()
            if key != TIME_ATTR
        ]
        metrics += [Metric(key, float(value), now, step) for key, value in validation.items()]
        if VAL_MAP in validation:
            self._best[trial_id] = max(self._best.get(trial_id, float("-inf")), validation[VAL_MAP])
            metrics.append(Metric(BEST_METRIC, self._best[trial_id], now, step))
        _log_metrics(self.client, self._runs[trial_id], metrics)
        self._logged_step[trial_id] = step

    def log_system(self, trial_id: str, samples: list[dict[str, float]]) -> None:
        """System samples of the trial's Train workers (``time`` in seconds and ``system/*`` values),
        stepped in order as MLflow's own system metrics are, so the run's System metrics tab shows them."""
        run_id = self._runs[trial_id]
        start = self._system_steps.get(trial_id, 0)
        metrics = [
            Metric(key, float(value), int(sample[SAMPLE_TIME] * 1000), start + i)
            for i, sample in enumerate(samples)
            for key, value in sample.items()
            if key != SAMPLE_TIME
        ]
        _log_metrics(self.client, run_id, metrics)
        self._system_steps[trial_id] = start + len(samples)

    def finish_trial(
        self, trial_id: str, best: Path | None, *, failed: bool, tags: dict[str, str], note: str
    ) -> None:
        """Log the best checkpoint folder's weights, validation embeddings and CMC plot, the trial's
        outcome tags and description; end the run."""
        run_id = self._runs[trial_id]
        if best is not None:
            log_checkpoint_folder(self.client, run_id, best)
        _close(self.client, run_id, tags=tags, note=note, status="FAILED" if failed else "FINISHED")

    def trial_runs(self) -> list[Run]:
        """The runs of the search's trials."""
        return self.client.search_runs(
            [self.experiment_id], f"tags.`{SEARCH_TAG}` = '{self.search_id}' and tags.`{ROLE_TAG}` = 'trial'"
        )

    def mark(self, tag: str, trial_ids: Iterable[str], runs: Iterable[Run]) -> None:
        """Set ``tag`` to "true" on the runs of ``trial_ids`` and remove it from the search's other trials
        (e.g. the best trial, which can change on ``--resume``); ``runs``: :meth:`trial_runs`, just read."""
        chosen = set(trial_ids)
        for run in runs:
            if run.data.tags.get(TRIAL_TAG) in chosen:
                self.client.set_tag(run.info.run_id, tag, "true")
            elif tag in run.data.tags:
                self.client.delete_tag(run.info.run_id, tag)

    def trial_histories(self, keys: Iterable[str]) -> dict[str, tuple[str, dict[str, list[Metric]]]]:
        """Each trial of the search: its run id and the full history of each metric in ``keys``."""
        return {
            run.data.tags[TRIAL_TAG]: (
                run.info.run_id,
                {key: self.client.get_metric_history(run.info.run_id, key) for key in keys},
            )
            for run in self.trial_runs()
        }

    def log_parent_files(self, paths: Iterable[Path], folder: str) -> None:
        """Files into the parent run's artifact ``folder``, replacing earlier copies."""
        for path in paths:
            self.client.log_artifact(self.parent_run_id, str(path), folder)

    def describe(self, note: str) -> None:
        """The parent run's description (what is searched; at the end, the result too)."""
        self.client.set_tag(self.parent_run_id, NOTE_TAG, note)

    def finish(self, *, tags: dict[str, str], note: str, status: str) -> None:
        """The search's summary on the parent run, as tags and its description (a summary, not metric
        charts); the run ends with ``status`` (FINISHED, KILLED, FAILED)."""
        _close(self.client, self.parent_run_id, tags=tags, note=note, status=status)


def log_checkpoint_folder(client: MlflowClient, run_id: str, folder: Path) -> None:
    """A reported checkpoint folder as artifacts: weights + options, embeddings + CMC (plot too)."""
    summary = json.loads((folder / VALIDATION_FILE).read_text())
    for path in folder.iterdir():
        target = (
            CHECKPOINT_ARTIFACTS
            if path.suffix in (".pt", ".json") and path.name != VALIDATION_FILE
            else VALIDATION_ARTIFACTS
        )
        client.log_artifact(run_id, str(path), target)
    client.set_tag(run_id, BEST_STEP_TAG, str(summary[TIME_ATTR]))
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / CMC_PLOT
        cmc_plot(summary["CMC"], plot, title=f"validation CMC at iteration {summary[TIME_ATTR]}")
        client.log_artifact(run_id, str(plot), VALIDATION_ARTIFACTS)
