"""Training options: the paper's defaults, validation on load, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ReidTuneError
from reid_tune.schedules import lr_at


def test_defaults_are_the_papers_settings() -> None:
    cfg = TrainConfig()
    assert (cfg.batch_p, cfg.batch_k, cfg.margin, cfg.metric) == (18, 4, "soft", "euclidean")
    assert (cfg.pre_crop_size, cfg.input_size) == ((288, 144), (256, 128))
    assert (cfg.learning_rate, cfg.train_iterations, cfg.decay_start_iteration) == (3e-4, 25_000, 15_000)
    assert (cfg.decay_factor, cfg.checkpoint_frequency, cfg.embedding_dim) == (0.001, 1_000, 128)
    assert (cfg.network, cfg.head) == ("resnet50", "fc1024")


@pytest.mark.parametrize(("data", "message"), [
    ({"batch_q": 3}, "unknown option 'batch_q'"),
    ({"batch_p": "18"}, "batch_p='18': expected"),
    ({"batch_p": True}, "batch_p=True: expected"),
    ({"batch_k": 1}, "batch_k=1: must be >= 2"),
    ({"margin": "hard"}, "margin='hard'"),
    ({"margin": -0.1}, "margin=-0.1"),
    ({"decay_factor": 0.0}, "decay_factor=0.0"),
    ({"pre_crop_height": 100}, "pre_crop_height=100: must be >= input_height=256"),
    ({"precision": "fp8"}, "precision='fp8'"),
])
def test_bad_options_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ReidTuneError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        config_from_dict(data, source="run.json")
    assert "run.json" in str(err.value) and "\n" not in str(err.value)


def test_ints_are_accepted_for_floats_and_round_trip(tmp_path) -> None:
    cfg = config_from_dict({"learning_rate": 1, "margin": 0.2, "pretrained": None})
    assert isinstance(cfg.learning_rate, float) and cfg.margin == 0.2
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg
    assert cfg.replace(batch_p=8).batch_size == 32


def test_lr_schedule_matches_triplet_reid() -> None:
    cfg = TrainConfig()
    assert lr_at(0, cfg) == lr_at(15_000, cfg) == 3e-4
    assert math.isclose(lr_at(20_000, cfg), 3e-4 * 0.001 ** 0.5)
    assert math.isclose(lr_at(25_000, cfg), 3e-7)
    no_decay = cfg.replace(decay_start_iteration=25_000)
    assert lr_at(24_999, no_decay) == 3e-4
