import numpy as np
import pytest

from scan.algo.metrics import (
    cluster_accuracy,
    cluster_to_class,
    contingency,
    evaluate_clustering,
    top_k_accuracy,
    weighted_precision_recall_f1,
)


def test_accuracy_of_permuted_labelling_is_one():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    perm = np.array([2, 0, 3, 1])
    assert cluster_accuracy(perm[labels], labels) == 1.0
    m = evaluate_clustering(perm[labels], labels)
    assert m["acc"] == 1.0 and m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)


def test_hungarian_is_one_to_one_while_overclustering_uses_majority():
    labels = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 1, 1])          # cluster 0 mixes: 3 of class 0, 1 of class 1
    assert cluster_accuracy(pred, labels) == pytest.approx(5 / 6)
    # two clusters that are both mostly class 0: one-to-one can map only one of them to class 0
    pred2 = np.array([0, 0, 1, 1, 1, 1])
    labels2 = np.array([0, 0, 0, 1, 1, 1])
    assert cluster_accuracy(pred2, labels2) == pytest.approx(5 / 6)
    over = np.array([0, 1, 2, 3, 3, 3])           # 4 clusters for 2 classes: majority mapping
    assert cluster_accuracy(over, labels, num_clusters=4, num_classes=2) == 1.0
    assert list(cluster_to_class(over, labels, 4, 2)) == [0, 0, 0, 1]


def test_contingency_counts():
    m = contingency(np.array([0, 1, 1]), np.array([1, 1, 0]), 2, 2)
    assert m.tolist() == [[0, 1], [1, 1]]


def test_top5_counts_true_class_in_mapped_top_k():
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4]])
    labels = np.array([0, 1, 2, 2])
    # clusters map identically (Hungarian on top-1); sample 3 has class 2 only at rank 2
    assert top_k_accuracy(probs, labels, k=1) == pytest.approx(0.75)
    assert top_k_accuracy(probs, labels, k=2) == pytest.approx(1.0)


def test_weighted_precision_recall_f1_hand_example():
    # cluster 0: 3 of class 0, 1 of class 1 (size 4); cluster 1: 2 of class 1 (size 2)
    pred = np.array([0, 0, 0, 0, 1, 1])
    labels = np.array([0, 0, 0, 1, 1, 1])
    out = weighted_precision_recall_f1(pred, labels)
    p0, r0 = 3 / 4, 3 / 3
    p1, r1 = 2 / 2, 2 / 3
    f0, f1 = 2 * p0 * r0 / (p0 + r0), 2 * p1 * r1 / (p1 + r1)
    assert out["precision"] == pytest.approx(4 / 6 * p0 + 2 / 6 * p1)
    assert out["recall"] == pytest.approx(4 / 6 * r0 + 2 / 6 * r1)
    assert out["f1"] == pytest.approx(4 / 6 * f0 + 2 / 6 * f1)


def test_evaluate_clustering_confusion_rows_are_true_classes():
    labels = np.array([0, 0, 1, 1])
    pred = np.array([1, 1, 0, 1])
    m = evaluate_clustering(pred, labels)
    assert np.array(m["confusion"]).sum() == 4
    assert m["confusion"][0][0] == 2 and m["confusion"][1] == [1, 1]
