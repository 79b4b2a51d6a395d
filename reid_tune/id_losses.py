"""BoT's identity losses (Luo et al. 2019), the training-only parts beside the triplet loss: a classifier
over the training identities with label-smoothed cross-entropy (Szegedy et al. 2016), and center loss
(Wen et al. 2016) with its learned class centers. Checkpoints keep them apart from the network, so
embedding, evaluation and the registered model use the embedding network alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_tune.config import TrainConfig
from reid_tune.errors import ConfigError

CLASSIFIER_INIT_STD = 0.001  # BoT's weights_init_classifier


def label_smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Mean cross-entropy against ``(1 - eps) * one_hot + eps / N`` (BoT's CrossEntropyLabelSmooth)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    targets = F.one_hot(labels, logits.shape[1]).to(log_probs.dtype)
    targets = (1 - epsilon) * targets + epsilon / logits.shape[1]
    return -(targets * log_probs).sum(1).mean()


def center_loss(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each feature to its class center (BoT's CenterLoss, clamped alike)."""
    return (features - centers[labels]).square().sum(1).clamp(1e-12, 1e12).mean()


class IdentityLosses(nn.Module):
    """The classifier and the centers of one run, and the weighted sum of their losses."""

    def __init__(self, cfg: TrainConfig, dim: int, num_ids: int) -> None:
        super().__init__()
        self.id_weight, self.smoothing = cfg.id_loss_weight, cfg.label_smoothing
        self.center_weight = cfg.center_loss_weight
        self.classifier = nn.Linear(dim, num_ids, bias=False) if self.id_weight else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=CLASSIFIER_INIT_STD)
        self.centers = nn.Parameter(torch.randn(num_ids, dim)) if self.center_weight else None

    def forward(
        self, triplet_features: torch.Tensor, retrieval_features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted losses: ID on the retrieval features (after a BNNeck), center on the triplet ones."""
        total, stats = triplet_features.new_zeros(()), {}
        if self.classifier is not None:
            logits = self.classifier(retrieval_features)
            id_loss = label_smoothed_cross_entropy(logits, labels, self.smoothing)
            total, stats["id_loss"] = total + self.id_weight * id_loss, id_loss.detach()
        if self.centers is not None:
            centered = center_loss(triplet_features, labels, self.centers)
            total, stats["center_loss"] = total + self.center_weight * centered, centered.detach()
        return total, stats


def identity_losses(cfg: TrainConfig, dim: int, num_ids: int | None) -> IdentityLosses | None:
    """The run's identity losses, or None when ``cfg`` uses neither (the paper's recipe)."""
    if not (cfg.id_loss_weight or cfg.center_loss_weight):
        return None
    if not num_ids:
        raise ConfigError("id_loss_weight, center_loss_weight: no training identities, expected num_ids")
    return IdentityLosses(cfg, dim, num_ids)
