"""SimCLR: two augmented views per image, NT-Xent over the batch (SCAN's pretext on small data sets)."""
from __future__ import annotations

from torch import nn

from scan.algo.losses import nt_xent
from scan.nets.augment import SimCLRAugment
from scan.nets.models import ContrastiveModel
from scan.pretext.methods import method_default, register_pretext


@register_pretext("simclr")
class SimCLR(nn.Module):
    def __init__(self, backbone, cfg, image_size: int, channels: int, num_samples: int):
        super().__init__()
        self.model = ContrastiveModel(backbone, cfg.model.projection_dim)
        self.augment = SimCLRAugment(cfg.augment, image_size, channels)
        self.temperature = method_default(cfg.pretext.temperature, 0.1)

    @property
    def backbone(self):
        return self.model.backbone

    def loss(self, x, index):
        return nt_xent(self.model(self.augment(x)), self.model(self.augment(x)), self.temperature)

    def after_step(self, step: int, total_steps: int) -> None:
        """SimCLR keeps no momentum state."""
