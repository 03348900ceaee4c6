"""Keeping the weights of the best epoch so far: the cluster stage's lowest held-out loss
(cluster.head_choice=per_epoch) and self-labelling's most confident epoch."""
from __future__ import annotations

import math

from torch import nn


class BestWeights:
    """The weights, epoch and score of the best epoch offered so far, plus what the caller notes about
    it (`detail`, e.g. which head). Lower scores are better, or higher ones with higher=True.

    It is part of a training checkpoint (state_dict/load_state_dict), so a resumed training keeps the
    same best. Without a starting model nothing is kept until the first offer (state None)."""

    def __init__(self, higher: bool = False, model: nn.Module | None = None, score: float | None = None):
        self.higher = higher
        self.score = score if score is not None else (-math.inf if higher else math.inf)
        self.epoch, self.detail = 0, None
        self.state = None if model is None else _copy(model)

    def offer(self, model: nn.Module, score: float, epoch: int, detail=None) -> bool:
        """Keep `model`'s weights if `score` beats the best so far; True when it did."""
        if not (score > self.score if self.higher else score < self.score):
            return False
        self.score, self.epoch, self.detail, self.state = score, epoch, detail, _copy(model)
        return True

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "detail": self.detail, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        # checkpoints written before this class kept "loss" and "head" (cluster) or "count" (self-labelling)
        self.score = saved.get("score", saved.get("loss", saved.get("count")))
        self.epoch, self.detail, self.state = saved.get("epoch", 0), saved.get("detail", saved.get("head")), saved["state"]


def _copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
