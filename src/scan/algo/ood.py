"""How far to trust an assignment: "none of these" (out-of-distribution) and a label-free confidence.

Both compare an image's feature (the input of the cluster head) with those of the training
images, which the final model has already assigned:

  ood_score(x)  = 1 - cos(f(x), nearest training feature)            0 for a training image's twin, up to 2
  unknown(x)    = ood_score(x) > threshold, the QUANTILE (99th percentile) of the training images'
                  own leave-one-out scores: about 1 training image in 100 is flagged as well
  confidence(x) = sum_j w_j p_j[c(x)] / sum_j w_j  over the NEIGHBOURS nearest training images j,
                  w_j = max(cos, 0), p_j their cluster probabilities, c(x) the cluster given to x

The confidence is the share of its nearest training images that the model puts in the same
cluster (SCAN's own premise: neighbours belong together), weighted by similarity. Unlike the
softmax maximum, which self-labelling drives to 1.00 for nearly every image, it is low for an
image on the border between clusters and needs no labels. Leave-one-out for training images:
an image is never its own neighbour.

The training features (at most MAX_REFERENCE of them, a fixed sample) and the threshold are
stored with the model (`inference.trust_reference`) and embedded in exported files, so that
`scan predict` and an exported model give the same answers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NEIGHBOURS = 10          # training images compared with each image for its confidence
QUANTILE = 0.99          # of the training images' scores: the "unknown" threshold
MAX_REFERENCE = 5000     # training features kept (float16): 5000 x 1280 features are 12.8 MB
ROWS_PER_CHUNK = 1024    # leave-one-out similarities are computed this many rows at a time


class TrustHead(nn.Module):
    """(B, D) features and (B,) assigned clusters -> (B,) confidence and (B,) ood_score.

    Holds the reference: (M, D) L2-normalised training features and their (M, C) probabilities.
    """

    def __init__(self, features: torch.Tensor, probs: torch.Tensor, threshold: float, neighbours: int = NEIGHBOURS):
        super().__init__()
        self.register_buffer("features", features.float())   # (M, D), unit rows
        self.register_buffer("probs", probs.float())         # (M, C)
        self.threshold = float(threshold)
        self.neighbours = int(neighbours)

    def forward(self, features: torch.Tensor, cluster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_similarities(F.normalize(features.float(), dim=1) @ self.features.T, cluster)

    def from_similarities(self, sims: torch.Tensor, cluster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Confidence and score from (B, M) cosine similarities to the reference (-inf: not a neighbour)."""
        top, idx = sims.topk(self.neighbours, dim=1)                          # (B, k), most similar first
        weights = top.clamp_min(0)
        picked = cluster.view(-1, 1, 1).expand(-1, idx.shape[1], 1)          # (B, k, 1)
        share = self.probs[idx].gather(2, picked).squeeze(2)                 # (B, k): p_j[c(x)]
        confidence = (weights * share).sum(1) / weights.sum(1).clamp_min(1e-12)
        return confidence, (1 - top[:, 0]).clamp_min(0)   # clamped: rounding makes a twin -0.0

    def state(self) -> dict:
        """What `from_state` needs, compact: float16 reference (the values both predict and export use)."""
        return {"features": self.features.half(), "probs": self.probs.half(), "threshold": self.threshold,
                "neighbours": self.neighbours}

    @classmethod
    def from_state(cls, state: dict) -> TrustHead:
        return cls(state["features"], state["probs"], state["threshold"], state["neighbours"])


def fit_trust(features: np.ndarray, probs: np.ndarray, seed: int = 0) -> tuple[TrustHead, np.ndarray, np.ndarray]:
    """The TrustHead of N training images, plus their leave-one-out (N,) confidence and ood_score.

    features (N, D) in the head's input space, probs (N, C). The reference is stored in float16,
    so the training scores are computed from the rounded values that predict will use.
    """
    unit = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1).half().float()
    probs_t = torch.as_tensor(probs, dtype=torch.float32).half().float()
    n = len(unit)
    if n < 2:
        raise ValueError("at least 2 training images are needed to calibrate the 'unknown' threshold")
    keep = np.arange(n) if n <= MAX_REFERENCE else np.sort(np.random.default_rng(seed).choice(n, MAX_REFERENCE,
                                                                                               replace=False))
    head = TrustHead(unit[keep], probs_t[keep], float("nan"), min(NEIGHBOURS, len(keep) - 1))
    column = np.full(n, -1)
    column[keep] = np.arange(len(keep))   # where each training image sits in the reference, -1 if absent
    clusters = probs_t.argmax(1)
    confidence, score = [], []
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = np.arange(start, min(start + ROWS_PER_CHUNK, n))
        sims = unit[rows] @ head.features.T                                  # (rows, M)
        inside = column[rows] >= 0
        sims[np.flatnonzero(inside), column[rows][inside]] = -float("inf")   # leave-one-out
        c, s = head.from_similarities(sims, clusters[rows])
        confidence.append(c)
        score.append(s)
    confidence, score = torch.cat(confidence).numpy(), torch.cat(score).numpy()
    head.threshold = float(np.quantile(score, QUANTILE))
    return head, confidence, score


class TrustedClassifier(nn.Module):
    """float (B, C, H, W) images in [0, 1] -> (probabilities (B, K), confidence (B,), ood_score (B,)).

    The one forward shared by `scan predict` and every exported format, so they agree.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, trust: TrustHead):
        super().__init__()
        self.backbone, self.head, self.trust = backbone, head, trust

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        probs = torch.softmax(self.head(features), dim=1)
        confidence, score = self.trust(features, probs.argmax(1))
        return probs, confidence, score
