"""The champion in MLflow: logged as an MLflow 3 model of its trial run (the pyfunc of
:mod:`reid_tune.tracking.serving`), registered as a new version of a registered model, and downloaded
again by ``models:/`` URI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

import reid_tune
from reid_tune.errors import TrackingError
from reid_tune.search.keys import EXPORT_ARTIFACTS, MODEL_ARTIFACT, MODEL_VERSIONS_TAG
from reid_tune.tracking.store import checked_uri, global_uri, now_ms


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
            python_model=str(Path(__file__).with_name("serving.py")),  # run, not imported: it sets the model
            artifacts={"checkpoint": str(checkpoint)},
            input_example=example,
            pip_requirements=[f"reid-tune=={reid_tune.__version__}"],
            mlflow_model=Model(
                artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                model_id=model.model_id,
            ),
        )  # fmt: skip
        client.log_model_artifacts(model.model_id, str(Path(tmp) / MODEL_ARTIFACT))
    now = now_ms()
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
    with global_uri(client.tracking_uri):  # the registry resolves the source models:/<id> through it
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
    preprocessing options, which :func:`reid_tune.checkpoints.load_model` rebuilds.
    """
    uri = checked_uri(tracking_uri, existing=True)
    try:
        with global_uri(uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri,
                    dst_path=tempfile.mkdtemp(prefix="reid-model-"),
                    tracking_uri=uri,
                    registry_uri=uri,
                )
            )
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"--model {model_uri}: {err.message.splitlines()[0]}") from None
    found = sorted(local.rglob("checkpoint-*.pt"))
    if not found:
        raise TrackingError(f"--model {model_uri}: no checkpoint-*.pt among its artifacts")
    return found[-1]


def model_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    """The registered version that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    body = model_uri.removeprefix("models:/")
    name, _, alias = body.partition("@")
    version = ""
    if not alias:
        name, _, version = body.rpartition("/")
    if not model_uri.startswith("models:/") or not name or not (alias or version):
        raise TrackingError(f"--model {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        raise TrackingError(f"--model {model_uri}: {err.message.splitlines()[0]}") from None


def log_export(client: MlflowClient, version: ModelVersion, path: Path, fmt: str) -> str:
    """Log an exported file as an artifact of the run the registered ``version`` comes from (under
    ``export/``) and tag the version with its location (tag ``export_<fmt>``); returns that location."""
    run_id = version.run_id or client.get_logged_model(version.model_id).source_run_id
    client.log_artifact(run_id, str(path), EXPORT_ARTIFACTS)
    location = f"runs:/{run_id}/{EXPORT_ARTIFACTS}/{Path(path).name}"
    client.set_model_version_tag(version.name, version.version, f"export_{fmt}", location)
    return location
