"""Nearest-neighbour mining in feature space (faiss, exact inner product on L2-normalised features)."""
from __future__ import annotations

import faiss
import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mine_neighbors(features: np.ndarray, k: int = 20) -> np.ndarray:
    """(N, k) indices of each sample's k nearest neighbours by cosine similarity, excluding itself.

    Exact duplicates can rank another sample before the query itself, so the query is removed
    wherever it appears rather than assuming it is in column 0.
    """
    n = features.shape[0]
    if k >= n:
        raise ValueError(f"mine.num_neighbors={k} must be smaller than the number of images ({n})")
    x = l2_normalize(features)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x, k + 1)
    is_self = idx == np.arange(n)[:, None]
    # rows where the query is absent (ties) drop their last column instead
    is_self[~is_self.any(1), -1] = True
    return idx[~is_self].reshape(n, k).astype(np.int64)


def neighbor_purity(neighbors: np.ndarray, labels: np.ndarray) -> float:
    """Mean fraction of a sample's neighbours that share its label."""
    labels = np.asarray(labels)
    return float((labels[neighbors] == labels[:, None]).mean())
