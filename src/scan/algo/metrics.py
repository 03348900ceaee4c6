"""Clustering metrics (numpy in, numpy/float out).

Cluster ids are arbitrary, so accuracy first maps clusters to classes: one-to-one with the
Hungarian algorithm when there are as many clusters as classes, each cluster to its majority
class when there are more (overclustering).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score


def contingency(pred: np.ndarray, labels: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """(num_clusters, num_classes) counts: M[c, k] = #{i : pred_i = c, label_i = k}."""
    flat = np.asarray(pred, dtype=np.int64) * num_classes + np.asarray(labels, dtype=np.int64)
    return np.bincount(flat, minlength=num_clusters * num_classes).reshape(num_clusters, num_classes)


def cluster_to_class(pred, labels, num_clusters: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Map each cluster id to a class id: Hungarian (maximises matched counts) if C <= K, majority if C > K.

    Clusters left unmatched by the Hungarian step (C < K never happens then) map to their majority class.
    """
    num_clusters = num_clusters or int(np.max(pred)) + 1
    num_classes = num_classes or int(np.max(labels)) + 1
    m = contingency(pred, labels, num_clusters, num_classes)
    mapping = m.argmax(1)
    if num_clusters <= num_classes:
        rows, cols = linear_sum_assignment(-m)
        mapping[rows] = cols
    return mapping


def cluster_accuracy(pred, labels, num_clusters=None, num_classes=None) -> float:
    """ACC = (1/N) Σ_i 1[map(pred_i) = label_i] with the mapping of `cluster_to_class`."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    mapping = cluster_to_class(pred, labels, num_clusters, num_classes)
    return float((mapping[pred] == labels).mean())


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 5, num_classes: int | None = None) -> float:
    """Fraction of samples whose true class is among the classes of their k most probable clusters.

    Clusters are mapped to classes as for ACC (from the top-1 predictions).
    """
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    mapping = cluster_to_class(pred, labels, probs.shape[1], num_classes)
    topk = np.argsort(-probs, axis=1)[:, :k]
    return float((mapping[topk] == labels[:, None]).any(1).mean())


def weighted_precision_recall_f1(pred, labels, num_clusters=None, num_classes=None) -> dict:
    """Cluster-weighted precision, recall, F1.

    For cluster c of size L_c with majority class t: p_c = L_{c,t}/L_c, r_c = L_{c,t}/|t|,
    f_c = 2 p_c r_c/(p_c + r_c); each averaged with weights L_c / Σ L.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    num_clusters = num_clusters or int(pred.max()) + 1
    num_classes = num_classes or int(labels.max()) + 1
    m = contingency(pred, labels, num_clusters, num_classes)
    size = m.sum(1)
    used = size > 0
    top = m.max(1)
    class_size = m.sum(0)[m.argmax(1)]
    p = np.where(used, top / np.maximum(size, 1), 0.0)
    r = np.where(used, top / np.maximum(class_size, 1), 0.0)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    w = size / size.sum()
    return {"precision": float((w * p).sum()), "recall": float((w * r).sum()), "f1": float((w * f).sum())}


def evaluate_clustering(probs_or_pred: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
    """All metrics for one prediction: acc, nmi, ari, ami, top5 (when C >= 5), P/R/F, confusion matrix.

    `probs_or_pred` is either (N, C) probabilities or (N,) hard cluster ids.
    """
    labels = np.asarray(labels, dtype=np.int64)
    arr = np.asarray(probs_or_pred)
    probs = arr if arr.ndim == 2 else None
    pred = arr.argmax(1) if probs is not None else arr.astype(np.int64)
    num_clusters = probs.shape[1] if probs is not None else int(pred.max()) + 1
    num_classes = num_classes or int(labels.max()) + 1
    out = {
        "acc": cluster_accuracy(pred, labels, num_clusters, num_classes),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "ari": float(adjusted_rand_score(labels, pred)),
        "ami": float(adjusted_mutual_info_score(labels, pred)),
    }
    if probs is not None and num_clusters >= 5:
        out["top5"] = top_k_accuracy(probs, labels, 5, num_classes)
    out.update(weighted_precision_recall_f1(pred, labels, num_clusters, num_classes))
    mapping = cluster_to_class(pred, labels, num_clusters, num_classes)
    out["confusion"] = contingency(mapping[pred], labels, num_classes, num_classes).T.tolist()  # rows: true
    out["cluster_to_class"] = mapping.tolist()
    return out
