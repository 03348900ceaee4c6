"""The obvious baselines every run is compared with, and scores that need no labels.

k-means on raw pixels is what a user could get in seconds with scikit-learn; a
clustering that does not beat it is not worth the minutes SCAN takes. Without labels the
comparison uses the mined neighbours: the share of neighbour pairs a clustering keeps
together, next to cluster-size balance and confidence.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from scan.algo.checks import size_balance
from scan.algo.neighbors import l2_normalize, neighbor_agreement, pixel_features

FIT_SAMPLE = 20_000   # k-means and PCA are fitted on at most this many training images


def kmeans_assign(train: np.ndarray, evaluation: np.ndarray | None, k: int, seed: int, normalize: bool = True):
    """k-means (10 restarts) on training features (a sample of at most FIT_SAMPLE), L2-normalised
    unless `normalize` is False; returns the clusters of the training and of the evaluation rows."""
    scale = l2_normalize if normalize else (lambda x: np.ascontiguousarray(x, dtype=np.float32))
    train = scale(train)
    evaluation = None if evaluation is None else scale(evaluation)
    sample = train
    if len(train) > FIT_SAMPLE:
        sample = train[np.random.default_rng(seed).choice(len(train), FIT_SAMPLE, replace=False)]
    kmeans = KMeans(k, n_init=10, random_state=seed).fit(sample)
    return kmeans.predict(train), None if evaluation is None else kmeans.predict(evaluation)


def pixel_kmeans(train_images, eval_images, k: int, seed: int):
    """k-means on raw pixels (their first 50 principal components, which keep the distances):
    (train clusters, eval clusters). Lazily decoded images are read in batches (see pixel_features)."""
    if eval_images is train_images:
        train = evaluation = pixel_features(train_images, seed=seed, whiten=False)
    else:
        train, evaluation = pixel_features(train_images, seed=seed, also=eval_images, whiten=False)
    return kmeans_assign(train, evaluation, k, seed, normalize=False)


def unsupervised_scores(assignments: np.ndarray, neighbors: np.ndarray | None, num_clusters: int,
                        probs: np.ndarray | None = None) -> dict:
    """Label-free scores of a clustering of the training images (N,): neighbour agreement, size balance,
    and the mean top probability when the clustering gives probabilities (N, C)."""
    scores = {"size_balance": size_balance(assignments, num_clusters)}
    if neighbors is not None:
        scores["neighbor_agreement"] = neighbor_agreement(assignments, neighbors)
    if probs is not None:
        scores["confidence"] = float(np.asarray(probs).max(1).mean())
    return scores
