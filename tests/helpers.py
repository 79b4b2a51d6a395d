"""Test helpers shared by several modules: the CLI in a fresh process, an interrupting training callback,
search-space documents and files, a real ``mlflow server`` subprocess and the trial runs it tracks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reid_tune.devices import Fallback
from reid_tune.train import TrainCallback

if TYPE_CHECKING:  # mlflow and Ray take seconds to import; only the search tests need them
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from reid_tune.search.algorithms import PruningOptunaSearch


def reid_tune(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a fresh process), capturing its output."""
    return subprocess.run([sys.executable, "-m", "reid_tune.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


class InterruptAt(TrainCallback):
    """Sends this process SIGINT during step ``step``, as a user's Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class RecordFallbacks(TrainCallback):
    """Keeps the GPU features the run went without, in the order it reported them."""

    def __init__(self) -> None:
        self.fallbacks: list[Fallback] = []

    def on_fallback(self, fallback: Fallback) -> None:
        self.fallbacks.append(fallback)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a training checkpoint."""
    return torch.load(path, weights_only=True)["model"]


def search_document(data: Path, name: str, **sections: Any) -> dict[str, Any]:
    """A search-space document over a generated Market-1501-style set: tiny lunet_small trials of 20
    iterations, validated every 10. ``sections`` update (dicts) or replace (other values) its sections."""
    document: dict[str, Any] = {
        "experiment": name,
        "data": {
            "train": str(data / "market1501_train.csv"),
            "image_root": str(data),
            "convention": "market1501",
            "test_query": str(data / "market1501_query.csv"),
            "test_gallery": str(data / "market1501_test.csv"),
        },
        "validation": {"identities": 3, "seed": 0},
        "train": {
            "network": "lunet_small",
            "embedding_dim": 32,
            "input_height": 64,
            "input_width": 32,
            "pre_crop_height": 64,
            "pre_crop_width": 32,
            "crop_augment": False,
            "train_iterations": 20,
            "validate_every": 10,
            "log_every": 5,
            "precision": "fp32",
            "num_workers": 0,
        },
        "space": {
            "batch_p": {"int": [4, 18]},
            "batch_k": {"int": [2, 4]},
            "margin": {"choice": ["soft", 0.2]},
            "lr": {"loguniform": [1e-4, 1e-3]},
            "decay_start": {"uniform": [0.4, 0.8]},
            "decay_factor": {"loguniform": [1e-4, 1e-2]},
        },
        "search": {
            "start_points": ["paper"],
            "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
            "num_samples": 4,
            "max_concurrent_trials": 2,
            "max_failures": 1,
        },
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        base = document.get(section)
        document[section] = (
            {**base, **values} if isinstance(base, dict) and isinstance(values, dict) else values
        )
    return document


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as YAML, keys in their order; returns ``path``."""
    import yaml  # only the search tests write YAML (the GPU machine may lack PyYAML)

    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def write_space(folder: Path, data: Path, name: str, *, tracking_uri: str | None, **sections: Any) -> Path:
    """A search-space file over the generated data, stored under ``folder``; ``sections`` update it."""
    document = search_document(
        data,
        name,
        storage=str(folder / "ray_results"),
        mlflow={
            "tracking_uri": tracking_uri,
            "registered_model": f"{name}-model",
            "system_metrics_every_s": 0.5,
        },
        **sections,
    )
    return write_yaml(folder / f"{name}.yaml", document)


def trial_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """The nested MLflow runs of a search's trials."""
    from reid_tune.search.keys import ROLE_TAG

    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")


def restored_searcher(root: Path, budget: int) -> PruningOptunaSearch:
    """The searcher of the search in folder ``root`` (``budget`` iterations) as Tune last saved it."""
    from reid_tune.search.algorithms import PruningOptunaSearch

    searcher = PruningOptunaSearch(budget=budget)
    searcher.restore_from_dir(str(root))
    return searcher


def assert_study_matches_tune(root: Path, budget: int) -> None:
    """The Optuna study saved with the search in ``root`` agrees with Tune's record of it: one Optuna
    trial per Tune trial, intermediate values = each validation (the first one of a step) at its
    training step, COMPLETE with the last value exactly for the trials whose last report was at the
    full ``budget``, FAIL for failed trials, PRUNED for the others."""
    from optuna.trial import TrialState
    from pytest import approx
    from ray.tune import ExperimentAnalysis

    from reid_tune.search.keys import METRIC, TIME_ATTR

    searcher = restored_searcher(root, budget)
    tune = ExperimentAnalysis(str(root))
    assert set(searcher._ot_trials) == {trial.trial_id for trial in tune.trials}
    assert len(searcher.study.get_trials(deepcopy=False)) == len(tune.trials)
    for trial in tune.trials:
        frame = tune.trial_dataframes[trial.trial_id]
        reported: dict[int, float] = {}  # step -> its first validation (a failed trial has no columns)
        if METRIC in frame:
            for step, value in frame.dropna(subset=[METRIC])[[TIME_ATTR, METRIC]].itertuples(index=False):
                reported.setdefault(int(step), float(value))
        study_trial = searcher.optuna_trial(trial.trial_id)
        where = f"trial {trial.trial_id} ({trial.status}, Optuna {study_trial.state.name})"
        assert study_trial.intermediate_values == approx(reported, rel=1e-9), where
        last_step = (trial.last_result or {}).get(TIME_ATTR)
        if trial.status == "ERROR":
            assert study_trial.state == TrialState.FAIL, where
        elif last_step == budget:
            assert study_trial.state == TrialState.COMPLETE, where
            assert study_trial.value == approx(reported[budget], rel=1e-9), where
        else:
            assert study_trial.state == TrialState.PRUNED, where


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (one worker, SQLite, proxied artifacts in ``folder``); its URI."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    server = subprocess.Popen(
        command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(uri, timeout=120)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_healthy(uri: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {uri} did not start within {timeout:.0f} s")
