"""Bad input through the CLI, as a user types it: one ``error:`` line naming the culprit, exit status 2,
no traceback, and nothing written (no run folder, no embeddings, no stray ``mlflow.db``)."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import free_port, reid_tune, search_document, write_yaml

TRAIN = (
    "train",
    "--train-set",
    "train.csv",
    "--image-root",
    "images",
    "--run-dir",
    "run",
    "--batch-p",
    "4",
    "--device",
    "cpu",
)
EMBED = ("embed", "--dataset", "query.csv", "--image-root", "images", "--out", "out/q.h5")
EXPORT = ("export", "--run-dir", "empty", "--out")
# A search that gets as far as its resources imports the search layer (the GPU machine has no Ray, Optuna).
NEEDS_SEARCH = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("ray", "optuna", "mlflow")),
    reason="needs Ray, Optuna and MLflow (the search layer)",
)
EVALUATE = (
    "evaluate",
    "--query-dataset",
    "query.csv",
    "--query-embeddings",
    "q.h5",
    "--gallery-dataset",
    "test.csv",
    "--gallery-embeddings",
    "g.h5",
    "--excluder",
    "market1501",
)

# (what is wrong, the command line, what the error line must name)
CASES = [
    ("unknown network", (*TRAIN, "--network", "resnet5"), "resnet5"),
    ("unknown head", (*TRAIN, "--network", "lunet_small", "--head", "fc999"), "fc999"),
    ("negative margin", (*TRAIN, "--margin", "-1"), "margin"),
    ("P of one", (*TRAIN, "--batch-p", "1"), "batch_p"),
    ("P above the identities", (*TRAIN, "--batch-p", "500"), "batch_p"),
    ("unknown precision", (*TRAIN, "--precision", "fp8"), "precision"),
    ("not a number", (*TRAIN, "--learning-rate", "fast"), "--learning-rate"),
    ("unknown option", (*TRAIN, "--bogus", "1"), "--bogus"),
    (
        "missing training list",
        ("train", "--train-set", "nope.csv", "--image-root", "images", "--run-dir", "run"),
        "nope.csv",
    ),
    ("resume of nothing", ("train", "--run-dir", "empty", "--resume"), "empty"),
    ("run folder without checkpoints", (*EMBED, "--run-dir", "empty"), "empty"),
    ("both run folder and model", (*EMBED, "--run-dir", "empty", "--model", "models:/x@champion"), "--model"),
    ("unknown crop", (*EMBED, "--run-dir", "empty", "--crop-augment", "six"), "six"),
    ("unknown excluder", (*EVALUATE[:-1], "viper"), "viper"),
    ("missing embeddings", EVALUATE, "q.h5"),
    ("embeddings not HDF5", (*EVALUATE[:4], "query.csv", *EVALUATE[5:]), "query.csv"),
    ("unknown data set kind", ("prepare", "viper", "images", "--out", "lists"), "viper"),
    ("missing data set", ("prepare", "market1501", "nowhere", "--out", "lists"), "nowhere"),
    ("YAML syntax", ("syntax.yaml",), "syntax.yaml:3"),
    ("YAML unknown key", ("unknown_key.yaml",), "validate_evry"),
    ("YAML bad range", ("bad_range.yaml",), "lr"),
    ("YAML bad margin", ("bad_margin.yaml",), "margin"),
    ("YAML unknown network", ("bad_network.yaml",), "resnet5"),
    ("YAML missing file", ("nosuch.yaml",), "nosuch.yaml"),
    ("YAML batch_p two workers cannot split", ("odd_batch.yaml",), "batch_p: 5: expected a multiple of 2"),
    pytest.param(
        "YAML GPU this machine lacks", ("gpu.yaml", "--smoke"), "resources.gpus_per_worker",
        marks=NEEDS_SEARCH, id="YAML GPU this machine lacks",
    ),
    ("YAML pretrained file missing", ("no_weights.yaml",), "train.pretrained: '/nowhere/weights.pth'"),
    ("YAML pretrained weights unreachable", ("offline_weights.yaml",), "pretrained: 'imagenet': could not"),
    ("promote without a tracking database", ("promote", "nosuch"), "mlflow.db"),
    ("export of a run folder without checkpoints", (*EXPORT, "m.onnx"), "empty"),
    ("export to an unknown format", (*EXPORT, "m.onnx", "--format", "tflite"), "tflite"),
    ("export to a suffix of no format", (*EXPORT, "m.bin"), "--format"),
    ("export below a file", (*EXPORT, "query.csv/m.onnx"), "query.csv"),
    ("export onto a folder", (*EXPORT, "empty", "--format", "onnx"), "is a folder"),
    ("export without a tracking database", ("export", "--model", "models:/x@champion", "--out", "m.onnx"),
     "mlflow.db"),
    ("embed an ONNX file that is none", (*EMBED, "--onnx", "query.csv"), "query.csv: not an ONNX model"),
    ("embed a missing ONNX file", (*EMBED, "--onnx", "nope.onnx"), "nope.onnx"),
    ("embed a TorchScript file that is none", (*EMBED, "--torchscript", "query.csv"), "query.csv"),
    ("ui without a tracking database", ("ui",), "mlflow.db"),
]


@pytest.fixture(scope="module")
def workdir(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a small data set, an empty run folder and search files with one mistake each."""
    work = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(demo_data, work / "images")
    for split in ("train", "query", "test"):
        shutil.copy(demo_data / f"market1501_{split}.csv", work / f"{split}.csv")
    (work / "empty").mkdir()
    (work / "syntax.yaml").write_text("experiment: x\ndata: [\n")
    good = search_document(
        work / "images",
        "bad",
        storage=str(work / "ray_results"),
        mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db"},
    )
    write_yaml(work / "unknown_key.yaml", {**good, "train": {**good["train"], "validate_evry": 10}})
    write_yaml(
        work / "bad_range.yaml", {**good, "space": {**good["space"], "lr": {"loguniform": [1e-3, 1e-4]}}}
    )
    write_yaml(work / "bad_network.yaml", {**good, "train": {**good["train"], "network": "resnet5"}})
    write_yaml(
        work / "bad_margin.yaml", {**good, "space": {**good["space"], "margin": {"choice": ["soft", -1]}}}
    )
    odd = {**good, "resources": {"workers": 2}, "space": {**good["space"], "batch_p": {"choice": [4, 5]}}}
    write_yaml(work / "odd_batch.yaml", odd)
    # a file that passes every check of the YAML (P fits the 9 training identities): it fails at start
    space = {**good["space"], "batch_p": {"int": [2, 8]}}
    runnable = {**good, "space": space, "search": {"start_points": []}}
    # half a GPU more than this machine has: on a machine without one, the issue's `gpus_per_worker: 0.5`
    gpu = {"gpus_per_worker": torch.cuda.device_count() + 0.5}
    write_yaml(work / "gpu.yaml", {**runnable, "resources": gpu})
    for name, pretrained in (("no_weights", "/nowhere/weights.pth"), ("offline_weights", "imagenet")):
        train = {**good["train"], "network": "resnet18", "pretrained": pretrained}
        write_yaml(work / f"{name}.yaml", {**runnable, "train": train})
    return work


