"""Training: checkpoints, interrupt and resume to the identical state, stored options, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import InterruptAt, weights

from reid_tune.checkpoints import list_checkpoints, load_model
from reid_tune.config import TrainConfig
from reid_tune.errors import ReidTuneError
from reid_tune.train import train

# BoT's options that change the network, the optimizer and the schedule (decayed within the 6 iterations)
BOT_OPTIONS = {"bnneck": True, "weight_decay": 5e-4, "schedule": "multistep", "milestones": (0.5, 0.8),
               "decay_factor": 0.1, "warmup_iterations": 2, "random_erasing": 0.5, "id_loss_weight": 1.0,
               "label_smoothing": 0.1, "center_loss_weight": 5e-4}


@pytest.mark.parametrize(("data_path", "options"),
                         [("auto", {}), ("cpu", {}), ("auto", BOT_OPTIONS), ("cpu", BOT_OPTIONS)],
                         ids=["auto", "cpu", "auto-bot", "cpu-bot"])
def test_interrupted_then_resumed_run_equals_uninterrupted(
    tiny_config: TrainConfig, tmp_path: Path, data_path: str, options: dict
) -> None:
    """On the CPU, ``auto`` takes the decoded cache (built once for the three runs), ``cpu`` a DataLoader."""
    cfg = tiny_config.replace(data_path=data_path, cache_dir=str(tmp_path / "cache"), **options)
    whole = train(cfg, tmp_path / "whole")
    assert not whole.interrupted and whole.step == 6

    cut = train(cfg, tmp_path / "cut", callback=InterruptAt(2))
    assert cut.interrupted and cut.step == 2 and cut.checkpoint.name == "checkpoint-000002.pt"
    resumed = train(None, tmp_path / "cut", resume=True)
    assert resumed.step == 6 and not resumed.interrupted

    a, b = weights(whole.checkpoint), weights(resumed.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == (data_path == "auto")


def test_run_folder_holds_options_checkpoints_and_log(tiny_config: TrainConfig, tmp_path: Path) -> None:
    train(tiny_config, tmp_path)
    assert TrainConfig.load(tmp_path / "config.json") == tiny_config
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003.pt", "checkpoint-000006.pt"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for key in ("loss_mean", "active_fraction", "top1", "prec_at_k", "lr", "images_per_s"):
        assert key in log[0]
    assert log[-1]["lr"] < log[0]["lr"]
    model, cfg = load_model(list_checkpoints(tmp_path)[-1])
    assert cfg == tiny_config and not model.training


def test_existing_run_is_not_overwritten(tiny_config: TrainConfig, tmp_path: Path) -> None:
    train(tiny_config, tmp_path)
    with pytest.raises(ReidTuneError, match="already holds a run"):
        train(tiny_config, tmp_path)
    with pytest.raises(ReidTuneError, match="nothing to resume"):
        train(None, tmp_path / "empty", resume=True)


def test_too_few_identities_for_p(tiny_config: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(ReidTuneError, match="batch_p=500"):
        train(tiny_config.replace(batch_p=500), tmp_path)
    assert not list_checkpoints(tmp_path)


@pytest.mark.parametrize(("gpus", "device", "want", "share"), [
    (0, "auto", "cpu", 1.0),  # Ray leaves CUDA_VISIBLE_DEVICES unset: auto would take a GPU it never reserved
    (0, "mps", "mps", 1.0),  # Ray does not count Apple's GPU
    (0.5, "auto", "auto", 0.5),  # two trials share a GPU, each its half
    (2, "auto", "auto", 1.0),
])
def test_a_trial_trains_on_what_ray_reserved_for_it(
    demo_data: Path, tmp_path: Path, gpus: float, device: str, want: str, share: float
) -> None:
    pytest.importorskip("ray")
    from helpers import write_space

    from reid_tune.search.space import load_spec
    from reid_tune.search.trainable import gpu_share, trial_config

    sampled = {"batch_p": 4, "batch_k": 2, "margin": "soft", "lr": 3e-4, "decay_start": 0.5}
    sections = {  # the generated set has few identities: small P, and a start point that fits
        "train": {"device": device},
        "space": {"batch_p": {"int": [2, 6]}, "decay_factor": 0.001},
        "search": {"start_points": [sampled]},
    }
    spec = load_spec(write_space(tmp_path, demo_data, "t", tracking_uri=None, **sections))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_worker": gpus})})
    assert trial_config(spec, sampled).device == want and gpu_share(spec) == share
