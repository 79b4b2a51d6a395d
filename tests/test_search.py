"""The search platform end to end, on a real local Ray instance and real MLflow (SQLite and HTTP).

One Ray session serves the whole module; trials are tiny (lunet_small, 64x32, 20 iterations).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from csv import DictReader
from pathlib import Path
from types import SimpleNamespace

import h5py
import mlflow
import numpy as np
import pytest
from helpers import (
    assert_study_matches_tune,
    free_port,
    mlflow_server,
    reid_tune,
    restored_searcher,
    trial_runs,
    write_space,
)
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from reid_tune.checkpoints import load_model
from reid_tune.cli import main
from reid_tune.datasets import load_csv
from reid_tune.errors import ReidTuneError
from reid_tune.promote import promote
from reid_tune.search.callbacks import PendingWatch
from reid_tune.search.keys import ROLE_TAG, TRIAL_TAG
from reid_tune.search.schema import PAPER_POINT
from reid_tune.search.space import load_spec
from reid_tune.search.summary import SearchSummary
from reid_tune.search.tuner import run_search, start_local_ray
from reid_tune.synthetic import generate_demo
from reid_tune.tracking.registry import download_checkpoint
from reid_tune.tracking.store import check_tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search") / "data"
    generate_demo(out, num_train_ids=22, num_test_ids=4, size=(64, 32), junk=0, distractors=2)
    return out


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """One local Ray instance for every search of the module (the searches reuse it)."""
    import ray

    start_local_ray(num_cpus=3)
    yield
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # it names this instance's dashboard


def parent_run(client: MlflowClient, experiment: str) -> Run:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'search'")[0]


def analysis_rows(client: MlflowClient, run_id: str) -> list[dict[str, str]]:
    """The rows of a parent run's ``search/trials.csv``."""
    with open(client.download_artifacts(run_id, "search/trials.csv"), newline="") as handle:
        return list(DictReader(handle))