@pytest.fixture(scope="module", autouse=True)
def offline_and_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CLI runs see no internet (HTTPS goes to a closed local port), an empty torch.hub cache outside
    the work folder, and no Ray cluster: a search is local."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("no_proxy", "NO_PROXY", "RAY_ADDRESS"):
            env.delenv(name, raising=False)
        for name in ("https_proxy", "HTTPS_PROXY"):
            env.setenv(name, f"http://127.0.0.1:{free_port()}")
        env.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))
        yield


def _tree(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.mark.parametrize(("wrong", "args", "culprit"), CASES, ids=[getattr(c, "id", None) or c[0] for c in CASES])  # noqa: E501
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    workdir: Path, wrong: str, args: tuple[str, ...], culprit: str
) -> None:
    before = _tree(workdir)
    done = reid_tune(*args, cwd=workdir)
    assert done.returncode == 2, (wrong, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert culprit in lines[0], (wrong, lines[0])
    assert _tree(workdir) == before, f"{wrong}: wrote {sorted(map(str, _tree(workdir) - before))}"


@NEEDS_SEARCH
def test_a_local_search_asking_for_a_gpu_this_machine_lacks_fails_within_a_minute(workdir: Path) -> None:
    """The issue's case (it waited for ever): the error above comes before Ray starts."""
    started = time.monotonic()
    assert reid_tune("gpu.yaml", "--smoke", cwd=workdir).returncode == 2
    assert time.monotonic() - started < 60
