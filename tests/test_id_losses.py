"""BoT's identity losses against slow references: label-smoothed cross-entropy, center loss and its
gradient, and the training-only parts' place in the step and the checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reid_tune.checkpoints import load_model, read_checkpoint
from reid_tune.config import TrainConfig
from reid_tune.id_losses import center_loss, identity_losses, label_smoothed_cross_entropy
from reid_tune.steps import build_step
from reid_tune.train import train


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_formula(epsilon: float) -> None:
    """-sum_k q_k log p_k with q = (1 - eps) one_hot + eps / N, averaged over the batch (Szegedy et al.)."""
    logits, labels = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 3, 6, 3, 1])
    want = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        for k, value in enumerate(row):
            q = (1 - epsilon) * (k == label) + epsilon / len(row)
            want -= q * (value - log_norm) / len(labels)
    assert math.isclose(float(label_smoothed_cross_entropy(logits, labels, epsilon)), want, rel_tol=1e-6)
    if epsilon == 0:
        plain = torch.nn.functional.cross_entropy(logits.float(), labels)
        torch.testing.assert_close(label_smoothed_cross_entropy(logits, labels, 0.0), plain)


def test_center_loss_and_its_gradient_match_the_reference() -> None:
    """Wen et al.: mean over the batch of |x_i - c_{y_i}|^2; d/dx_i = 2 (x_i - c_{y_i}) / B, and the
    centers get minus the sum of their samples' gradients."""
    features = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0, 2])
    loss = center_loss(features, labels, centers)
    want = sum(float(((features[i] - centers[y]) ** 2).sum()) for i, y in enumerate(labels.tolist())) / 6
    assert math.isclose(float(loss), want, rel_tol=1e-12)
    loss.backward()
    for i, y in enumerate(labels.tolist()):
        torch.testing.assert_close(features.grad[i], 2 * (features[i] - centers[y]).detach() / 6)
    for c in range(3):
        mine = [i for i, y in enumerate(labels.tolist()) if y == c]
        torch.testing.assert_close(centers.grad[c], -sum(features.grad[i] for i in mine))


def test_no_identity_parts_in_the_papers_recipe() -> None:
    assert identity_losses(TrainConfig(), 128, 751) is None
    parts = identity_losses(TrainConfig(id_loss_weight=1.0), 128, 751)
    assert parts.classifier.weight.shape == (751, 128) and parts.centers is None


def test_the_step_adds_the_weighted_losses(tiny_config: TrainConfig) -> None:
    cfg = tiny_config.replace(bnneck=True, id_loss_weight=1.0, label_smoothing=0.1, center_loss_weight=5e-4)
    step = build_step(cfg, torch.device("cpu"), num_ids=12)
    images, labels = torch.randn(8, 3, 64, 32), torch.tensor([0, 0, 3, 3, 5, 5, 7, 7])
    centers = step.identity.centers.detach().clone()
    stats = step(images, labels, lr=3e-4)
    total = stats["loss_mean"] + stats["id_loss"] + 5e-4 * stats["center_loss"]
    torch.testing.assert_close(stats["total_loss"], total)
    moved = (step.identity.centers.detach() - centers).abs().sum(1)
    assert set(moved.nonzero()[:, 0].tolist()) == {0, 3, 5, 7}  # only the batch's identities' centers
    assert step.model.neck.weight.requires_grad  # the ID loss trains the neck


def test_checkpoints_keep_the_parts_apart_from_the_network(tiny_config: TrainConfig, tmp_path: Path) -> None:
    cfg = tiny_config.replace(id_loss_weight=1.0, center_loss_weight=5e-4, bnneck=True)
    result = train(cfg, tmp_path / "run")
    state = read_checkpoint(result.checkpoint)
    assert {"classifier.weight", "centers"} <= set(state["identity"])
    model, _ = load_model(result.checkpoint)
    assert not any("classifier" in key or "centers" in key for key in model.state_dict())