# ------------------------------------------------------------ a 4-trial search tracked by an MLflow server


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` for the module's searches."""
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def four(
    data: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str
) -> tuple[Path, str, SearchSummary]:
    """A finished 4-trial TPE + ASHA search tracked over HTTP: (its folder, tracking URI, summary)."""
    folder = tmp_path_factory.mktemp("search")
    summary = run_search(
        write_space(folder, data, "four", tracking_uri="sqlite:///unused.db"), tracking_uri=mlflow_uri
    )
    assert not summary.interrupted
    assert len(summary.trials) == 4 and all(t.status == "TERMINATED" for t in summary.trials)
    assert summary.best is not None and summary.paper is not None
    assert summary.best.val_mAP >= summary.paper.val_mAP
    assert summary.paper.config == {
        "batch_p": 18,
        "batch_k": 4,
        "margin": "soft",
        "lr": 3e-4,
        "decay_start": 0.6,
        "decay_factor": 1e-3,
    }
    return folder, mlflow_uri, summary


@pytest.fixture(scope="module")
def searched(four: tuple[Path, str, SearchSummary]) -> tuple[Path, str]:
    """The 4-trial search: (its folder, tracking URI)."""
    return four[0], four[1]


def test_search_logs_parent_and_nested_runs(four: tuple[Path, str, SearchSummary]) -> None:
    _, uri, summary = four
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("four").tags["mlflow.experimentKind"] == "custom_model_development"
    parent = parent_run(client, "four")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {}  # the end-of-search numbers are tags and the description
    assert parent.data.tags["reid_tune.best_val_mAP"] == f"{summary.best.val_mAP:.4f}"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Search four: TPE (Optuna) with ASHA over batch_p, batch_k, margin, lr")
    assert "Promote it: reid-tune promote four" in note and summary.verdict[1:] in note
    assert parent.data.params["space.lr"] == "loguniform [0.0001, 0.001]"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "four.yaml",
        "validation_split",
        "search",
    }
    assert client.get_experiment_by_name("four").artifact_location.startswith("mlflow-artifacts:")
    runs = sorted(trial_runs(client, "four"), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in runs] == [
        f"t{n:02d}-{r.data.tags[TRIAL_TAG]}" for n, r in enumerate(runs, 1)
    ]
    assert runs[0].data.tags["reid_tune.paper_settings"] == "true"  # the first start point
    best = [r for r in runs if r.data.tags.get("reid_tune.best") == "true"]
    assert [r.data.tags[TRIAL_TAG] for r in best] == [summary.best.trial_id]
    assert f"Best trial: {best[0].info.run_name}," in note
    trials = {t.trial_id: t for t in summary.trials}
    for run in runs:
        trial = trials[run.data.tags[TRIAL_TAG]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert {"batch_p", "learning_rate", "decay_start_iteration", "network"} <= set(run.data.params)
        assert {"reid_tune.dataset", "reid_tune.code_version"} <= set(run.data.tags)
        outcome = run.data.tags["reid_tune.outcome"]
        assert outcome == ("full_budget" if trial.full_budget else "stopped_early")
        assert run.data.tags.get("reid_tune.stopped_at") == (
            None if trial.full_budget else str(trial.iterations)
        )
        assert run.data.tags["mlflow.note.content"].startswith(f"Trial {run.info.run_name} of search four")
        val = client.get_metric_history(run.info.run_id, "eval/mAP")
        assert [m.step for m in val][:1] == [
            10
        ]  # every trial validates at iteration 10, ASHA may stop it there
        best = client.get_metric_history(run.info.run_id, "eval/best_mAP")
        assert [m.value for m in best] == list(itertools.accumulate((m.value for m in val), max))
        assert len(client.get_metric_history(run.info.run_id, "train/loss_mean")) == 2 * len(val)
        metrics = set(run.data.metrics)
        assert {"eval/rank1", "eval/rank5", "eval/rank10", "eval/mINP"} <= metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metrics
        assert all(m.split("/")[0] in ("train", "eval", "system") for m in metrics)  # no "step", no best_*
        artifacts = {
            a.path
            for folder in ("checkpoint", "validation")
            for a in client.list_artifacts(run.info.run_id, folder)
        }
        assert {
            "validation/val_query.h5",
            "validation/val_gallery.h5",
            "validation/cmc.png",
            "validation/validation.json",
            "checkpoint/config.json",
        } <= artifacts
        assert any(path.startswith("checkpoint/checkpoint-") for path in artifacts)
    with h5py.File(client.download_artifacts(runs[0].info.run_id, "validation/val_query.h5"), "r") as f:
        assert f["emb"].shape[1] == 32 and f["augmentation_types"][0].startswith(b"original")


def test_study_matches_tune_and_the_paper_trained_its_full_budget(
    four: tuple[Path, str, SearchSummary],
) -> None:
    folder, _, summary = four
    assert_study_matches_tune(folder / "ray_results" / "four", budget=20)
    assert summary.paper.full_budget and summary.paper.iterations == 20  # ASHA spares the baseline
    assert summary.gain is not None and summary.best_full is not None
    assert summary.verdict.startswith(f"best full-budget trial {summary.best_full.trial_id} vs the paper's")


def test_parent_run_holds_the_search_analysis(four: tuple[Path, str, SearchSummary]) -> None:
    folder, uri, summary = four
    client = MlflowClient(uri)
    parent = parent_run(client, "four")
    files = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "search")}
    names = ("history.png", "importance.png", "parallel.png", "trials.csv")
    assert set(files) == {f"search/{name}" for name in names} and all(files.values())
    rows = analysis_rows(client, parent.info.run_id)
    searcher = restored_searcher(folder / "ray_results" / "four", budget=20)
    assert {row["trial_id"]: row["optuna_state"] for row in rows} == {
        trial.trial_id: searcher.optuna_trial(trial.trial_id).state.name for trial in summary.trials
    }
    assert {row["tune_status"] for row in rows} == {"TERMINATED"}
    assert [row["trial_id"] for row in rows if row["baseline"] == "true"] == [summary.paper.trial_id]
    assert parent.data.tags["reid_tune.verdict"] == summary.verdict
    assert parent.data.tags["reid_tune.gain_val_mAP"] == f"{summary.gain:+.4f}"


def test_fresh_start_refuses_an_existing_search(searched: tuple[Path, str]) -> None:
    folder, _ = searched
    with pytest.raises(ReidTuneError, match="already holds a search; pass --resume"):
        run_search(folder / "four.yaml")


def test_promote_then_embed_from_the_registry(
    searched: tuple[Path, str], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, uri = searched
    first = promote("four", tracking_uri=uri, device="cpu")
    second = promote(parent_run(MlflowClient(uri), "four").info.run_id, tracking_uri=uri, device="cpu")
    assert (first.name, first.version, second.version) == ("four-model", "1", "2")
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("four-model", "champion").version) == "2"
    assert len(client.search_model_versions("name='four-model'")) == 2
    best = client.get_run(second.run_id)
    assert best.data.metrics["eval/best_mAP"] == max(
        r.data.metrics["eval/best_mAP"] for r in trial_runs(client, "four")
    )
    assert best.data.tags["reid_tune.best"] == "true"
    assert {"test/mAP", "test/rank1", "test/rank5", "test/mINP"} <= set(best.data.metrics)
    assert "test/test_query.h5" in {a.path for a in client.list_artifacts(second.run_id, "test")}
    # the champion is an MLflow 3 logged model of the trial's run, linked to the registered version
    version = client.get_model_version_by_alias("four-model", "champion")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert (model.source_run_id, model.status.to_proto()) == (second.run_id, 2)  # READY
    assert model.model_id in {o.model_id for o in best.outputs.model_outputs}
    assert {"name": "four-model", "version": 2} in json.loads(model.tags["mlflow.modelVersions"])
    assert {m.key: m.value for m in model.metrics}["test/mAP"] == pytest.approx(second.test.mAP)
    assert version.description.startswith(f"Best trial {best.info.run_name} of search four")
    assert version.tags["test_mAP"] == f"{second.test.mAP:.4f}" and "trial" in version.tags
    # a version registered from plain files (the earlier layout) still gives its checkpoint
    old = client.create_model_version("four-model", f"runs:/{second.run_id}/checkpoint", run_id=second.run_id)
    assert download_checkpoint(f"models:/four-model/{old.version}", tracking_uri=uri).name.startswith(
        "checkpoint-"
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # no run folder, no search folder: the registry only
    info = mlflow.models.get_model_info("models:/four-model@champion")
    assert info.signature is not None and info.saved_input_example_info is not None
    embedder = mlflow.pyfunc.load_model("models:/four-model@champion")  # the pyfunc, from its code
    images = [str(data / fid) for fid in load_csv(data / "market1501_query.csv").fids[:3]]
    assert np.array(embedder.predict(images)).shape == (3, 32)
    _, cfg = load_model(download_checkpoint("models:/four-model@champion"))
    assert cfg.embedding_dim == 32 and cfg.network == "lunet_small"
    for role, csv in (("query", "market1501_query.csv"), ("gallery", "market1501_test.csv")):
        main(
            [
                "embed",
                "--model",
                "models:/four-model@champion",
                "--dataset",
                str(data / csv),
                "--image-root",
                str(data),
                "--out",
                f"{role}.h5",
                "--device",
                "cpu",
            ]
        )
    main(
        [
            "evaluate",
            "--query-dataset",
            str(data / "market1501_query.csv"),
            "--query-embeddings",
            "query.h5",
            "--gallery-dataset",
            str(data / "market1501_test.csv"),
            "--gallery-embeddings",
            "gallery.h5",
            "--excluder",
            "market1501",
            "--out",
            "test.json",
            "--device",
            "cpu",
        ]
    )
    assert json.loads(Path("test.json").read_text())["mAP"] == pytest.approx(second.test.mAP)


def test_export_the_champion_and_log_the_file_on_its_run(searched: tuple[Path, str], tmp_path: Path) -> None:
    _, uri = searched
    promotion = promote("four", tracking_uri=uri, device="cpu")
    out = tmp_path / "champion.onnx"
    done = reid_tune("export", "--model", "models:/four-model@champion", "--out", out, "--tracking-uri", uri)
    assert done.returncode == 0, done.stderr
    where = f"runs:/{promotion.run_id}/export/champion.onnx"
    assert f"from models:/four-model@champion (version {promotion.version})" in done.stdout
    assert done.stdout.splitlines()[-1] == f"logged     {where}"
    client = MlflowClient(uri, registry_uri=uri)
    logged = {a.path: a.file_size for a in client.list_artifacts(promotion.run_id, "export")}
    assert logged == {"export/champion.onnx": out.stat().st_size}
    assert client.get_model_version("four-model", promotion.version).tags["export_onnx"] == where


# ---------------------------------------------------------------- resume after Ctrl-C


def _interrupt_after_first_trial(
    uri: str, started: Path, experiment: str, timeout: float = 240
) -> threading.Thread:
    """SIGINT this process (as Ctrl-C would) once one trial run has finished (``started``: the search's
    state file, written once its MLflow store is ready)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if started.exists() and any(
                r.info.status == "FINISHED" for r in trial_runs(MlflowClient(uri), experiment)
            ):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_resume_after_interrupt_finishes_without_duplicates(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no tracking URI: MLflow's default store, mlflow.db here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(
        tmp_path,
        data,
        "resumed",
        tracking_uri=None,
        search={"num_samples": 2, "max_concurrent_trials": 1, "scheduler": {"type": "none"}},
    )
    _interrupt_after_first_trial(
        uri, tmp_path / "ray_results" / "resumed" / "reid_tune_search.json", "resumed"
    )
    first = run_search(space)
    assert first.interrupted
    client = MlflowClient(uri)
    assert parent_run(client, "resumed").info.status == "KILLED"
    done_before = {
        r.data.tags[TRIAL_TAG]: r.info.end_time
        for r in trial_runs(client, "resumed")
        if r.info.status == "FINISHED"
    }
    assert done_before

    second = run_search(space, resume=True)
    assert not second.interrupted and len(second.trials) == 2
    runs = trial_runs(client, "resumed")
    assert len(runs) == 2 and len({r.data.tags[TRIAL_TAG] for r in runs}) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/mAP")]
        assert steps == [10, 20]  # each validation logged once, none repeated
        if run.data.tags[TRIAL_TAG] in done_before:  # not rerun
            assert run.info.end_time == done_before[run.data.tags[TRIAL_TAG]]
    parent = parent_run(client, "resumed")
    assert parent.info.status == "FINISHED"
    assert_study_matches_tune(tmp_path / "ray_results" / "resumed", budget=20)  # the study resumed too
    rows = analysis_rows(client, parent.info.run_id)  # redrawn by the restored callback and searcher
    assert [(row["tune_status"], row["optuna_state"]) for row in rows] == [("TERMINATED", "COMPLETE")] * 2


def test_max_images_stops_the_search_but_not_the_baseline(data: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = {**PAPER_POINT, "margin": 0.2}  # not a baseline
    search = {
        "start_points": ["paper", other],
        "num_samples": 4,
        "max_images": 700,
        "scheduler": {"type": "none"},
    }
    summary = run_search(write_space(tmp_path, data, "thrifty", tracking_uri=uri, search=search))
    # the first validation (step 10, 720 images) spends the budget: the other point stops there, whichever
    # trial reported first, and the paper's settings train their 20 iterations
    assert {t.config["margin"]: t.iterations for t in summary.trials} == {"soft": 20, 0.2: 10}
    assert not summary.interrupted and summary.paper.full_budget
    assert parent_run(MlflowClient(uri), "thrifty").info.status == "FINISHED"
    assert_study_matches_tune(tmp_path / "ray_results" / "thrifty", budget=20)


def test_resume_without_a_search_is_an_error(data: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path, data, "nothing", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(ReidTuneError, match="nothing to resume"):
        run_search(space, resume=True)


# ---------------------------------------------------------------- crashing trials


def test_crashing_trials_are_retried_then_failed(data: Path, tmp_path: Path) -> None:
    """Training images that cannot be decoded crash every try of a trial (the driver reads only the lists)."""
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    for image in (broken / "bounding_box_train").glob("*.jpg"):
        image.write_bytes(b"not a JPEG")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(
        tmp_path,
        broken,
        "crash",
        tracking_uri=uri,
        search={"num_samples": 1, "max_failures": 1, "scheduler": {"type": "none"}},
    )
    summary = run_search(space)
    assert [t.status for t in summary.trials] == ["ERROR"] and summary.best is None
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(tmp_path / "ray_results" / "crash"))
    assert [t.num_failures for t in analysis.trials] == [2]  # the first try and one retry
    runs = trial_runs(MlflowClient(uri), "crash")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert_study_matches_tune(tmp_path / "ray_results" / "crash", budget=20)  # one FAIL, not one per try


def test_tracking_server_down_is_reported_before_trials(data: Path, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ReidTuneError, match="does not answer"):
        check_tracking(down, timeout=2)
    space = write_space(tmp_path, data, "down", tracking_uri=down)
    with pytest.raises(ReidTuneError, match=f"tracking URI {down}: the MLflow server does not answer"):
        run_search(space)
    assert not (tmp_path / "ray_results" / "down").exists()


# ---------------------------------------------------------------- trials waiting for resources


def test_trials_waiting_for_workers_no_node_can_hold_are_warned_of_once(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a cluster (here: the module's 3-CPU instance, no GPU) a trial that has waited without a result while
    no node can hold one of its workers is one warning naming what the cluster has; none otherwise."""
    cpu, gpu = (
        load_spec(write_space(tmp_path, data, name, tracking_uri=None, resources={"gpus_per_worker": gpus}))
        for name, gpus in (("cpu", 0), ("gpu", 1))
    )
    waiting = SimpleNamespace(trial_id="t1", status="RUNNING")
    PendingWatch(cpu, after_s=0).on_step_end(0, [waiting])  # one CPU: the node has it
    reported = PendingWatch(gpu, after_s=0)
    reported.on_trial_result(0, [waiting], waiting, {})
    reported.on_step_end(0, [waiting])  # it trains: it is not waiting
    assert capsys.readouterr().err == ""
    watch = PendingWatch(gpu, after_s=0)
    for _ in range(3):
        watch.on_step_end(0, [waiting])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: trials have waited 0 s for Ray Train workers of 1 CPU, 1 GPU each")
    assert "its nodes: 1 x (3 CPU, 0 GPU); autoscaler node types: none published" in lines[0], lines


def test_validation_may_rerank(data: Path, tmp_path: Path) -> None:
    """validation.rerank: the trials' validation ranks by k-reciprocal re-ranked distances."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = {"start_points": ["paper"], "num_samples": 1, "scheduler": {"type": "none"}}
    space = write_space(tmp_path, data, "reranked", tracking_uri=uri, search=search,
                        validation={"identities": 3, "seed": 0, "rerank": True})
    summary = run_search(space)
    assert summary.paper.full_budget and 0 < summary.paper.val_mAP <= 1
