"""Node loss on a local two-node Ray cluster: one search tracked by a real ``mlflow server``, with a
storage folder both nodes share, loses its second node mid-search and still finishes every trial.

The head (2 CPUs, the dashboard, the driver) and a second node (1 CPU) run on this machine; two
concurrent 1-CPU trials therefore train one per node. Once a trial has reported a checkpoint from the
second node, a watcher thread kills that node; Tune retries the trial, which resumes from its last
checkpoint on the head.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import free_port, mlflow_server, trial_runs, write_space
from mlflow.tracking import MlflowClient
from ray._private import ray_constants
from ray._private.node import Node
from ray.cluster_utils import Cluster
from ray.tune import ExperimentAnalysis

from reid_tune.search.keys import NODE_KEY, TIME_ATTR, TRIAL_TAG
from reid_tune.search.summary import SearchSummary
from reid_tune.search.tuner import run_search
from reid_tune.synthetic import generate_demo

pytestmark = pytest.mark.slow

ITERATIONS, VALIDATE_EVERY = 20, 5
STEPS = list(range(VALIDATE_EVERY, ITERATIONS + 1, VALIDATE_EVERY))  # every validation of a trial
EXPERIMENT = "cluster"


@dataclass(frozen=True)
class NodeLoss:
    """A search that lost its second node: its summary, folder, tracking URI and what the loss hit."""

    summary: SearchSummary
    root: Path  # <storage>/<experiment>
    uri: str
    lost_node: str  # the killed node's id
    lost_trials: frozenset[str]  # the trials with a checkpoint trained there when it was killed


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Market-1501-style set with identities enough for the paper's P=18 batches."""
    out = tmp_path_factory.mktemp("cluster") / "data"
    generate_demo(out, num_train_ids=22, num_test_ids=4, size=(64, 32), junk=0, distractors=2)
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, Node]]:
    """A head with 2 CPUs and the dashboard, and a second 1-CPU node; the driver joins the head.

    The dashboard serves the state API that Ray Train needs to release finished worker groups, and
    every Ray process inherits ``RAY_API_SERVER_ADDRESS``, naming it, from this process."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        nodes = Cluster()
        try:
            nodes.add_node(
                num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
            )
            second = nodes.add_node(num_cpus=1)
            ray.init(address=nodes.address, log_to_driver=False)
            yield nodes, second
        finally:
            ray.shutdown()
            nodes.shutdown()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; empty if it is missing or still being written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def reports(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's results in Tune's ``result.json`` (one JSON a line), skipping a line still being written."""
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def newest_checkpoint_node(snapshot: Path) -> str | None:
    """The node that trained a Train run's newest checkpoint, from the snapshot (Ray Train's own file)
    that its controller writes as it registers one: seconds before Tune's ``result.json`` has it, as the
    driver is busy logging to MLflow."""
    latest = read_json(snapshot).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get(NODE_KEY)


def lose_node(nodes: Cluster, node: Node) -> None:
    """Kill every process of ``node`` at once, as losing its machine would: Ray's own and the workers
    its raylet started (after ``remove_node`` alone, a worker trains on until it notices the loss)."""
    import psutil  # Ray's own copy (ray/thirdparty_files): importable once ray is imported

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    workers = psutil.Process(raylet).children(recursive=True)
    nodes.remove_node(node, allow_graceful=False)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


class NodeKiller(threading.Thread):
    """Loses ``node`` once a trial has a checkpoint trained there, and remembers those trials. Only
    removing a node is safe off the main thread (adding one is not)."""

    def __init__(self, nodes: Cluster, node: Node, root: Path) -> None:
        super().__init__(daemon=True)
        self.nodes, self.node, self.root = nodes, node, root
        self.lost: set[str] = set()
        self.done = threading.Event()  # set by the search's end: stop watching

    def run(self) -> None:
        while not self.done.wait(0.2):
            snapshots = self.root.glob("train/*/checkpoint_manager_snapshot.json")
            hit = {
                path.parent.name for path in snapshots if newest_checkpoint_node(path) == self.node.node_id
            }
            if hit:
                lose_node(self.nodes, self.node)
                self.lost.update(hit)
                return


@pytest.fixture(scope="module")
def node_loss(
    cluster: tuple[Cluster, Node], data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeLoss]:
    """A 4-trial search, two at a time, without early stopping; its second node dies mid-search."""
    nodes, second = cluster
    folder = tmp_path_factory.mktemp("shared")  # the storage both nodes see
    with mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        space = write_space(
            folder,
            data,
            EXPERIMENT,
            tracking_uri=uri,
            train={"train_iterations": ITERATIONS, "validate_every": VALIDATE_EVERY},
            search={
                "num_samples": 4,
                "max_concurrent_trials": 2,
                "max_failures": 2,
                "scheduler": {"type": "none"},
            },
        )
        root = folder / "ray_results" / EXPERIMENT
        killer = NodeKiller(nodes, second, root)
        killer.start()
        try:
            summary = run_search(space)
        finally:
            killer.done.set()
            killer.join()
        yield NodeLoss(summary, root, uri, second.node_id, frozenset(killer.lost))


def attempts(trial_dir: Path) -> list[list[int]]:
    """The validation steps a trial reported, one list per try (a retry starts a new list)."""
    tries: list[list[int]] = []
    for report in reports(trial_dir):
        if report["iterations_since_restore"] == 1:
            tries.append([])
        tries[-1].append(int(report[TIME_ATTR]))
    return tries


def test_trials_ran_on_both_nodes(node_loss: NodeLoss) -> None:
    trained_on = {
        r[NODE_KEY] for result in node_loss.root.glob("*/result.json") for r in reports(result.parent)
    }
    assert len(trained_on) == 2 and node_loss.lost_node in trained_on
    assert len(node_loss.lost_trials) == 1
    (lost,) = node_loss.lost_trials
    assert reports(node_loss.root / lost)[0][NODE_KEY] == node_loss.lost_node
    assert node_loss.lost_node not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_every_trial_finished_despite_the_lost_node(node_loss: NodeLoss) -> None:
    summary = node_loss.summary
    assert not summary.interrupted
    assert len(summary.trials) == 4 and all(t.status == "TERMINATED" for t in summary.trials)
    assert [t.status for t in ExperimentAnalysis(str(node_loss.root)).trials] == ["TERMINATED"] * 4


def test_retried_trials_resumed_after_their_last_checkpoint(node_loss: NodeLoss) -> None:
    trials = ExperimentAnalysis(str(node_loss.root)).trials
    assert node_loss.lost_trials <= {t.trial_id for t in trials if t.num_failures > 0}
    for trial in trials:
        tries = attempts(node_loss.root / trial.trial_id)
        assert len(tries) == trial.num_failures + 1  # every try reported
        assert list(itertools.chain(*tries)) == STEPS  # a retry neither repeats nor skips a validation


def test_mlflow_trial_runs_finished_with_each_validation_once(node_loss: NodeLoss) -> None:
    client = MlflowClient(node_loss.uri)
    runs = trial_runs(client, EXPERIMENT)
    assert len(runs) == 4 and len({r.data.tags[TRIAL_TAG] for r in runs}) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/mAP")] == STEPS
