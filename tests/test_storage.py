"""Search storage as a local folder or a bucket: the file helpers, and a whole search whose trials,
checkpoints and state live in S3 (a local S3-compatible server, moto), on a real local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, search_document, write_yaml
from mlflow.tracking import MlflowClient

from reid_tune.errors import ReidTuneError
from reid_tune.search import storage
from reid_tune.search.keys import CHECKPOINT_ARTIFACTS, ROLE_TAG
from reid_tune.search.space import load_spec
from reid_tune.search.tuner import run_search, start_local_ray
from reid_tune.synthetic import generate_demo

BUCKET = "reid-tune-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server with one bucket; the AWS variables that point pyarrow (and Ray) at it are set for
    the module, before its Ray instance starts, so Ray's workers inherit them."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = dict(os.environ)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    try:
        _wait_for(endpoint)
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")  # CreateBucket
        urllib.request.urlopen(request, timeout=10).read()
        yield f"s3://{BUCKET}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait(timeout=30)


def _wait_for(endpoint: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server at {endpoint} did not start")


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty storage folder: local, or a prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return storage.join(request.getfixturevalue("s3"), tmp_path.name)


# ---------------------------------------------------------------- the helpers


def test_join_keeps_a_uri_query() -> None:
    assert storage.join("s3://b/p?endpoint_override=h:9", "e", "f") == "s3://b/p/e/f?endpoint_override=h:9"
    assert storage.join("/data/runs", "e") == "/data/runs/e"
    assert storage.absolute("gs://b/x") == "gs://b/x"
    assert storage.absolute("runs") == str(Path("runs").resolve())


def test_files_round_trip(location: str) -> None:
    assert storage.entries(location) == [] and storage.read_text(storage.join(location, "a.json")) is None
    storage.write_text(storage.join(location, "run", "ck", "validation.json"), '{"mAP": 0.5}')
    storage.write_text(storage.join(location, "state.json"), "{}")
    assert storage.entries(location) == ["run", "state.json"]
    with storage.local_copy(storage.join(location, "run")) as folder:
        assert json.loads((folder / "ck" / "validation.json").read_text()) == {"mAP": 0.5}


def test_unknown_scheme_is_a_located_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo(data, num_train_ids=12, num_test_ids=4, junk=0, distractors=0)
    space = write_yaml(tmp_path / "s.yaml", search_document(data, "s", storage="ftp://host/runs"))
    line = next(n for n, text in enumerate(space.read_text().splitlines(), 1) if text.startswith("storage:"))
    with pytest.raises(ReidTuneError, match=rf"s.yaml:{line}: storage: .*'ftp'"):
        load_spec(space)


# ---------------------------------------------------------------- a search stored in S3


@pytest.mark.slow
def test_search_runs_and_resumes_from_s3(s3: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo(data, num_train_ids=22, num_test_ids=4, size=(64, 32), junk=0, distractors=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    document = search_document(
        data,
        "bucket",
        storage=storage.join(s3, "searches"),
        mlflow={"tracking_uri": uri},
        search={"num_samples": 2, "max_concurrent_trials": 2, "scheduler": {"type": "none"}},
    )
    space = write_yaml(tmp_path / "bucket.yaml", document)
    start_local_ray(num_cpus=3)  # two 1-CPU trials and their Tune functions
    try:
        summary = run_search(space)
        assert [t.status for t in summary.trials] == ["TERMINATED"] * 2 and not summary.interrupted
        root = storage.join(s3, "searches", "bucket")
        assert {"reid_tune_search.json", "train"} <= set(storage.entries(root))
        assert len(storage.entries(storage.join(root, "train"))) == 2  # one Train run per trial
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("bucket").experiment_id
        runs = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'trial'")
        for run in runs:  # the best checkpoint came down from the bucket into MLflow
            assert run.info.status == "FINISHED"
            assert CHECKPOINT_ARTIFACTS in {a.path for a in client.list_artifacts(run.info.run_id)}
        again = run_search(space, resume=True)  # the state file is read back from the bucket
        assert not again.interrupted and again.parent_run_id == summary.parent_run_id
    finally:
        import ray

        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
