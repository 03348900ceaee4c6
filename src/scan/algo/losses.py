"""Loss functions as plain functions of tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scan.core import distributed

EPS = 1e-8


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two batches of L2-normalised projections (B, D).

    With z = [z1; z2] (2B rows) and s_ij = z_i·z_j / τ, each row i has one positive p(i)
    (its other view) and 2B−2 negatives:  L = −mean_i log( exp(s_ip(i)) / Σ_{j≠i} exp(s_ij) ).
    Under torchrun B is the global batch: each rank scores its own 2b rows against the 2B
    projections of all ranks (gathered with gradients), the mean over its rows.
    """
    b = z1.shape[0]
    (g1, offset), (g2, _) = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
    z = torch.cat([g1, g2]).float()                                       # (2B, D) every rank's views
    rows = z if len(g1) == b else torch.cat([z1, z2]).float()            # (2b, D) this rank's views
    sim = rows @ z.t() / temperature                                      # (2b, 2B)
    own = torch.arange(offset, offset + b, device=z.device)
    self_cols = torch.cat([own, own + len(g1)])                           # where each row sits in z
    sim[torch.arange(2 * b, device=z.device), self_cols] = float("-inf")
    positives = torch.cat([own + len(g1), own])
    return F.cross_entropy(sim, positives)


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.2,
             ignore: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of L2-normalised queries (B, D) against their positives (B, D) and shared negatives (K, D).

    With s⁺_i = q_i·k⁺_i / τ and s_ij = q_i·n_j / τ:
        L = −mean_i log( exp(s⁺_i) / (exp(s⁺_i) + Σ_j exp(s_ij)) ).
    `ignore` (B, K) marks negatives left out of row i's sum (e.g. a stale key of the query's own image).
    """
    q = query.float()
    pos = (q * positive.float()).sum(1, keepdim=True)           # (B, 1)
    neg = q @ negatives.float().t()                             # (B, K)
    if ignore is not None:
        neg = neg.masked_fill(ignore, float("-inf"))
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy H(p) = −Σ p log p along `dim` (natural log)."""
    return -(p * torch.log(p.clamp_min(EPS))).sum(dim)


