"""What the MLflow UI will show of a search, through MLflow's API on a SQLite store: the experiment's
view, run names, notes, tags and metric names; and the CMC plot, the trial descriptions and the
console's progress lines, without Ray; and the names and plots modules, which import no framework."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import search_document
from mlflow.tracking import MlflowClient

from reid_tune.promote import best_trial
from reid_tune.search.callbacks import progress_line, run_name, trial_note
from reid_tune.search.keys import (
    BEST_METRIC,
    BEST_TAG,
    KIND_TAG,
    LEGACY_BEST_METRIC,
    NOTE_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    TRAINING_KIND,
)
from reid_tune.search.schema import PAPER_POINT, SearchSpec
from reid_tune.search.summary import describe_search
from reid_tune.search.system_metrics import SystemSampler
from reid_tune.tracking.plots import cmc_figure
from reid_tune.tracking.runs import SearchTracker, runs_view


@pytest.fixture()
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _tracker(client: MlflowClient, experiment: str = "demo") -> SearchTracker:
    return SearchTracker.start(
        client, experiment, search_id="s1", run_name=experiment, params={"a": 1}, tags={}, files=[]
    )


def test_experiments_open_on_their_runs_new_or_existing(client: MlflowClient) -> None:
    _tracker(client, "new")
    client.create_experiment("older")  # made before reid-tune tagged experiments
    _tracker(client, "older")
    for name in ("new", "older"):
        assert client.get_experiment_by_name(name).tags[KIND_TAG] == TRAINING_KIND


def test_trial_metrics_are_grouped_and_the_best_so_far_survives_a_resume(client: MlflowClient) -> None:
    tracker = _tracker(client)
    run_id = tracker.trial_run("abc", name="t01-abc", params={"lr": 3e-4}, tags={})
    records = [{"step": s, "loss_mean": 1.0 / s} for s in (5, 10)]
    tracker.log_result("abc", 10, records, {"eval/mAP": 0.5, "eval/rank1": 0.6})
    again = _tracker_reopened(client, tracker)  # a resumed search: a new tracker finds the run again
    assert again.trial_run("abc", name="t01-abc", params={}, tags={}) == run_id
    again.log_result("abc", 10, records, {"eval/mAP": 0.5, "eval/rank1": 0.6})  # re-reported: skipped
    again.log_result("abc", 20, [{"step": 20, "loss_mean": 0.1}], {"eval/mAP": 0.4, "eval/rank1": 0.5})
    run = client.get_run(run_id)
    assert run.info.run_name == "t01-abc"
    assert set(run.data.metrics) == {"train/loss_mean", "eval/mAP", "eval/rank1", BEST_METRIC}
    best = client.get_metric_history(run_id, BEST_METRIC)
    assert [(m.step, m.value) for m in best] == [(10, 0.5), (20, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/mAP")] == [10, 20]


def _tracker_reopened(client: MlflowClient, tracker: SearchTracker) -> SearchTracker:
    return SearchTracker(client, "demo", tracker.parent_run_id)


def test_system_samples_are_stepped_in_order_across_reports(client: MlflowClient) -> None:
    tracker = _tracker(client)
    run_id = tracker.trial_run("abc", name="t01-abc", params={}, tags={})
    now = time.time()
    for start in (0, 2):
        samples = [
            {"time": now + i, "system/cpu_utilization_percentage": 10.0 * i} for i in (start, start + 1)
        ]
        tracker.log_system("abc", samples)
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 10.0), (2, 20.0), (3, 30.0)]
    assert _tracker_reopened(client, tracker).trial_run("abc", name="", params={}, tags={}) == run_id



def test_validation_comes_first_and_promote_still_ranks_older_searches(client: MlflowClient) -> None:
    """Validation metrics sort before test/ and train/ (MLflow's sections are alphabetical); trials of a
    search logged under the earlier name, val/best_mAP, are still ranked."""
    assert BEST_METRIC.split("/")[0] < "system" < "test" < "train"
    experiment = client.create_experiment("old")
    tags = {SEARCH_TAG: "s1"}
    parent = client.create_run(experiment, tags={**tags, ROLE_TAG: "search"})
    for name, metric, value in (("t01", LEGACY_BEST_METRIC, 0.5), ("t02", LEGACY_BEST_METRIC, 0.7),
                                ("t03", BEST_METRIC, 0.6), ("t04", "train/loss", 0.9)):
        run = client.create_run(experiment, run_name=name, tags={**tags, ROLE_TAG: "trial"})
        client.log_metric(run.info.run_id, metric, value)
    assert best_trial(client, client.get_run(parent.info.run_id)).info.run_name == "t02"

def test_the_best_tag_moves_and_notes_describe_the_runs(client: MlflowClient) -> None:
    tracker = _tracker(client)
    for trial in ("a", "b"):
        tracker.trial_run(trial, name=f"t-{trial}", params={}, tags={})
    tracker.mark(BEST_TAG, ["a"], tracker.trial_runs())
    tracker.mark(BEST_TAG, ["b"], tracker.trial_runs())  # a resumed search found a better trial
    tags = {run.info.run_name: run.data.tags.get(BEST_TAG) for run in tracker.trial_runs()}
    assert tags == {"t-a": None, "t-b": "true"}
    tracker.finish_trial("a", None, failed=True, tags={"reid_tune.outcome": "failed"}, note="it failed")
    run = client.get_run(tracker._runs["a"])
    assert (run.info.status, run.data.tags[NOTE_TAG], run.data.tags["reid_tune.outcome"]) == (
        "FAILED", "it failed", "failed"
    )  # fmt: skip
    tracker.finish(tags={"reid_tune.verdict": "v"}, note="done", status="FINISHED")
    parent = client.get_run(tracker.parent_run_id)
    assert (parent.data.tags[NOTE_TAG], parent.data.metrics) == ("done", {})


def test_cmc_plot_fits_the_data_and_writes_ranks_1_5_10() -> None:
    import matplotlib.pyplot as plt

    cmc = [0.9 + 0.004 * r for r in range(25)]
    fig = cmc_figure(cmc, title="validation CMC")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 85 <= low < 90 and 99 < high <= 100  # not 0-100: the differences show
    assert ax.get_xlim() == (0.5, 20.5)
    assert [t.get_text() for t in ax.texts] == ["rank-1: 90.0%", "rank-5: 91.6%", "rank-10: 93.6%"]
    plt.close(fig)


# ---------------------------------------------------------------- descriptions and the console


def _spec() -> SearchSpec:
    return SearchSpec.model_validate(search_document(Path("/data"), "demo"))


def _trial(trial_id: str, status: str, best: float | None, config: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=trial_id,
        status=status,
        config=config or {**PAPER_POINT, "batch_p": 8},
        metric_analysis={} if best is None else {"val_mAP": {"max": best}},
        path="/ray/demo/" + trial_id,
    )


def test_trial_runs_are_named_in_trial_order() -> None:
    trials = [_trial("3f43", "TERMINATED", 0.2), _trial("a1b2", "RUNNING", None)]
    assert [run_name(t, trials) for t in trials] == ["t01-3f43", "t02-a1b2"]


def test_trial_notes_say_what_ran_how_it_ended_and_its_best_validation() -> None:
    spec = _spec()
    paper = _trial("3f43", "TERMINATED", 0.2, config=dict(PAPER_POINT))
    validation = {"mAP": 0.25, "rank-1": 0.4, "step": 10}
    note = trial_note(spec, paper, "t01-3f43", "full_budget", 20, validation)
    assert note.startswith("Trial t01-3f43 of search demo (Ray trial 3f43): P=18 K=4 margin=soft lr=3.00e-04")
    assert "It runs the paper's settings" in note and "Trained its full budget of 20 iterations." in note
    assert "Best validation mAP 25.00% (rank-1 40.00%) at iteration 10, on the search's 3 held-out" in note
    stopped = trial_note(spec, _trial("a1b2", "TERMINATED", 0.1), "t02-a1b2", "stopped_early", 10, None)
    assert "Stopped early by the search at iteration 10 of 20. No validation." in stopped
    failed = trial_note(spec, _trial("c3d4", "ERROR", None), "t03-c3d4", "failed", 0, None)
    assert "Failed after 0 of 20 iterations (Ray's error file: /ray/demo/c3d4)" in failed


def test_describe_search_names_the_searcher_space_and_data() -> None:
    assert describe_search(_spec()) == (
        "Search demo: TPE (Optuna) with ASHA over batch_p, batch_k, margin, lr, decay_start, decay_factor; "
        "up to 4 trials of 20 iterations. Trains on /data/market1501_train.csv; the objective is "
        "validation mAP on 3 held-out training identities."
    )


def test_progress_line_counts_trials_and_names_the_leader() -> None:
    trials = [
        _trial("3f43", "TERMINATED", 0.2),
        _trial("a1b2", "RUNNING", 0.31),
        _trial("c3d4", "PENDING", None),
    ]
    line = progress_line(trials)
    assert line.endswith("trials: 1 pending, 1 running, 1 terminated; best val mAP 31.0% (t02-a1b2)")


def test_system_sampler_samples_cpu_and_memory_until_stopped() -> None:
    sampler = SystemSampler(0.05, torch.device("cpu")).start()
    time.sleep(0.4)
    first = sampler.drain()
    assert len(first) >= 2 and sampler.drain()  # none since: one taken at once
    sampler.stop()
    keys = set(first[0])
    assert keys == {
        "time", "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage",
    }  # fmt: skip
    assert all(0 <= s["system/system_memory_usage_percentage"] <= 100 for s in first)


@pytest.mark.parametrize("module", ["reid_tune.search.keys", "reid_tune.tracking.plots"])
def test_names_and_plots_import_no_framework(module: str) -> None:
    """Tools and tests read the search's names, and plots draw, without MLflow, Ray or torch."""
    code = f"import json, sys, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert {"mlflow", "ray", "torch", "optuna"}.isdisjoint(json.loads(done.stdout))


def test_the_search_says_how_to_browse_its_runs() -> None:
    """MLflow 3's UI opens on its GenAI overview: the search prints the runs table's URL on a server, the
    `reid-tune ui` command (which opens on it) for a local store."""
    page = "#/experiments/7?workflowType=machine_learning"
    server = runs_view("http://mlflow.example:5000/", "7", space="s.yaml", space_uri=None)
    assert server == f"http://mlflow.example:5000/{page}"
    assert runs_view("sqlite:////work/m.db", "7", space="s.yaml", space_uri="sqlite:////work/m.db") == (
        "reid-tune ui s.yaml"
    )
    assert runs_view("sqlite:////work/m.db", "7", space="s.yaml", space_uri="sqlite:////other.db") == (
        "reid-tune ui s.yaml --tracking-uri sqlite:////work/m.db"
    )
