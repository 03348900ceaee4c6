"""Weight averages: momentum encoders (MoCo, BYOL) and the self-labelling EMA, with the
momentum schedule BYOL raises to 1."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn


def momentum_schedule(base: float, total_steps: int) -> np.ndarray:
    """Per-step EMA momentum rising from `base` to 1 on a cosine (BYOL):

    m_n = 1 − (1 − m_base)(cos(π n / (N − 1)) + 1) / 2,  n = 0 .. N − 1,  so m_0 = m_base and m_{N−1} = 1.
    """
    n = np.arange(max(total_steps, 1), dtype=np.float64)
    return 1 - (1 - base) * (np.cos(math.pi * n / max(total_steps - 1, 1)) + 1) / 2


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters take no gradients (an EMA teacher or momentum encoder)."""
    target = copy.deepcopy(model)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online for every parameter (buffers are left alone)."""
    for t, p in zip(target.parameters(), online.parameters()):
        t.lerp_(p.detach(), 1 - momentum)


class EMA:
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1 − d)·θ."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = frozen_copy(model).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_update(self.model, model, self.decay)
        # the averaged model is evaluated, so it takes the live batch-norm statistics
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def write_back(self, model: nn.Module) -> None:
        """θ ← θ_ema: the average replaces the trained parameters, so training continues from it
        (the SCAN authors' self-labelling EMA on ImageNet, selflabel.ema_mode=write_back)."""
        for e, p in zip(self.model.parameters(), model.parameters()):
            p.copy_(e)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
