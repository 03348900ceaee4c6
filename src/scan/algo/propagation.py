"""Hierarchical pseudo-labels for SPC refinement: label propagation on a kNN graph, filtering, mixup.

Given the clustering model's probabilities Q (N, C) and backbone features X (N, D):

1. split:     S′ = {i : max_c Q_ic > δ} gets one-hot labels, the rest keeps Q as soft labels (Y);
2. propagate: P solves (I − γ W̃) P = Y on the symmetric kNN graph W of X (γ = 1 / (1 + μ));
3. filter:    S = S′ ∩ {i : i is among the top ⌈r·N⌉ of its column c_i by P_ic}, labelled c_i, where
              c_i = argmax_c P_ic (refine.rank_by: propagated) or argmax_c Q_ic (predicted);
              every other sample is in the weak set W with label P_i (refine.weak_labels: soft)
              or onehot(argmax P_i) (hard);
4. mixup:     weakly augmented S images are mixed with strongly augmented W images, the S
              image weighted λ′ = max(λ, 1 − λ) ≥ 0.5 with λ ~ Beta(α, α).

Everything but the mixup is numpy/scipy on the CPU: the graph is sparse (N·k entries), so
100k images fit in a few hundred MB and a few seconds of conjugate-gradient iterations.

The SPC paper leaves open which column ranks a sample and whether W's labels are soft; both
are settings (RANK_COLUMNS, WEAK_LABELS), and the defaults are the choices measured best on
digits (benchmarks/spc_protocol.py). With C classes and r·C ≥ 1 the top-r filter can keep
every sample of a balanced data set, so S = S′: `top_r_filters` tells when.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy import sparse

from scan.algo.neighbors import knn_search, l2_normalize
from scan.core.registry import Registry


def knn_affinity(features: np.ndarray, k: int, symmetric: str = "sum") -> sparse.csr_matrix:
    """Symmetric sparse affinity W (N, N) of the k-nearest-neighbour graph.

    With x̂ the L2-normalised features and NN_k(i) the k most similar other samples,
    A_ij = max(0, x̂_i·x̂_j) if j ∈ NN_k(i) else 0, and W = A + Aᵀ (symmetric="sum": mutual neighbours
    count twice) or W = max(A, Aᵀ) ("max": the SPC authors' code, W_ij = s(z_i, z_j) as in their eq. 7);
    either way W_ij > 0 when either sample is among the other's neighbours. The diagonal is zero.
    """
    n = features.shape[0]
    sims, idx = knn_search(l2_normalize(features), min(k + 1, n))   # k + 1: the query itself comes back too
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    # drop self-matches wherever they were ranked (duplicates may push them out: k + 1 neighbours
    # then) and the -1 padding of an approximate search that found fewer than k + 1 hits
    valid = (idx >= 0) & (idx != rows)
    a = sparse.csr_matrix((np.maximum(sims[valid], 0.0).astype(np.float64), (rows[valid], idx[valid])),
                          shape=(n, n))
    a.eliminate_zeros()
    return (a + a.T if symmetric == "sum" else a.maximum(a.T)).tocsr()


def normalize_affinity(w: sparse.spmatrix) -> sparse.csr_matrix:
    """Symmetric normalisation W̃ = D^(−1/2) W D^(−1/2), D = diag(Σ_j W_ij); isolated nodes stay zero."""
    degree = np.asarray(w.sum(axis=1)).ravel()
    scale = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=scale, where=degree > 0)
    d = sparse.diags(scale)
    return (d @ w @ d).tocsr()


def conjugate_gradient(a: sparse.spmatrix, b: np.ndarray, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
    """Solve A X = B for a symmetric positive-definite sparse A (N, N) and all C columns of B (N, C) at once.

    Column-wise conjugate gradient: r = b − A x, p = r; repeat α = rᵀr / pᵀAp, x += α p,
    r_new = r − α A p, p = r_new + (r_newᵀ r_new / rᵀr) p, until ‖r‖ ≤ tol·‖b‖ for every column.
    One sparse matrix–matrix product per iteration serves every class.
    """
    b = np.asarray(b, dtype=np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = (r * r).sum(0)
    target = (tol * np.linalg.norm(b, axis=0)) ** 2
    for _ in range(max_iter):
        active = rr > target                     # converged columns get zero step sizes
        if not active.any():
            break
        ap = a @ p
        p_ap = (p * ap).sum(0)
        alpha = np.divide(rr, p_ap, out=np.zeros_like(rr), where=active & (p_ap > 0))
        x += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum(0)
        beta = np.divide(rr_new, rr, out=np.zeros_like(rr), where=active & (rr > 0))
        p = r + beta * p
        rr = rr_new
    return x


def propagate_labels(affinity: sparse.spmatrix, y: np.ndarray, mu: float = 0.01, max_iter: int = 20) -> np.ndarray:
    """Label propagation: row-normalised solution P (N, C) of (I − γ W̃) Z = Y, γ = 1/(1 + μ).

    W̃ is the normalised `affinity`; Z minimises the smoothness term
    Σ_ij W_ij ‖Z_i/√d_i − Z_j/√d_j‖² plus μ‖Z − Y‖² (Zhou et al., 2004). Negative entries are
    clipped and rows rescaled to sum to one so that P reads as class probabilities.
    """
    gamma = 1.0 / (1.0 + mu)
    w = normalize_affinity(affinity)
    a = (sparse.identity(w.shape[0], format="csr") - gamma * w).tocsr()
    z = np.maximum(conjugate_gradient(a, y, max_iter=max_iter), 0.0)
    totals = z.sum(1, keepdims=True)
    uniform = np.full_like(z, 1.0 / z.shape[1])
    return np.divide(z, totals, out=uniform, where=totals > 0)


def initial_labels(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Split by confidence: (S′ mask (N,), Y (N, C)) with Y_i = onehot(argmax Q_i) if max Q_i > δ else Q_i."""
    strong = probs.max(1) > threshold
    y = probs.astype(np.float64, copy=True)
    y[strong] = np.eye(probs.shape[1])[probs[strong].argmax(1)]
    return strong, y


def top_per_class(p: np.ndarray, fraction: float) -> np.ndarray:
    """(N, C) mask with exactly m = ⌈r·N⌉ True entries per column: the m largest P_ic of each class c."""
    n, c = p.shape
    m = math.ceil(fraction * n)
    keep = np.zeros((n, c), dtype=bool)
    top = np.argpartition(-p, m - 1, axis=0)[:m]   # (m, C) row indices, unordered within the top m
    keep[top, np.arange(c)] = True
    return keep


def top_r_filters(num_classes: int, fraction: float) -> bool:
    """False when C·r ≥ 1: then the C columns' top ⌈r·N⌉ together cover all N samples of a
    balanced data set and the filter removes nothing (S = S′), which the many-class setting hits."""
    return num_classes * fraction < 1


# refine.rank_by: the column c_i (N,) a sample is ranked in (and labelled with when in S), from P and Q
RANK_COLUMNS: Registry[Callable[[np.ndarray, np.ndarray], np.ndarray]] = Registry("refine.rank_by")
RANK_COLUMNS.add("propagated", lambda p, q: p.argmax(1))   # the class propagation gives it
RANK_COLUMNS.add("predicted", lambda p, q: q.argmax(1))    # the class the network gave it (= its S′ label)

# refine.weak_labels: W's training targets (N, C) from the propagated P
WEAK_LABELS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry("refine.weak_labels")
WEAK_LABELS.add("soft", lambda p: p)
WEAK_LABELS.add("hard", lambda p: np.eye(p.shape[1], dtype=p.dtype)[p.argmax(1)])


class PseudoLabels(NamedTuple):
    strong_prime: np.ndarray   # (N,) bool: S′, confident network predictions
    strong: np.ndarray         # (N,) bool: S = S′ ∩ top-r of the ranked column
    targets: np.ndarray        # (N, C) W's training targets: P (soft) or onehot(argmax P) (hard)
    labels: np.ndarray         # (N,) int: the column each sample is ranked in, S's hard label


# refine.form: ours, or the SPC authors' code (scan.train.refine: their S is also fixed after the first round)
FORMS = ("ours", "paper")


def hierarchical_pseudo_labels(features: np.ndarray, probs: np.ndarray, threshold: float = 0.95,
                               top_fraction: float = 0.03, k: int = 20, mu: float = 0.01,
                               max_iter: int = 20, weak_labels: str = "soft",
                               rank_by: str = "propagated", form: str = "ours") -> PseudoLabels:
    """SPC's strong/weak split: S′ by confidence δ, propagation, and the per-class top-r filter.

    form="paper" follows the authors' code where it differs from ours: the graph is max(A, Aᵀ), and the
    top-r ranking reads the propagated rows L2-normalised (ours: rows summing to one, as W's targets are)."""
    strong_prime, y = initial_labels(probs, threshold)
    p = propagate_labels(knn_affinity(features, k, "max" if form == "paper" else "sum"), y, mu, max_iter)
    columns = RANK_COLUMNS.get(rank_by)(p, probs)
    keep = top_per_class(l2_normalize(p) if form == "paper" else p, top_fraction)
    strong = strong_prime & keep[np.arange(len(p)), columns]
    return PseudoLabels(strong_prime, strong, WEAK_LABELS.get(weak_labels)(p), columns)


def hierarchical_mixup(x_strong: torch.Tensor, y_strong: torch.Tensor, x_weak: torch.Tensor,
                       y_weak: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each strong-set sample with one weak-set sample, the strong one dominating.

    Per pair i: λ_i ~ Beta(α, α), λ′_i = max(λ_i, 1 − λ_i) ∈ [0.5, 1],
    x̃_i = λ′_i x_S,i + (1 − λ′_i) x_W,i  and  ỹ_i = λ′_i y_S,i + (1 − λ′_i) y_W,i.
    Images (B, ...) and targets (B, C) come in equal batches; returns (x̃, ỹ, λ′ (B,)).
    """
    concentration = torch.full((x_strong.shape[0],), float(alpha), device=x_strong.device)
    lam = torch.distributions.Beta(concentration, concentration).sample()
    lam = torch.maximum(lam, 1 - lam)
    lx = lam.view(-1, *([1] * (x_strong.dim() - 1)))
    x = lx * x_strong + (1 - lx) * x_weak
    y = lam[:, None] * y_strong + (1 - lam[:, None]) * y_weak
    return x, y, lam
