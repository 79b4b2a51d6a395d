"""`reid-tune ui`: MLflow's UI on a search's store, opening on the runs table in a browser that has not
chosen MLflow 3's GenAI view (the page sets the model-training view as the default)."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from helpers import free_port, write_space
from mlflow.tracking import MlflowClient

from reid_tune.tracking.ui import APP_NAME, WORKFLOW_KEY, create_app

SCRIPT = f"<script>if(!localStorage.getItem('{WORKFLOW_KEY}'))"


def test_mlflow_server_finds_the_app_by_name() -> None:
    apps = {entry.name: entry.value for entry in metadata.entry_points(group="mlflow.app")}
    assert apps[APP_NAME] == "reid_tune.tracking.ui:create_app"


def test_the_page_sets_the_model_training_view_once_and_nothing_else_changes() -> None:
    create_app()
    from mlflow.server import app as flask_app

    client = flask_app.test_client()
    page = client.get("/").get_data(as_text=True)
    assert page.startswith("<!doctype html>") and page.count(SCRIPT) == 1
    assert "localStorage.setItem('mlflow.workflowType_v1','\"machine_learning\"')" in page
    assert SCRIPT not in client.get("/health").get_data(as_text=True)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_reid_tune_ui_serves_the_search_until_interrupted(tmp_path: Path, demo_data: Path, stop: int) -> None:
    """The store and the experiment come from the search-space file; the server stops with the command
    (it runs in its own session, which neither signal reaches)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, demo_data, "demo", tracking_uri=uri)
    experiment = MlflowClient(uri).create_experiment("demo")
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "reid_tune.cli", "ui", space, "--port", str(port)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        line = ui.stdout.readline()  # printed once the server answers
        base = f"http://127.0.0.1:{port}"
        assert line.split()[:4] == ["MLflow", "UI", "on", f"{uri}:"], line + ui.stderr.read()
        assert line.split()[4] == f"{base}/#/experiments/{experiment}?workflowType=machine_learning"
        with urllib.request.urlopen(base, timeout=10) as page:
            assert SCRIPT in page.read().decode()
    finally:
        ui.send_signal(stop)
        assert ui.wait(timeout=60) == 0, ui.stderr.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/health", timeout=5)


def test_an_experiment_not_in_the_store_is_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("demo")
    done = subprocess.run([sys.executable, "-m", "reid_tune.cli", "ui", "--tracking-uri", uri, "--experiment",
                           "dmeo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: experiment 'dmeo': not in sqlite:///")
