import math

import pytest
import torch
import torch.nn.functional as F

from scan.algo.losses import (
    balanced_cross_entropy,
    entropy,
    info_nce,
    nt_xent,
    per_cluster_pseudo_labels,
    scan_loss,
    selflabel_loss,
)


def test_scan_loss_of_identical_one_hot_pairs_with_uniform_usage_is_minus_lambda_log_c():
    c, lam = 4, 5.0
    logits = torch.eye(c) * 100.0            # each sample confidently in its own cluster
    total, consistency, h = scan_loss(logits, logits.clone(), lam)
    assert consistency.item() == pytest.approx(0.0, abs=1e-5)
    assert h.item() == pytest.approx(math.log(c), abs=1e-5)
    assert total.item() == pytest.approx(-lam * math.log(c), abs=1e-4)


def test_scan_loss_consistency_matches_hand_computation_and_keeps_head_dimension():
    pa = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    pn = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    total, consistency, h = scan_loss(pa.log().expand(3, 2, 2), pn.log().expand(3, 2, 2), 2.0)
    dots = torch.tensor([0.7 * 0.6 + 0.3 * 0.4, 0.2 * 0.5 + 0.8 * 0.5])
    expected_cons = -dots.log().mean()
    mean = pa.mean(0)
    expected_h = -(mean * mean.log()).sum()
    assert total.shape == (3,)
    assert torch.allclose(consistency, expected_cons.expand(3), atol=1e-6)
    assert torch.allclose(h, expected_h.expand(3), atol=1e-6)
    assert torch.allclose(total, (expected_cons - 2.0 * expected_h).expand(3), atol=1e-6)


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((5,), 0.2)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_of_perfectly_aligned_orthogonal_pairs_matches_analytic_value():
    b, t = 4, 0.5
    z = torch.eye(8)[:b]                      # orthogonal unit vectors
    loss = nt_xent(z, z.clone(), t)
    # each row: positive similarity 1/t, 2b-2 negatives with similarity 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_prefers_aligned_views():
    torch.manual_seed(0)
    z1 = F.normalize(torch.randn(16, 8), dim=1)
    aligned = nt_xent(z1, z1.clone())
    shuffled = nt_xent(z1, z1[torch.randperm(16)])
    assert aligned < shuffled


def test_balanced_cross_entropy_weights_classes_equally():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 0, 1])
    ce = F.cross_entropy(logits, targets, reduction="none")
    expected = (ce[:3].mean() + ce[3]) / 2    # each class contributes its mean CE, equally
    assert balanced_cross_entropy(logits, targets, 2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert balanced_cross_entropy(logits, targets, 2, class_balance=False).item() == pytest.approx(ce.mean().item())


def test_selflabel_loss_uses_only_confident_weak_predictions():
    weak = torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 10.0]])     # rows 0 and 2 are confident
    strong = torch.tensor([[1.0, 0.0], [5.0, -5.0], [0.0, 1.0]])
    loss, count = selflabel_loss(weak, strong, threshold=0.99)
    assert count == 2
    expected = F.cross_entropy(strong[[0, 2]], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_selflabel_loss_without_confident_samples_is_zero_and_differentiable():
    strong = torch.zeros(3, 4, requires_grad=True)
    loss, count = selflabel_loss(torch.zeros(3, 4), strong, threshold=0.99)
    loss.backward()
    assert count == 0 and loss.item() == 0.0


def test_per_cluster_pseudo_labels_keep_each_clusters_most_confident_members():
    # clusters by argmax: 0 = {0: .9, 1: .8, 2: .6, 5: .95}, 1 = {3: .7, 4: .55}; quota ⌈0.5 · 6 / 2⌉ = 2
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.95, 0.05]])
    mask, targets = per_cluster_pseudo_labels(probs, 0.5)
    assert targets.tolist() == [0, 0, 0, 1, 1, 0]
    assert mask.tolist() == [True, False, False, True, True, True]     # 5 and 0 of cluster 0; all of cluster 1
    # a global threshold of 0.9 would leave cluster 1 without a single label
    assert (probs.max(1).values > 0.9).tolist() == [False, False, False, False, False, True]
    # quota ⌈1 · 6 / 2⌉ = 3: the third of cluster 0 (image 1, 0.8) joins; cluster 1 has only 2
    assert per_cluster_pseudo_labels(probs, 1.0)[0].tolist() == [True, True, False, True, True, True]
    # the chosen labels replace the weak view's in the loss
    strong = torch.randn(6, 2)
    loss, count = selflabel_loss(torch.zeros(6, 2), strong, labels=(mask, targets))
    assert count == 4
    expected = (F.cross_entropy(strong[[0, 5]], targets[[0, 5]]) + F.cross_entropy(strong[[3, 4]], targets[[3, 4]])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_info_nce_of_aligned_positives_and_orthogonal_negatives_matches_analytic_value():
    b, k, t = 3, 5, 0.2
    basis = torch.eye(b + k)
    q = basis[:b]                             # each query equals its positive: q·k⁺ = 1
    negatives = basis[b:]                     # orthogonal to every query: q·n = 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + k))
    assert info_nce(q, q.clone(), negatives, t).item() == pytest.approx(expected, rel=1e-6)
    # ignored negatives drop out of the denominator (here two of the five, for every row)
    ignore = torch.zeros(b, k, dtype=torch.bool)
    ignore[:, :2] = True
    fewer = -math.log(math.exp(1 / t) / (math.exp(1 / t) + k - 2))
    assert info_nce(q, q.clone(), negatives, t, ignore).item() == pytest.approx(fewer, rel=1e-6)
