"""Neighbour mining strategies, chosen by `mine.method` through a registry.

knn        the K = q nearest neighbours in pretext feature space (SCAN).
multiview  the many-class variant: 4q plain-feature neighbours → the 2q nearest to a strongly
           augmented view of the sample in feature space → the q with the highest cluster
           probability agreement under a clustering head applied to a weakly augmented view.

A miner takes `MiningInputs` and returns (neighbours (N, q) int64, facts for mine/done.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from scan.augment import StrongAugment, WeakAugment
from scan.checkpoint import seed_everything
from scan.config import Config
from scan.engine import Runtime, StageError, minibatches, optimizer_step, predict_in_batches
from scan.losses import scan_loss
from scan.registry import Registry
from scan.neighbors import combine_features, mine_neighbors, neighbor_purity, pixel_features, select_multiview

HEAD_BATCH_SIZE = 256     # the brief head trains on pre-computed features: batches are cheap


@dataclass
class MiningInputs:
    features: np.ndarray                      # (N, D) pretext features of the plain training images
    images: torch.Tensor                      # (N, C, H, W) uint8 training images
    load_backbone: Callable[[], nn.Module]    # the pretext backbone, loaded only by miners that need it
    cfg: Config
    num_clusters: int
    rt: Runtime
    labels: np.ndarray | None = None          # ground truth, only to report purity
    say: Callable[[str], None] = print
    # (N, P) L2-normalised projection-head outputs of the same images, loaded only by mine.features=projection
    load_projection: Callable[[], np.ndarray] | None = None


def _projection(inputs: MiningInputs) -> np.ndarray:
    if inputs.load_projection is None:
        raise StageError("mine.features=projection: the pretext stage wrote no projection features "
                         "(features/*_projection.npy); they come from a contrastive pretext (simclr, moco, "
                         "byol_queue) with pretext.epochs > 0: rerun it with --restart or use mine.features=backbone")
    return inputs.load_projection()


# mine.features: the (N, D) matrix neighbours are searched in, from the mining inputs of one split
MINING_SPACES: Registry[Callable[[MiningInputs], np.ndarray]] = Registry("mine.features")
MINING_SPACES.add("backbone", lambda inputs: inputs.features)
# the SCAN authors' choice for SimCLR: the 128-d L2-normalised projection output (ImageNet: backbone)
MINING_SPACES.add("projection", _projection)
MINING_SPACES.add("pixels", lambda inputs: pixel_features(inputs.images, seed=inputs.cfg.seed))
MINING_SPACES.add("backbone+pixels",
                  lambda inputs: combine_features(inputs.features, pixel_features(inputs.images, seed=inputs.cfg.seed)))


def mining_space(inputs: MiningInputs) -> np.ndarray:
    return MINING_SPACES.get(inputs.cfg.mine.features)(inputs)


Miner = Callable[[MiningInputs], tuple[np.ndarray, dict]]
MINERS: Registry[Miner] = Registry("mine.method")
register_miner = MINERS.register


def list_miners() -> list[str]:
    return MINERS.names()


def mine(inputs: MiningInputs) -> tuple[np.ndarray, dict]:
    return MINERS.get(inputs.cfg.mine.method)(inputs)


@register_miner("knn")
def mine_knn(inputs: MiningInputs) -> tuple[np.ndarray, dict]:
    return mine_neighbors(mining_space(inputs), inputs.cfg.mine.num_neighbors), {}


def train_brief_head(features: np.ndarray, neighbors: np.ndarray, num_clusters: int, epochs: int, lr: float,
                     entropy_weight: float, device: torch.device) -> nn.Linear:
    """A linear clustering head trained with the SCAN loss on fixed features (N, D) and neighbours (N, K).

    Each step pairs a batch of anchors with one random neighbour each, as the cluster stage does.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    nb = torch.from_numpy(neighbors).to(device)
    head = nn.Linear(x.shape[1], num_clusters).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    n, k = nb.shape
    for epoch in range(epochs):
        for idx in minibatches(n, min(HEAD_BATCH_SIZE, n)):
            idx = idx.to(device)
            pair = nb[idx, torch.randint(k, (len(idx),), device=device)]
            optimizer_step(optimizer, scan_loss(head(x[idx]), head(x[pair]), entropy_weight)[0], "mine", epoch)
    return head.eval()


@register_miner("multiview")
def mine_multiview(inputs: MiningInputs) -> tuple[np.ndarray, dict]:
    cfg, rt, m = inputs.cfg, inputs.rt, inputs.cfg.mine
    seed_everything(cfg.seed + 3)
    q, n = m.num_neighbors, len(inputs.features)
    wide = min(4 * q, n - 1)
    candidates = mine_neighbors(mining_space(inputs), wide)          # (N, 4q), most similar first
    plain = candidates[:, :q]                                         # what knn returns (up to ties)
    size = int(inputs.images.shape[-1])
    backbone = rt.prepare(inputs.load_backbone()).eval()
    strong, weak = StrongAugment(cfg.augment, size), WeakAugment(cfg.augment, size)
    strong_features = predict_in_batches(lambda x: backbone(strong(x)), inputs.images, rt).numpy()
    inputs.say(f"mine: no clustering head exists yet; training one for {m.head_epochs} epochs with the SCAN loss "
               f"on the plain {q}-NN pairs (frozen backbone) to rank the multi-view candidates")
    head = train_brief_head(inputs.features, plain, inputs.num_clusters, m.head_epochs, m.head_lr,
                            m.head_entropy_weight, rt.device)
    probs = predict_in_batches(lambda x: head(backbone(weak(x))).softmax(-1), inputs.images, rt).numpy()
    neighbors = select_multiview(candidates, inputs.features, strong_features, probs, min(2 * q, wide), q)
    info = {"candidates": wide, "strong_view_kept": min(2 * q, wide), "head": "trained briefly on plain kNN"}
    if inputs.labels is not None:
        info["knn_purity"] = neighbor_purity(plain, inputs.labels)
    return neighbors, info
