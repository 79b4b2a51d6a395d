"""MLflow tracking of a search: one parent run per search, one nested run per trial, and the registry.

One process writes (the search driver, through :class:`SearchTracker`), so trials finishing at the
same time never contend for SQLite's lock. Runs are found again by tags, so a resumed search keeps
its parent run and never duplicates a trial's run. No Ray here; :mod:`reid_tune.search` feeds it.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import reid_tune
from reid_tune.errors import ReidTuneError

SEARCH_TAG = "reid_tune.search"  # the search id, on the parent run and every trial run
ROLE_TAG = "reid_tune.role"  # "search" or "trial"
TRIAL_TAG = "reid_tune.trial_id"
DATASET_TAG = "reid_tune.dataset"
CODE_TAG = "reid_tune.code_version"
PARENT_TAG = "mlflow.parentRunId"
MODEL_NAME_TAG = "reid_tune.registered_model"  # on the parent run: the name promote registers under
BEST_METRIC = "best_val_mAP"  # a trial's best validation mAP, what promote ranks by
CHECKPOINT_ARTIFACTS = "checkpoint"  # weights (checkpoint-NNNNNN.pt) and config.json of the best step
VALIDATION_ARTIFACTS = "validation"  # val_query.h5, val_gallery.h5, validation.json, cmc.png
MODEL_ARTIFACT = "model"  # the registered MLflow model (a pyfunc wrapping the checkpoint)
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


def client_for(uri: str | None) -> MlflowClient:
    """A client of the resolved ``uri`` after checking the server answers."""
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment ``name``, created if new; a SQLite store keeps its artifacts beside the database
    (``mlruns/NAME``), not in whatever folder the search happens to run from."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


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

    def trial_run(self, trial_id: str, *, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The run of ``trial_id``: created (nested under the search) or found again after a resume."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{SEARCH_TAG}` = '{self.search_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "step")
            self._logged_step[trial_id] = max((m.step for m in history), default=0)
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=trial_id,
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
        """Per-iteration training statistics (``train/*``) and the validation numbers at ``step``.

        Steps already logged (re-reported after a resume from an older checkpoint) are skipped.
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
        metrics.append(Metric("step", float(step), now, step))
        _log_metrics(self.client, self._runs[trial_id], metrics)
        self._logged_step[trial_id] = step

    def finish_trial(self, trial_id: str, best: Path | None, *, failed: bool) -> None:
        """Log the best checkpoint folder's weights, validation embeddings and CMC plot; end the run."""
        run_id = self._runs[trial_id]
        if best is not None:
            log_checkpoint_folder(self.client, run_id, best)
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def trial_histories(self, keys: Iterable[str]) -> dict[str, tuple[str, dict[str, list[Metric]]]]:
        """Each trial of the search: its run id and the full history of each metric in ``keys``."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{SEARCH_TAG}` = '{self.search_id}' and tags.`{ROLE_TAG}` = 'trial'"
        )
        return {
            run.data.tags[TRIAL_TAG]: (
                run.info.run_id,
                {key: self.client.get_metric_history(run.info.run_id, key) for key in keys},
            )
            for run in runs
        }

    def log_parent_files(self, paths: Iterable[Path], folder: str) -> None:
        """Files into the parent run's artifact ``folder``, replacing earlier copies."""
        for path in paths:
            self.client.log_artifact(self.parent_run_id, str(path), folder)

    def finish(self, *, metrics: dict[str, float], tags: dict[str, str], status: str) -> None:
        """The search's summary on the parent run, which ends with ``status`` (FINISHED, KILLED, FAILED)."""
        now = _now_ms()
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.client.set_terminated(self.parent_run_id, status=status)


def log_checkpoint_folder(client: MlflowClient, run_id: str, folder: Path) -> None:
    """A reported checkpoint folder as artifacts: weights + options, embeddings + CMC (plot too)."""
    summary = json.loads((folder / "validation.json").read_text())
    now = _now_ms()
    client.log_batch(
        run_id,
        metrics=[
            Metric(BEST_METRIC, summary["mAP"], now, summary["step"]),
            Metric("best_val_rank1", summary["rank-1"], now, summary["step"]),
            Metric("best_step", summary["step"], now, summary["step"]),
        ],
    )
    for path in folder.iterdir():
        target = (
            CHECKPOINT_ARTIFACTS
            if path.suffix in (".pt", ".json") and path.name != "validation.json"
            else VALIDATION_ARTIFACTS
        )
        client.log_artifact(run_id, str(path), target)
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "cmc.png"
        cmc_plot(summary["CMC"], plot, title=f"validation CMC at iteration {summary['step']}")
        client.log_artifact(run_id, str(plot), VALIDATION_ARTIFACTS)


def cmc_plot(cmc: list[float], path: Path, *, title: str, ranks: int = 50) -> None:
    """Save the CMC curve (first ``ranks`` ranks) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a driver or on CI
    import matplotlib.pyplot as plt

    shown = cmc[:ranks]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(range(1, len(shown) + 1), [100 * v for v in shown], marker=".")
    ax.set(xlabel="rank", ylabel="matching rate (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class ReidEmbedder(mlflow.pyfunc.PythonModel):
    """The registered model: a reid-tune checkpoint; ``predict`` embeds a list of image files."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from reid_tune.train import load_model

        self.model, self.cfg = load_model(Path(context.artifacts["checkpoint"]))

    def predict(self, model_input: list[str]) -> list[list[float]]:
        """One embedding per image path, preprocessed as the model was trained."""
        from reid_tune.embed import embed_images

        return embed_images(self.model, [Path(p) for p in model_input], self.cfg, num_workers=0)[0].tolist()


def register_model(
    client: MlflowClient, run_id: str, checkpoint: Path, name: str, *, alias: str = "champion"
) -> str:
    """Log ``checkpoint`` as an MLflow pyfunc model of ``run_id``, register it as a new version of
    ``name`` and point ``alias`` at it (earlier versions stay); returns the version.

    Only the client is used, never MLflow's process-wide fluent state (tracking URI, active run).
    """
    with tempfile.TemporaryDirectory(prefix="reid-model-") as tmp:
        mlflow.pyfunc.save_model(
            Path(tmp) / MODEL_ARTIFACT,
            python_model=ReidEmbedder(),
            artifacts={"checkpoint": str(checkpoint)},
            pip_requirements=[f"reid-tune=={reid_tune.__version__}"],
        )
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id).version
    client.set_registered_model_alias(name, alias, str(version))
    return str(version)


def download_checkpoint(model_uri: str, *, tracking_uri: str | None = None) -> Path:
    """The checkpoint file of a registered model (e.g. ``models:/NAME@champion``), downloaded locally.

    Only the registry is needed: the model's artifacts hold the checkpoint with its architecture and
    preprocessing options, which :func:`reid_tune.train.load_model` rebuilds.
    """
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking(uri)
    try:
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
