"""The MLflow tracking store: its URI resolved and checked, a quiet client of it, and MLflow's
process-wide URI pointed at it where MLflow insists on that."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from reid_tune.errors import TrackingError

TRACKING_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute tracking URI: MLflow's default (``sqlite:///mlflow.db`` here) or ``uri`` with a
    relative SQLite path made absolute (Ray workers and ``mlflow ui`` run elsewhere)."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_tracking(uri: str, *, existing: bool = False, timeout: float = 5.0) -> None:
    """Fail early and clearly when a tracking server does not answer (before any trial runs), or, with
    ``existing``, when a SQLite store is missing (a reader must not create an empty one)."""
    if existing and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"tracking URI {uri}: no such database, expected the one a search wrote; pass --tracking-uri"
        )
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"tracking URI {uri}: the MLflow server does not answer ({reason}); "
            f"start it (mlflow server ...) or pass another --tracking-uri"
        ) from None


def quiet_mlflow() -> None:
    """No artifact progress bars, database set-up or model-logging notices on the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.models.signature").setLevel(logging.WARNING)  # "Running the predict function"


def checked_uri(uri: str | None, *, existing: bool = False) -> str:
    """The resolved ``uri`` once its server answers, or its database exists with ``existing`` (MLflow kept
    quiet)."""
    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    check_tracking(uri, existing=existing)
    return uri


def client_for(uri: str | None, *, existing: bool = False) -> MlflowClient:
    """A client of the resolved ``uri`` after :func:`checked_uri` (``existing``: for readers)."""
    uri = checked_uri(uri, existing=existing)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def global_uri(uri: str) -> Iterator[None]:
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


def now_ms() -> int:
    """Now as MLflow timestamps metrics: milliseconds since the epoch."""
    return int(time.time() * 1000)
