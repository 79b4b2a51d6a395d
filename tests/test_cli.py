"""The reid-tune command end to end on generated data, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import reid_tune


@pytest.mark.slow
def test_train_embed_evaluate(demo_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = reid_tune("train", "--train-set", demo_data / "market1501_train.csv", "--image-root", demo_data,
                     "--run-dir", run, "--network", "lunet_small", "--batch-p", 4, "--batch-k", 2,
                     "--input-height", 64, "--input-width", 32, "--pre-crop-height", 72, "--pre-crop-width",
                     36, "--train-iterations", 4, "--checkpoint-frequency", 2, "--margin", "0.2",
                     "--num-workers", 0, "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "config.json").read_text())["margin"] == 0.2
    for split in ("query", "test"):
        done = reid_tune("embed", "--run-dir", run, "--dataset", demo_data / f"market1501_{split}.csv",
                         "--image-root", demo_data, "--out", tmp_path / f"{split}.h5", "--device", "cpu")
        assert done.returncode == 0, done.stderr
    done = reid_tune("evaluate", "--query-dataset", demo_data / "market1501_query.csv",
                     "--query-embeddings", tmp_path / "query.h5", "--gallery-dataset",
                     demo_data / "market1501_test.csv", "--gallery-embeddings", tmp_path / "test.h5",
                     "--excluder", "market1501", "--out", tmp_path / "result.json")
    assert done.returncode == 0, done.stderr
    assert "mAP" in done.stdout and "rank-1" in done.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"mAP", "CMC", "aps", "mINP"} <= result.keys()
    done = reid_tune("evaluate", "--query-dataset", demo_data / "market1501_query.csv",
                     "--query-embeddings", tmp_path / "query.h5", "--gallery-dataset",
                     demo_data / "market1501_test.csv", "--gallery-embeddings", tmp_path / "test.h5",
                     "--excluder", "market1501", "--rerank", "--k1", 5, "--k2", 2)
    assert done.returncode == 0 and "mAP" in done.stdout, done.stderr


def test_bad_training_list_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("0001,a.jpg\nnot a row\n")
    done = reid_tune("train", "--train-set", csv, "--image-root", tmp_path, "--run-dir", tmp_path / "run")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "train.csv:2" in done.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_new_options(tmp_path: Path) -> None:
    done = reid_tune("train", "--run-dir", tmp_path, "--resume", "--batch-p", 8)
    assert done.returncode == 2 and "--batch-p" in done.stderr
