"""RotNet: predict which of 0/90/180/270° an image was rotated by (a 4-way classifier).

Kept as the SCAN paper's baseline: its features must change under rotation, so they violate
the augmentation invariance that neighbour mining relies on. Images must be square.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scan.nets.augment import WeakAugment
from scan.pretext.methods import register_pretext

ROTATIONS = 4


@register_pretext("rotnet")
class RotNet(nn.Module):
    def __init__(self, backbone, cfg, image_size: int, channels: int, num_samples: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feature_dim, ROTATIONS)
        self.augment = WeakAugment(cfg.augment, image_size)

    def loss(self, x, index):
        x = self.augment(x)
        # all four rotations of every image: (4B, C, H, W), target k for the k·90° block
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
        targets = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
        return F.cross_entropy(self.classifier(self.backbone(rotated)).float(), targets)

    def after_step(self, step: int, total_steps: int) -> None:
        """RotNet keeps no momentum state."""