def prior_entropy(p: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """log C − KL(sort(p) ‖ sort(π)) along the last dimension, for cluster shares p (..., C) and a prior π (C,).

    The KL-to-a-prior form of SCAN's entropy term: it equals H(p) for a uniform π and is highest when the
    sorted shares match the sorted prior, whichever cluster holds which share (cluster ids are arbitrary).
    """
    shares = p.sort(-1, descending=True).values
    target = prior.to(p).sort(descending=True).values
    kl = (shares * (torch.log(shares.clamp_min(EPS)) - torch.log(target.clamp_min(EPS)))).sum(-1)
    return math.log(p.shape[-1]) - kl


def _spread(mean: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    return entropy(mean) if prior is None else prior_entropy(mean, prior)


def scan_loss(anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float = 5.0,
              prior: torch.Tensor | None = None):
    """SCAN clustering loss for (..., B, C) logits of anchors and one mined neighbour each.

    consistency = −(1/B) Σ_i log⟨p(x_i), p(n_i)⟩,   H = entropy of the mean prediction p̄ over the batch
    (with a cluster-size prior π (C,): prior_entropy(p̄, π)),   total = consistency − λ·H.
    Leading dimensions (e.g. heads) are kept. Returns (total, consistency, H), each of shape (...,).
    """
    p_anchor = anchor_logits.float().softmax(-1)
    p_neighbor = neighbor_logits.float().softmax(-1)
    similarity = (p_anchor * p_neighbor).sum(-1)
    consistency = -torch.log(similarity.clamp_min(EPS)).mean(-1)
    h = _spread(global_mean(p_anchor, -2), prior)
    return consistency - entropy_weight * h, consistency, h


def global_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean along `dim` over the rows of every rank (differentiable; x.mean(dim) in one process).

    Under torchrun this is what one process would compute over the global batch: the entropy
    term of the SCAN loss is a function of the whole batch's mean prediction, not a per-rank sum.
    """
    if distributed.world_size() == 1:
        return x.mean(dim)
    count = distributed.all_reduce_sum(torch.tensor(float(x.shape[dim]), device=x.device))
    return distributed.sum_with_grad(x.sum(dim)) / count


def scan_loss_over_pairs(probs: torch.Tensor, neighbors: torch.Tensor, entropy_weight: float = 5.0,
                         chunk_elements: int = 1 << 25, prior: torch.Tensor | None = None):
    """The SCAN loss of `scan_loss` over every mined pair at once, from probabilities (H, N, C).

    consistency_h = −(1/NK) Σ_i Σ_k log⟨p_h(x_i), p_h(x_{n_ik})⟩ for neighbours (N, K), H_h the
    entropy of head h's mean prediction; rows are gathered in chunks of at most `chunk_elements`
    values, so 10 heads × 260k images × 50 neighbours × 200 classes never materialise at once.
    `probs` may be float16 (each chunk is computed in float32); `prior` as in scan_loss.
    Returns (total, consistency, H), each of shape (H,), for choosing the head with the lowest total.
    """
    heads, n, c = probs.shape
    k = neighbors.shape[1]
    rows = max(1, chunk_elements // (heads * k * c))
    log_sum = torch.zeros(heads, dtype=torch.float64)
    prob_sum = torch.zeros(heads, c, dtype=torch.float64)
    for start in range(0, n, rows):
        anchor = probs[:, start:start + rows].float()                      # (H, r, C)
        neighbor = probs[:, neighbors[start:start + rows]].float()         # (H, r, K, C)
        similarity = torch.einsum("hrc,hrkc->hrk", anchor, neighbor)       # (H, r, K)
        log_sum += torch.log(similarity.clamp_min(EPS)).sum(dim=(1, 2)).double()
        prob_sum += anchor.sum(1).double()
    consistency = (-log_sum / (n * k)).float()
    h = _spread((prob_sum / n).float(), prior)
    return consistency - entropy_weight * h, consistency, h


def confidence_pseudo_labels(weak_logits: torch.Tensor, threshold: float):
    """Pseudo-labels from the weakly augmented view: (mask, targets) where max softmax > threshold."""
    p = weak_logits.float().softmax(-1)
    conf, targets = p.max(-1)
    return conf > threshold, targets


def per_cluster_pseudo_labels(probs: torch.Tensor, fraction: float):
    """Each cluster's most confident members as pseudo-labels: (mask (N,) bool, targets (N,) long).

    probs (N, C). Image i belongs to cluster c_i = argmax_c p_ic; within every cluster the members
    are ranked by p_ic and the top m = ⌈fraction · N / C⌉ are kept (all of them if fewer). Unlike a
    global confidence threshold, a cluster whose members are less sure of themselves (shirts beside
    coats) still gets its m labels, so training on the labels cannot empty it (the selection of
    SPICE, Niu et al. 2022, on the images' own predictions).
    """
    n, c = probs.shape
    conf, targets = probs.float().max(1)
    # sorted by cluster, and within a cluster by confidence, highest first (targets·2 − conf never overlap)
    order = torch.argsort(targets.double() * 2 - conf.double(), stable=True)
    ordered = targets[order]
    rank = torch.arange(n, device=probs.device) - torch.searchsorted(ordered, ordered)   # place within its cluster
    mask = torch.zeros(n, dtype=torch.bool, device=probs.device)
    mask[order[rank < math.ceil(fraction * n / c)]] = True
    return mask, targets


def balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                           class_balance: bool = True) -> torch.Tensor:
    """Cross-entropy with per-class weights w_c = 1 / n_c (n_c = count of class c in `targets`).

    L = Σ_i w_{y_i} CE(logits_i, y_i) / Σ_i w_{y_i}, so every class present contributes equally;
    without balancing this is the plain mean CE. Empty `targets` give a zero loss.
    Under torchrun the counts and the normaliser Σ_i w_{y_i} are those of the global batch; each
    rank's loss is scaled so that DDP's average of the ranks' gradients is the global loss's.
    """
    counts = distributed.all_reduce_sum(torch.bincount(targets, minlength=num_classes).float())
    weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts)) if class_balance else None
    local = weight[targets].sum() if class_balance else torch.tensor(float(targets.numel()))
    total = distributed.all_reduce_sum(local.to(counts.device))
    if targets.numel() == 0:
        return logits.sum() * 0.0
    # W · (this rank's share of Σ w): exactly 1.0 in one process, so the loss is F.cross_entropy's
    scale = distributed.world_size() * (local.to(counts.device) / total)
    return F.cross_entropy(logits.float(), targets, weight=weight) * scale


def selflabel_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float = 0.99,
                   class_balance: bool = True, labels: tuple[torch.Tensor, torch.Tensor] | None = None):
    """SCAN self-labelling: CE on the strong view against confident argmax labels of the weak view.

    `labels`, (mask (B,), targets (B,)) chosen beforehand (selflabel.selection: per_cluster), replace
    the weak view's. Returns (loss, number of samples trained on).
    """
    mask, targets = confidence_pseudo_labels(weak_logits.detach(), threshold) if labels is None else labels
    loss = balanced_cross_entropy(strong_logits[mask], targets[mask], strong_logits.shape[-1], class_balance)
    return loss, int(mask.sum())


def spc_loss(strong_logits: torch.Tensor, strong_targets: torch.Tensor, mixed_logits: torch.Tensor,
             mixed_targets: torch.Tensor, mix_weight: float = 1.0):
    """SPC refinement loss on a strong-set batch (B, C) with hard labels (B,) and a mixed batch with soft targets.

    L = CE(f(x_S), y_S) + λ_M · (−(1/B) Σ_i Σ_c ỹ_ic log softmax(f(x̃_i))_c).
    An empty mixed batch (no weak set) contributes zero. Returns (L, CE_S, CE_mixed).
    """
    ce_strong = F.cross_entropy(strong_logits.float(), strong_targets)
    ce_mixed = (F.cross_entropy(mixed_logits.float(), mixed_targets.float()) if len(mixed_targets)
                else mixed_logits.sum() * 0.0)
    return ce_strong + mix_weight * ce_mixed, ce_strong, ce_mixed
