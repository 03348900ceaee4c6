"""MoCo v2: a query encoder, a momentum key encoder and a queue of past keys as negatives.

SCAN's pretext on ImageNet. Query and key are two SimCLR-style views of the same image; the
key encoder is an EMA of the query encoder (m = 0.999) and gets no gradients, so the keys in
the queue stay consistent with each other while the query encoder learns.
"""
from __future__ import annotations

import torch
from torch import nn

from scan.algo.losses import info_nce
from scan.nets.augment import SimCLRAugment
from scan.nets.averaging import ema_update, frozen_copy
from scan.nets.models import ContrastiveModel
from scan.pretext.methods import method_default, register_pretext
from scan.pretext.queue import NegativeQueue


@register_pretext("moco")
class MoCo(nn.Module):
    def __init__(self, backbone, cfg, image_size: int, channels: int, num_samples: int):
        super().__init__()
        p = cfg.pretext
        self.query = ContrastiveModel(backbone, cfg.model.projection_dim)   # backbone + MLP head
        self.key = frozen_copy(self.query)
        # a queue longer than the data set would only hold several stale keys of each image
        self.queue = NegativeQueue(min(p.queue_size, num_samples), cfg.model.projection_dim)
        self.augment = SimCLRAugment(cfg.augment, image_size, channels)
        self.temperature = method_default(p.temperature, 0.2)
        self.momentum = method_default(p.ema_momentum, 0.999)

    @property
    def backbone(self):
        return self.query.backbone

    def loss(self, x, index):
        q = self.query(self.augment(x))                       # (B, D) normalised queries
        with torch.no_grad():
            k = self.key(self.augment(x))                     # (B, D) positives, no gradient
        negatives, ignore = self.queue.negatives(index)
        loss = info_nce(q, k, negatives, self.temperature, ignore)
        self.queue.push(k, index)
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.key, self.query, self.momentum)
