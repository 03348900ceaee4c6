"""BYOL with a negative queue (the pretext of the many-class SCAN variant).

Online network: backbone → projector → predictor. Target network: an EMA copy of backbone →
projector whose momentum rises from m_base = 0.996 to 1 on a cosine. Unlike plain BYOL the
prediction of one view is scored with InfoNCE (τ = 0.2) against the target projection of the
other view and a queue of past target projections, which suits data with many classes:

    L = ½ InfoNCE(l_a, h_b, {h⁻}) + ½ InfoNCE(l_b, h_a, {h⁻}).

The two views come from `pretext.views` (scan.nets.augment_views): by default both are a SimCLR crop
with colour jitter, as SimCLR's and MoCo's; `randaugment` are the many-class paper's RandAugment ops
with Cutout on view b. The target starts as a random network, whose projections of two views of one
image are barely closer than those of two images: views that leave little of the image (RandAugment ops
and Cutout on top of the crop, on 8x8 digits) give the loss nothing to learn from, and it stays at
log(queue size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scan.algo.losses import info_nce
from scan.nets.augment_views import build_views, views_use_strong_augment
from scan.nets.averaging import ema_update, frozen_copy, momentum_schedule
from scan.nets.models import ContrastiveModel, mlp
from scan.pretext.methods import method_default, register_pretext
from scan.pretext.queue import NegativeQueue


@register_pretext("byol_queue")
class BYOLQueue(nn.Module):
    # whether its views read augment.strong_strength: only the paper's RandAugment views do
    strong_augment = staticmethod(lambda pretext: views_use_strong_augment(pretext.views))

    def __init__(self, backbone, cfg, image_size: int, channels: int, num_samples: int):
        super().__init__()
        p, dim = cfg.pretext, cfg.model.projection_dim
        self.online = ContrastiveModel(backbone, dim)         # backbone + projector
        self.predictor = mlp(dim, backbone.feature_dim, dim, batchnorm=True)
        self.target = frozen_copy(self.online)
        self.queue = NegativeQueue(min(p.queue_size, num_samples), dim)
        self.view_a, self.view_b = build_views(p.views, cfg.augment, image_size, channels)
        self.temperature = method_default(p.temperature, 0.2)
        self.momentum_base = method_default(p.ema_momentum, 0.996)
        self._schedule = None     # per-step momenta, built on the first step once the step count is known

    @property
    def backbone(self):
        return self.online.backbone

    def _predict(self, x):
        """l = predictor(projector(backbone(x))), L2-normalised (B, D)."""
        return F.normalize(self.predictor(self.online.head(self.online.backbone(x))), dim=1)

    def loss(self, x, index):
        xa, xb = self.view_a(x), self.view_b(x)
        la, lb = self._predict(xa), self._predict(xb)
        with torch.no_grad():
            ha, hb = self.target(xa), self.target(xb)         # (B, D) normalised target projections
        negatives, ignore = self.queue.negatives(index)
        loss = 0.5 * (info_nce(la, hb, negatives, self.temperature, ignore)
                      + info_nce(lb, ha, negatives, self.temperature, ignore))
        self.queue.push(ha, index)    # one key per image keeps the queue spanning more images
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        if self._schedule is None or len(self._schedule) != total_steps:
            self._schedule = momentum_schedule(self.momentum_base, total_steps)
        ema_update(self.target, self.online, float(self._schedule[step]))
