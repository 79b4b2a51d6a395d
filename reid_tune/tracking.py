"""MLflow tracking of a search: one parent run per search, one nested run per trial, and the registry.

One process writes (the search driver, through :class:`SearchTracker`), so trials finishing at the
same time never contend for SQLite's lock. Runs are found again by tags, so a resumed search keeps
its parent run and never duplicates a trial's run. No Ray here; :mod:`reid_tune.search` feeds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

import reid_tune
from reid_tune.errors import ReidTuneError

SEARCH_TAG = "reid_tune.search"  # the search id, on the parent run and every trial run
ROLE_TAG = "reid_tune.role"  # "search" or "trial"
TRIAL_TAG = "reid_tune.trial_id"
DATASET_TAG = "reid_tune.dataset"
CODE_TAG = "reid_tune.code_version"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI
KIND_TAG = "mlflow.experimentKind"  # the experiment view MLflow 3's UI opens on
TRAINING_KIND = "custom_model_development"  # its runs table, not the GenAI overview
MODEL_NAME_TAG = "reid_tune.registered_model"  # on the parent run: the name promote registers under
SYSTEM_CPU = "system/cpu_utilization_percentage"  # one of MLflow's own system metric names
BEST_STEP_TAG = "reid_tune.best_step"  # on a trial run: the iteration of its best validation
VAL_MAP = "val/mAP"  # validation metrics under val/, training statistics under train/
VAL_RANK1_NAME = "val/rank1"
BEST_METRIC = "val/best_mAP"  # a trial's best validation mAP so far, what promote ranks by
CHECKPOINT_ARTIFACTS = "checkpoint"  # weights (checkpoint-NNNNNN.pt) and config.json of the best step
VALIDATION_ARTIFACTS = "validation"  # val_query.h5, val_gallery.h5, validation.json, cmc.png
MODEL_ARTIFACT = "model"  # the logged model's name: a pyfunc wrapping the checkpoint
TRACKING_ENV = "MLFLOW_TRACKING_URI"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registered versions made from it
_BATCH = 500  # metrics per log_batch call (MLflow allows 1000)


def code_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(reid_tune.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return reid_tune.__version__
    return f"{reid_tune.__version__}+g{commit}"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute tracking URI: MLflow's default (``sqlite:///mlflow.db`` here) or ``uri`` with a
    relative SQLite path made absolute (Ray workers and ``mlflow ui`` run elsewhere)."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_tracking(uri: str, *, timeout: float = 5.0) -> None:
    """Fail early and clearly when a tracking server does not answer (before any trial runs)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ReidTuneError(
            f"tracking URI {uri}: the MLflow server does not answer ({reason}); "
            f"start it (mlflow server ...) or pass another --tracking-uri"
        ) from None


def quiet_mlflow() -> None:
    """No artifact progress bars, database set-up or model-logging notices on the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.models.signature").setLevel(logging.WARNING)  # "Running the predict function"


def client_for(uri: str | None) -> MlflowClient:
    """A client of the resolved ``uri`` after checking the server answers (MLflow kept quiet)."""
    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


@contextlib.contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for a block: MLflow resolves ``models:/`` URIs
    (registering, downloading) partly through it, whatever URI a client or call was given. MLflow's own
    helper restores the URI but unsets ``MLFLOW_TRACKING_URI``, so the variable is restored here."""
    env = os.environ.get(TRACKING_ENV)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ[TRACKING_ENV] = env


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(key, str(value)) for key, value in sorted(values.items())]


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH])


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        """Per-iteration training statistics (``train/*``), the validation numbers at ``step`` (named
        ``val/*``, with ``val/best_mAP`` the best so far) and system samples (``system/*``, stepped by
        sample). Steps already logged (re-reported after a resume from an older checkpoint) are skipped.
        """
        done = self._logged_step.get(trial_id, 0)
        if step <= done:
            return
        now = _now_ms()
        metrics = [
            Metric(f"train/{key}", float(value), now, int(record["step"]))
            for record in records
            if record["step"] > done
            for key, value in record.items()
            if key != "step"
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
            Metric(key, float(value), int(sample["time"] * 1000), start + i)
            for i, sample in enumerate(samples)
            for key, value in sample.items()
            if key != "time"
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
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {**tags, NOTE_TAG: note}.items()])
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def trial_runs(self) -> list[Run]:
        """The runs of the search's trials."""
        return self.client.search_runs(
            [self.experiment_id], f"tags.`{SEARCH_TAG}` = '{self.search_id}' and tags.`{ROLE_TAG}` = 'trial'"
        )

    def mark(self, tag: str, trial_ids: Iterable[str]) -> None:
        """Set ``tag`` to "true" on the runs of ``trial_ids`` and remove it from the search's other trials
        (e.g. the best trial, which can change on ``--resume``)."""
        chosen = set(trial_ids)
        for run in self.trial_runs():
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
        self.client.log_batch(
            self.parent_run_id, tags=[RunTag(k, v) for k, v in {**tags, NOTE_TAG: note}.items()]
        )
        self.client.set_terminated(self.parent_run_id, status=status)


