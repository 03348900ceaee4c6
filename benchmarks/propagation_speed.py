"""Time SPC's graph building and label propagation on 100k × 128 synthetic clustered features.

The features are C Gaussian clusters with low-rank within-cluster variation (as network
embeddings have) plus a little isotropic noise; the "network predictions" are confident but
wrong for a share of the samples. Prints JSON: seconds for the kNN graph, the propagation
(normalisation + conjugate gradient) and the filter, the threads used, the share of the exact
k nearest neighbours of 1,000 random queries that are graph neighbours (above 20k samples the
search is approximate), and label accuracies before and after propagation.

    python benchmarks/propagation_speed.py [--n 100000] [--dim 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np

from scan.algo.neighbors import l2_normalize
from scan.algo.propagation import initial_labels, knn_affinity, propagate_labels, top_per_class
from scan.config import RefineConfig


def clustered_features(n: int, dim: int, classes: int, rng: np.random.Generator):
    """(features (n, dim) float32, labels (n,)): cluster centre + 16-D within-cluster variation + noise."""
    labels = rng.integers(classes, size=n)
    centres = rng.normal(size=(classes, dim))
    basis = rng.normal(size=(16, dim)) / 4
    x = centres[labels] + rng.normal(size=(n, 16)) @ basis + 0.05 * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def noisy_predictions(labels: np.ndarray, classes: int, wrong: float, rng: np.random.Generator) -> np.ndarray:
    """Softmax probabilities peaked on the true class, or on a random class for a `wrong` share."""
    guess = np.where(rng.random(len(labels)) < wrong, rng.integers(classes, size=len(labels)), labels)
    logits = 4 * np.eye(classes)[guess] + rng.normal(size=(len(labels), classes))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    r = RefineConfig()
    rng = np.random.default_rng(0)
    x, labels = clustered_features(args.n, args.dim, args.classes, rng)
    probs = noisy_predictions(labels, args.classes, 0.2, rng)

    t0 = time.perf_counter()
    w = knn_affinity(x, r.num_neighbors)
    t1 = time.perf_counter()
    strong_prime, y = initial_labels(probs, r.threshold)
    p = propagate_labels(w, y, r.mu, r.cg_iterations)
    t2 = time.perf_counter()
    keep = top_per_class(p, r.top_fraction)
    strong = strong_prime & keep[np.arange(args.n), p.argmax(1)]
    t3 = time.perf_counter()

    xn = l2_normalize(x)
    queries = rng.choice(args.n, 1000, replace=False)
    exact = np.argsort(-(xn[queries] @ xn.T), axis=1)[:, 1:r.num_neighbors + 1]
    recall = np.mean([len(set(w[q].indices) & set(e)) / r.num_neighbors for q, e in zip(queries, exact)])
    print(json.dumps({
        "n": args.n, "dim": args.dim, "classes": args.classes, "threads": faiss.omp_get_max_threads(),
        "num_neighbors": r.num_neighbors, "cg_iterations": r.cg_iterations, "graph_edges": int(w.nnz),
        "seconds_graph": round(t1 - t0, 2), "seconds_propagation": round(t2 - t1, 2),
        "seconds_filter": round(t3 - t2, 3), "seconds_total": round(t3 - t0, 2),
        "exact_knn_in_graph": round(float(recall), 4),
        "acc_predictions": float((probs.argmax(1) == labels).mean()),
        "acc_propagated": float((p.argmax(1) == labels).mean()),
        "strong_prime": int(strong_prime.sum()), "acc_strong_prime": float((probs.argmax(1) == labels)[strong_prime].mean()),
        "strong": int(strong.sum()), "acc_strong": float((p.argmax(1) == labels)[strong].mean()),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
