"""The MLflow UI on a search's store, opening on the runs.

MLflow 3's UI starts in its GenAI view (traces, an empty overview) whatever an experiment's kind tag
says, and remembers the view a browser chose in its localStorage. :func:`create_app` is MLflow's own
server app with one script added to its page: a browser that has chosen no view yet starts in the
model-training view (runs tables); one that has keeps its choice. It is the ``mlflow.app`` entry point
``reid-tune``, so ``mlflow server --app-name reid-tune`` serves it too; ``reid-tune ui`` starts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from mlflow.tracking import MlflowClient

from reid_tune.errors import TrackingError
from reid_tune.tracking.store import client_for

APP_NAME = "reid-tune"  # the mlflow.app entry point (pyproject.toml)
WORKFLOW_KEY = "mlflow.workflowType_v1"  # where MLflow 3.17's UI keeps the view a browser chose
MODEL_TRAINING = "machine_learning"
_DEFAULT_VIEW = (
    f"<script>if(!localStorage.getItem('{WORKFLOW_KEY}'))"
    f"localStorage.setItem('{WORKFLOW_KEY}','\"{MODEL_TRAINING}\"')</script>"
).encode()


def _open_on_model_training(response: Any) -> Any:
    """Add the default-view script to the UI's page (MLflow's HTML page only; everything else as is)."""
    if response.status_code != 200 or response.mimetype != "text/html":
        return response
    response.direct_passthrough = False  # the page is sent as a file: read it to edit it
    page = response.get_data()
    if b"<head>" in page and _DEFAULT_VIEW not in page:
        response.set_data(page.replace(b"<head>", b"<head>" + _DEFAULT_VIEW, 1))
    return response


def create_app() -> Any:
    """MLflow's tracking server (its ASGI app, for uvicorn) whose UI opens on model training."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import app

    if _open_on_model_training not in flask_app.after_request_funcs.get(None, []):
        flask_app.after_request(_open_on_model_training)
    return app


def start_ui(tracking_uri: str, *, host: str = "127.0.0.1", port: int = 5000, timeout: float = 120.0,
             quiet: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Serve ``tracking_uri`` with :func:`create_app` (one worker, its own process group) and wait until it
    answers; the process and its base URL. ``quiet`` drops the server's own log lines."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--app-name", APP_NAME, "--backend-store-uri", tracking_uri,
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen(
        command, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=output,
        stderr=output, start_new_session=True,
    )  # fmt: skip
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise TrackingError(f"mlflow server on {tracking_uri} exited with status {server.returncode} "
                                f"(is port {port} taken? pass --port)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return server, base
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    stop_ui(server)
    raise TrackingError(f"mlflow server on {tracking_uri}: no answer at {base}/health within {timeout:.0f} s")


def stop_ui(server: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers (its process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _interrupt(signum: int, frame: Any) -> None:
    """A termination signal, handled as Ctrl-C is."""
    raise KeyboardInterrupt


def experiment_page(client: MlflowClient, experiment: str | None) -> str:
    """The UI's page of ``experiment``'s runs (the experiments list without one); an unknown name is an
    error."""
    if experiment is None:
        return "#/experiments"
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"experiment {experiment!r}: not in {client.tracking_uri}, expected the one a "
                            "search wrote (run it first, or pass --tracking-uri)")
    return f"#/experiments/{found.experiment_id}?workflowType={MODEL_TRAINING}"


def serve_ui(tracking_uri: str | None, experiment: str | None, *, host: str, port: int,
             echo: Callable[[str], None]) -> None:
    """Show ``experiment``'s runs: on a tracking server, its page's URL; on a local store, start
    :func:`create_app` on it, ``echo`` the page's URL and serve until interrupted (Ctrl-C)."""
    client = client_for(tracking_uri, existing=True)
    page = experiment_page(client, experiment)
    if client.tracking_uri.startswith(("http://", "https://")):
        echo(f"{client.tracking_uri.rstrip('/')}/{page}")
        return
    server, base = start_ui(client.tracking_uri, host=host, port=port, quiet=True)
    echo(f"MLflow UI on {client.tracking_uri}: {base}/{page}  (Ctrl-C stops it)")
    for stop in (signal.SIGTERM, signal.SIGHUP):  # the server has its own session: stopped like Ctrl-C
        signal.signal(stop, _interrupt)
    try:
        status = server.wait()
    except KeyboardInterrupt:
        return
    finally:
        stop_ui(server)
    raise TrackingError(f"mlflow server on {client.tracking_uri}: exited with status {status}")
