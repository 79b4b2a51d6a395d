"""Embedding: triplet-reid's HDF5 layout with test-time augmentation, the CSV format, checkpoint choice."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from reid_tune.augmentation import Preprocessing
from reid_tune.checkpoints import find_checkpoint, load_model
from reid_tune.config import TrainConfig
from reid_tune.datasets import load_csv
from reid_tune.embed import embed_dataset
from reid_tune.errors import ReidTuneError
from reid_tune.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(train_set=str(demo_data / "market1501_train.csv"), image_root=str(demo_data),
                      network="lunet_small", batch_p=4, batch_k=2, input_height=64, input_width=32,
                      pre_crop_height=72, pre_crop_width=36, train_iterations=4, checkpoint_frequency=2,
                      num_workers=0, device="cpu", embedding_dim=16)
    train(cfg, run_dir)
    return run_dir


def _embed(trained: Path, demo_data: Path, out: Path, **options) -> Path:
    model, cfg = load_model(find_checkpoint(trained))
    return embed_dataset(model, Preprocessing.of(cfg), demo_data / "market1501_query.csv", demo_data, out,
                         num_workers=0, batch_size=5, **options)


def test_plain_embedding_layout(trained: Path, demo_data: Path, tmp_path: Path) -> None:
    n = len(load_csv(demo_data / "market1501_query.csv"))
    with h5py.File(_embed(trained, demo_data, tmp_path / "q.h5"), "r") as f:
        assert f["emb"].shape == (n, 16) and f["emb"].dtype == np.float32
        assert "emb_aug" not in f
        assert [t.decode() for t in f["augmentation_types"]] == ["original_resize"]


def test_flip_and_five_crops_keep_every_view(trained: Path, demo_data: Path, tmp_path: Path) -> None:
    out = _embed(trained, demo_data, tmp_path / "q.h5", flip_augment=True, crop_augment="five",
                 aggregator="mean")
    with h5py.File(out, "r") as f:
        views, emb = f["emb_aug"][()], f["emb"][()]
        names = [t.decode() for t in f["augmentation_types"]]
    assert views.shape[0] == 10 and names[0] == "original_center" and names[5] == "original_flip_center"
    np.testing.assert_allclose(emb, views.mean(0), rtol=1e-5, atol=1e-7)


def test_csv_format_writes_path_and_values(trained: Path, demo_data: Path, tmp_path: Path) -> None:
    out = _embed(trained, demo_data, tmp_path / "q.csv", fmt="csv")
    rows = out.read_text().splitlines()
    dataset = load_csv(demo_data / "market1501_query.csv")
    assert len(rows) == len(dataset)
    first = rows[0].split(",")
    assert first[0] == dataset.fids[0] and len(first) == 17


def test_checkpoint_by_iteration(trained: Path) -> None:
    assert find_checkpoint(trained, 2).name == "checkpoint-000002.pt"
    with pytest.raises(ReidTuneError, match="iteration 3"):
        find_checkpoint(trained, 3)
