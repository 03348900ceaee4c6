"""Head-only SCAN on cached features (pretext.method: pretrained), as the paper does on ImageNet.

A head-only `ClusteringModel` has a `FrozenFeatures` backbone. In training and evaluation it
only standardises cached features, so the pretrained network never runs and checkpoints hold
just the heads; `attach_network` puts the network in front when new images must be classified.
All heads (linear or small MLPs, `cluster.head_hidden`) train together on the same batches.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from scan.nets.models import ClusteringModel


class FrozenFeatures(nn.Module):
    """Backbone of a head-only model: per-dimension standardised features of a frozen network.

    Standardising with the training features' mean and std puts every feature on the same
    scale, so the heads' default learning rate suits any pretrained network.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())   # (D,)
        self.register_buffer("std", std.float())     # (D,)
        self.feature_dim = mean.numel()
        self.network: nn.Module | None = None

    @classmethod
    def fit(cls, features: torch.Tensor) -> FrozenFeatures:
        """Statistics of (N, D) training features."""
        return cls(features.mean(0), features.std(0).clamp_min(1e-6))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    def forward(self, x):
        """[0, 1] images -> standardised features; needs the network (`attach_network`)."""
        if self.network is None:
            raise RuntimeError("this head-only model has no network attached: use scan.nets.heads.attach_network")
        return self.standardize(self.network(x))


def attach_network(model: ClusteringModel, network: nn.Module) -> ClusteringModel:
    """Put the frozen pretrained network in front of a head-only model, so it maps images to logits."""
    model.backbone.network = network.eval()
    return model


def feature_logits(model: ClusteringModel, features: torch.Tensor) -> torch.Tensor:
    """(H, B, C) logits of every head from (B, D) cached features."""
    return model.heads_from_features(model.backbone.standardize(features))


def random_views(views: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, D): one of its cached views (V, N, D) per index, drawn from the CPU RNG (checkpointed)."""
    pick = torch.randint(len(views), (len(idx),))
    return views[pick.to(views.device), idx.to(views.device)]


def pair_logits(model: ClusteringModel, views: torch.Tensor) -> Callable:
    """SCAN's forward on cached features: (anchor idx, neighbour idx) -> (H, 2B, C) logits.

    Anchors and neighbours each use a random view (unaugmented or augmented), which is what
    augmenting the images would do, without running the network.
    """
    def logits(idx, nb):
        return feature_logits(model, torch.cat([random_views(views, idx), random_views(views, nb)]))
    return logits


def weak_strong_logits(model: ClusteringModel, views: torch.Tensor) -> Callable:
    """Self-labelling's forward on cached features: idx -> (weak logits, strong logits), each (B, C).

    The pseudo-label comes from the unaugmented view (no gradient), the loss from a random
    augmented view (the unaugmented one when no views are cached).
    """
    augmented = views[1:] if len(views) > 1 else views

    def logits(idx):
        with torch.no_grad():
            weak = feature_logits(model, views[0, idx.to(views.device)])[0]
        return weak, feature_logits(model, random_views(augmented, idx))[0]
    return logits


@torch.no_grad()
def feature_probs(model: ClusteringModel, features: torch.Tensor, batch_size: int = 8192,
                  dtype=torch.float32) -> torch.Tensor:
    """(H, N, C) probabilities of every head for (N, D) cached features, on the CPU as `dtype`."""
    model.eval()
    device = model.backbone.mean.device
    return torch.cat([feature_logits(model, features[i:i + batch_size].to(device)).softmax(-1).to(dtype).cpu()
                      for i in range(0, len(features), batch_size)], dim=1)
