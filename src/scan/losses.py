"""Loss functions as plain functions of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-8


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two batches of L2-normalised projections (B, D).

    With z = [z1; z2] (2B rows) and s_ij = z_i·z_j / τ, each row i has one positive p(i)
    (its other view) and 2B−2 negatives:  L = −mean_i log( exp(s_ip(i)) / Σ_{j≠i} exp(s_ij) ).
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2]).float()
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, positives)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy H(p) = −Σ p log p along `dim` (natural log)."""
    return -(p * torch.log(p.clamp_min(EPS))).sum(dim)


def scan_loss(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float = 5.0):
    """SCAN clustering loss for (..., B, C) logits of anchors and one mined neighbour each.

    consistency = −(1/B) Σ_i log⟨p(x_i), p(n_i)⟩,   H = entropy of the mean prediction p̄ over the batch,
    total = consistency − λ·H.  Leading dimensions (e.g. heads) are kept.
    Returns (total, consistency, H), each of shape (...,).
    """
    p_anchor = anchor_logits.float().softmax(-1)
    p_neighbor = neighbor_logits.float().softmax(-1)
    similarity = (p_anchor * p_neighbor).sum(-1)
    consistency = -torch.log(similarity.clamp_min(EPS)).mean(-1)
    h = entropy(p_anchor.mean(-2))
    return consistency - entropy_weight * h, consistency, h


def confidence_pseudo_labels(weak_logits: torch.Tensor, threshold: float):
    """Pseudo-labels from the weakly augmented view: (mask, targets) where max softmax > threshold."""
    p = weak_logits.float().softmax(-1)
    conf, targets = p.max(-1)
    return conf > threshold, targets


def balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                           class_balance: bool = True) -> torch.Tensor:
    """Cross-entropy with per-class weights w_c = 1 / n_c (n_c = count of class c in `targets`).

    L = Σ_i w_{y_i} CE(logits_i, y_i) / Σ_i w_{y_i}, so every class present contributes equally;
    without balancing this is the plain mean CE. Empty `targets` give a zero loss.
    """
    if targets.numel() == 0:
        return logits.sum() * 0.0
    weight = None
    if class_balance:
        counts = torch.bincount(targets, minlength=num_classes).float()
        weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    return F.cross_entropy(logits.float(), targets, weight=weight)


def selflabel_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float = 0.99,
                   class_balance: bool = True):
    """SCAN self-labelling: CE on the strong view against confident argmax labels of the weak view.

    Returns (loss, number of confident samples).
    """
    mask, targets = confidence_pseudo_labels(weak_logits.detach(), threshold)
    loss = balanced_cross_entropy(strong_logits[mask], targets[mask], strong_logits.shape[-1], class_balance)
    return loss, int(mask.sum())


def uniform_entropy(num_clusters: int) -> float:
    """log C: the largest possible entropy of a C-way distribution."""
    return math.log(num_clusters)
