"""Shared fixtures: the real data beside the checkout, and small generated data sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def decoded_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$REID_TUNE_CACHE`` in this session's temporary folder: training with ``data_path: auto`` builds
    decoded caches, which must not land in the user's home nor be shared with another test session.
    Subprocesses and Ray trials inherit it."""
    from reid_tune.gpu_data import CACHE_ENV

    folder = tmp_path_factory.mktemp("decoded-cache")
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly on a fresh clone without it."""
    if not (SHARED_DATA / "cuhk03-labeled" / "val").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated Market-1501-style set with its CSVs (market1501_{train,query,test}.csv)."""
    from reid_tune.synthetic import generate_demo

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, num_train_ids=12, num_test_ids=8, images_per_camera=2, num_cameras=2, seed=0)
    return out


@pytest.fixture()
def tiny_config(demo_data: Path):
    """Options for a few-second CPU training on the generated set."""
    from reid_tune.config import TrainConfig

    return TrainConfig(
        train_set=str(demo_data / "market1501_train.csv"), image_root=str(demo_data),
        network="lunet_small", batch_p=4, batch_k=2, input_height=64, input_width=32,
        pre_crop_height=72, pre_crop_width=36, train_iterations=6, decay_start_iteration=3,
        checkpoint_frequency=3, log_every=1, num_workers=0, device="cpu",
    )
