"""Neighbour mining strategies, chosen by `mine.method` through a registry.

knn        the K = q nearest neighbours in pretext feature space (SCAN).
multiview  the many-class variant: 4q plain-feature neighbours → the 2q nearest to an augmented
           view of the sample (the pretext's view b) in feature space → the q with the highest cluster
           probability agreement under a clustering head applied to a weakly augmented view.
           The head (`mine.head`, MINING_HEADS) is linear, or the paper's MLP whose first layer
           starts as the pretext projection's first layer; either trains briefly on frozen features.

A miner takes `MiningInputs` and returns (neighbours (N, q) int64, facts for mine/done.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from scan.algo.losses import scan_loss
from scan.algo.neighbors import combine_features, mine_neighbors, neighbor_purity, pixel_features, select_multiview
from scan.config import Config
from scan.core.checkpoint import load_state_dict, seed_everything
from scan.core.errors import ArtifactError, StageError
from scan.core.registry import Registry
from scan.nets.augment import WeakAugment
from scan.nets.augment_views import build_views
from scan.train.engine import Runtime, minibatches, optimizer_step, predict_in_batches

HEAD_BATCH_SIZE = 256     # the brief head trains on pre-computed features: batches are cheap


@dataclass
class MiningInputs:
    features: np.ndarray                      # (N, D) pretext features of the plain training images
    images: torch.Tensor                      # (N, C, H, W) uint8 training images
    load_backbone: Callable[[], nn.Module]    # the pretext backbone, loaded only by miners that need it
    cfg: Config
    num_clusters: int | None                  # None before data.num_clusters=auto is chosen (the choose stage)
    num_neighbors: int | None                 # K: mine.num_neighbors, at most N / 2C (neighbor_count); None like C
    rt: Runtime
    labels: np.ndarray | None = None          # ground truth, only to report purity
    say: Callable[[str], None] = print
    projection_path: Path | None = None       # pretext/projection.pt, read only by mine.head: mlp
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
    if inputs.num_neighbors == 0:   # K = 0: every image is its own "neighbour", seen in two augmented views
        return np.arange(len(inputs.features), dtype=np.int64)[:, None], {"self_pairs": True}
    return mine_neighbors(mining_space(inputs), inputs.num_neighbors), {}


# mine.head: the multiview ranking head, from (feature dim D, clusters C, pretext projection file)
MINING_HEADS: Registry[Callable[[int, int, Path | None], nn.Module]] = Registry("mine.head")


@MINING_HEADS.register("linear")
def linear_head(dim: int, num_clusters: int, projection_path: Path | None) -> nn.Module:
    return nn.Linear(dim, num_clusters)


@MINING_HEADS.register("mlp")
def mlp_head(dim: int, num_clusters: int, projection_path: Path | None) -> nn.Module:
    """Linear(D, H) → ReLU → Linear(H, C) whose first layer is a copy of the pretext projection's first
    layer (D → H), so the head starts from features the pretext already shaped; the last layer is new."""
    if projection_path is None or not Path(projection_path).is_file():
        raise StageError(f"mine.head=mlp needs the pretext projection {projection_path or 'pretext/projection.pt'}: "
                         "train the pretext with simclr, moco or byol_queue (rerun it with --restart if it "
                         "ran before this file was written), or use mine.head=linear")
    state = load_state_dict(Path(projection_path))
    if "0.weight" not in state or "0.bias" not in state:
        raise ArtifactError(f"{projection_path} is not the pretext projection (no first layer); rerun with --restart")
    weight, bias = state["0.weight"], state["0.bias"]          # (H, D), (H,)
    if weight.shape[1] != dim:
        raise StageError(f"{projection_path}: first layer takes {weight.shape[1]} features, the backbone gives {dim}")
    head = nn.Sequential(nn.Linear(dim, weight.shape[0]), nn.ReLU(), nn.Linear(weight.shape[0], num_clusters))
    with torch.no_grad():
        head[0].weight.copy_(weight)
        head[0].bias.copy_(bias)
    return head


def train_brief_head(features: np.ndarray, neighbors: np.ndarray, head: nn.Module, epochs: int, lr: float,
                     entropy_weight: float, device: torch.device) -> nn.Module:
    """Train a clustering `head` with the SCAN loss on fixed features (N, D) and neighbours (N, K).

    Each step pairs a batch of anchors with one random neighbour each, as the cluster stage does.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    nb = torch.from_numpy(neighbors).to(device)
    head = head.to(device)
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
    q, n = inputs.num_neighbors, len(inputs.features)
    wide = min(4 * q, n - 1)
    candidates = mine_neighbors(mining_space(inputs), wide)          # (N, 4q), most similar first
    plain = candidates[:, :q]                                         # what knn returns (up to ties)
    size, channels = int(inputs.images.shape[-1]), int(inputs.images.shape[1])
    backbone = rt.prepare(inputs.load_backbone()).eval()
    # the augmented view is the pretext's own (view b of pretext.views: the paper's RandAugment + Cutout, or the
    # SimCLR crop): features trained to be invariant to it still point at the image
    strong, weak = build_views(cfg.pretext.views, cfg.augment, size, channels)[1], WeakAugment(cfg.augment, size)
    strong_features = predict_in_batches(lambda x: backbone(strong(x)), inputs.images, rt).numpy()
    inputs.say(f"mine: no clustering head exists yet; training a {m.head} one for {m.head_epochs} epochs with the "
               f"SCAN loss on the plain {q}-NN pairs (frozen backbone) to rank the multi-view candidates")
    head = MINING_HEADS.get(m.head)(inputs.features.shape[1], inputs.num_clusters, inputs.projection_path)
    head = train_brief_head(inputs.features, plain, head, m.head_epochs, m.head_lr, m.head_entropy_weight, rt.device)
    probs = predict_in_batches(lambda x: head(backbone(weak(x))).softmax(-1), inputs.images, rt).numpy()
    neighbors = select_multiview(candidates, inputs.features, strong_features, probs, min(2 * q, wide), q)
    info = {"candidates": wide, "strong_view_kept": min(2 * q, wide), "head": f"{m.head}, trained briefly on plain kNN"}
    if inputs.labels is not None:
        info["knn_purity"] = neighbor_purity(plain, inputs.labels)
    return neighbors, info