def log_checkpoint_folder(client: MlflowClient, run_id: str, folder: Path) -> None:
    """A reported checkpoint folder as artifacts: weights + options, embeddings + CMC (plot too)."""
    summary = json.loads((folder / "validation.json").read_text())
    for path in folder.iterdir():
        target = (
            CHECKPOINT_ARTIFACTS
            if path.suffix in (".pt", ".json") and path.name != "validation.json"
            else VALIDATION_ARTIFACTS
        )
        client.log_artifact(run_id, str(path), target)
    client.set_tag(run_id, BEST_STEP_TAG, str(summary["step"]))
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "cmc.png"
        cmc_plot(summary["CMC"], plot, title=f"validation CMC at iteration {summary['step']}")
        client.log_artifact(run_id, str(plot), VALIDATION_ARTIFACTS)


def cmc_plot(cmc: list[float], path: Path, *, title: str, ranks: int = 20) -> None:
    """Save the CMC curve (first ``ranks`` ranks) as a PNG (see :func:`cmc_figure`)."""
    import matplotlib.pyplot as plt

    fig = cmc_figure(cmc, title=title, ranks=ranks)
    fig.savefig(path)
    plt.close(fig)


def cmc_figure(cmc: list[float], *, title: str, ranks: int = 20) -> Any:
    """The CMC curve of the first ``ranks`` ranks, its y-axis fitted to the values and rank-1/5/10
    written on it, so that curves near the top still show their differences."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a driver or on CI
    import matplotlib.pyplot as plt

    shown = [100 * v for v in cmc[:ranks]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(range(1, len(shown) + 1), shown, marker=".")
    for rank in (1, 5, 10):
        if rank <= len(shown):
            ax.annotate(
                f"rank-{rank}: {shown[rank - 1]:.1f}%",
                (rank, shown[rank - 1]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
            )
    low, high = min(shown), max(shown)
    margin = max(2.0, 0.1 * (high - low))
    ax.set(
        xlabel="rank",
        ylabel="matching rate (%)",
        title=title,
        xlim=(0.5, ranks + 0.5),
        xticks=[1, *range(5, ranks + 1, 5)],
        ylim=(max(0.0, low - margin), min(100.0, high + margin)),
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_champion(
    client: MlflowClient,
    run: Run,
    checkpoint: Path,
    *,
    example: list[str],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> str:
    """Log ``checkpoint`` as an MLflow 3 model of the trial ``run`` (a pyfunc that embeds image paths,
    with its signature and ``example``), attach the test ``metrics`` to it and return its model id.
    Client calls only: MLflow's process-wide state (tracking URI, active run) is left alone."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    model = client.create_logged_model(
        run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id, tags=tags,
        params=dict(run.data.params), model_type="reid-embedder",
    )  # fmt: skip
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=0)])
    with tempfile.TemporaryDirectory(prefix="reid-model-") as tmp:
        mlflow.pyfunc.save_model(
            Path(tmp) / MODEL_ARTIFACT,
            python_model=str(Path(__file__).with_name("serving.py")),
            artifacts={"checkpoint": str(checkpoint)},
            input_example=example,
            pip_requirements=[f"reid-tune=={reid_tune.__version__}"],
            mlflow_model=Model(
                artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                model_id=model.model_id,
            ),
        )  # fmt: skip
        client.log_model_artifacts(model.model_id, str(Path(tmp) / MODEL_ARTIFACT))
    now = _now_ms()
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0, model_id=model.model_id) for k, v in metrics.items()]
    )
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def register_model(
    client: MlflowClient,
    name: str,
    model_id: str,
    *,
    description: str,
    tags: dict[str, str],
    alias: str = "champion",
) -> str:
    """Register the logged model ``model_id`` as a new version of ``name`` (earlier versions stay), linked
    both ways as MLflow's ``register_model`` links them (without its console lines), with a description
    and tags, and point ``alias`` at it; returns the version."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="person re-identification embedders (reid-tune)")
    with _global_uri(client.tracking_uri):  # the registry resolves the source models:/<id> through it
        version = client.create_model_version(
            name, f"models:/{model_id}", tags=tags, description=description, model_id=model_id
        ).version
    listed = json.loads(client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
    versions = json.dumps([*listed, {"name": name, "version": int(version)}])
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: versions})
    client.set_registered_model_alias(name, alias, str(version))
    return str(version)


def download_checkpoint(model_uri: str, *, tracking_uri: str | None = None) -> Path:
    """The checkpoint file of a registered model (e.g. ``models:/NAME@champion``), downloaded locally.

    Only the registry is needed: the model's artifacts hold the checkpoint with its architecture and
    preprocessing options, which :func:`reid_tune.train.load_model` rebuilds.
    """
    quiet_mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    try:
        with _global_uri(uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri,
                    dst_path=tempfile.mkdtemp(prefix="reid-model-"),
                    tracking_uri=uri,
                    registry_uri=uri,
                )
            )
    except mlflow.exceptions.MlflowException as err:
        raise ReidTuneError(f"--model {model_uri}: {err.message.splitlines()[0]}") from None
    found = sorted(local.rglob("checkpoint-*.pt"))
    if not found:
        raise ReidTuneError(f"--model {model_uri}: no checkpoint-*.pt among its artifacts")
    return found[-1]
