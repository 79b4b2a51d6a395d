"""End to end on real data: train a small network on CUHK03, embed, evaluate cross-camera on val."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_tune.augmentation import Preprocessing
from reid_tune.checkpoints import load_model
from reid_tune.config import TrainConfig
from reid_tune.datasets import load_csv, prepare
from reid_tune.embed import embed_images
from reid_tune.evaluate import EvalResult, evaluate
from reid_tune.models import ReidModel, create_model
from reid_tune.train import train


def _val_result(model: ReidModel, cfg: TrainConfig, lists: Path, root: Path) -> EvalResult:
    """Camera A queries against the camera B gallery of CUHK03 val/."""
    query, gallery = (load_csv(lists / f"cuhk03_val_{s}.csv") for s in ("query", "gallery"))
    prep = Preprocessing.of(cfg)
    q, g = (embed_images(model, [root / f for f in d.fids], prep, num_workers=0)[0] for d in (query, gallery))
    return evaluate(q, g, query.pids, gallery.pids, query.fids, gallery.fids, excluder="cuhk03")


# BoT's tricks that a LuNet can take (no last stride: not a ResNet), on the paper's schedule: BoT's
# multi-step schedule, made for 120 epochs, leaves 200 iterations at a hundredth of the lr after 58%
BOT = {"bnneck": True, "id_loss_weight": 1.0, "label_smoothing": 0.1, "center_loss_weight": 5e-4,
       "random_erasing": 0.5, "weight_decay": 5e-4}


@pytest.mark.slow
@pytest.mark.parametrize(("options", "gain"), [({}, 2.0), (BOT, 1.5)], ids=["paper", "bot"])
def test_training_beats_an_untrained_network(
    shared_data: Path, tmp_path: Path, options: dict, gain: float
) -> None:
    root = shared_data / "cuhk03-labeled"
    prepare("cuhk03", root, tmp_path)
    cfg = TrainConfig(train_set=str(tmp_path / "cuhk03_train_resized.csv"), image_root=str(root),
                      network="lunet_small", input_height=128, input_width=64, pre_crop_height=144,
                      pre_crop_width=72, train_iterations=200, decay_start_iteration=150,
                      checkpoint_frequency=200, num_workers=1, device="cpu").replace(**options)
    torch.manual_seed(cfg.seed)
    untrained = create_model(cfg.network, cfg.head, embedding_dim=cfg.embedding_dim)
    before = _val_result(untrained, cfg, tmp_path, root)

    result = train(cfg, tmp_path / "run")
    after = _val_result(load_model(result.checkpoint)[0], cfg, tmp_path, root)

    # measured: untrained 3.0% mAP; these 200 iterations 6.7-7.6% (either data path, by thread count);
    # 2,000 iterations 19.8% (see README); BoT's tricks 5.9% (the ID loss over 743 identities and random
    # erasing learn slower at first: README's CUHK03 comparison)
    print(f"{options and 'bot' or 'paper'}: untrained {before.summary()}; trained {after.summary()}")
    assert after.mAP > gain * before.mAP, (before.summary(), after.summary())
    assert after.rank(1) > before.rank(1)
