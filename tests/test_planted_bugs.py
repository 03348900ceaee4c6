"""Small, exact tests of behaviour a plausible one-line slip would break unnoticed elsewhere.

Each test pins one property with values worked out by hand (or a constant-image trick), so that
the slip named in its comment makes it fail rather than merely shift a number inside a range:

 1. self-labelling counts a prediction as confident only strictly above the threshold;
 2. the strong augmentation's RandAugment ops change nearly every image on their own;
 3. selflabel.class_balance reaches the self-labelling loss;
 4. the BYOL-queue target follows its cosine momentum schedule, one EMA step per training step;
 5. the MoCo key encoder is an EMA of the query encoder at the configured momentum;
 6. SPC trains its strong set S on the weak view;
 7. weighted precision/recall/F1 are per cluster (prediction), not per class (label);
 8. predict and exported models report the neighbour confidence, not the softmax maximum;
 9. kNN mining keeps the nearest neighbour and ranks by cosine, not raw inner product;
10. the cosine learning-rate schedule's first, middle and last steps.
"""
import dataclasses
import inspect
import math
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, copy_run

import scan.nets.augment
import scan.pipeline.stages.selflabel as selflabel_stage
import scan.train.refine
from scan.algo.losses import confidence_pseudo_labels, selflabel_loss
from scan.algo.metrics import weighted_precision_recall_f1
from scan.algo.neighbors import knn_search, l2_normalize, mine_neighbors
from scan.algo.propagation import PseudoLabels
from scan.config import AugmentConfig, RefineConfig
from scan.nets.augment import StrongAugment
from scan.nets.models import ClusteringModel, build_backbone
from scan.pipeline import load_config, open_run
from scan.pipeline.stages.cluster import stage_cluster
from scan.pipeline.stages.selflabel import stage_selflabel
from scan.pretext import build_pretext
from scan.train.engine import Runtime, cosine_schedule
from scan.train.refine import image_inputs, train_spc

# ---------------------------------------------------------------- 1. confidence is strictly above the threshold


def test_a_probability_exactly_at_the_threshold_is_not_confident():
    # zero logits over 2 classes give p = 0.5 exactly (in float32 too): at threshold 0.5 nothing is
    # confident, so nothing is trained on; the slightest margin above it makes the sample count
    mask, _ = confidence_pseudo_labels(torch.zeros(1, 2), 0.5)
    assert mask.tolist() == [False]
    loss, count = selflabel_loss(torch.zeros(1, 2), torch.zeros(1, 2), threshold=0.5)
    assert count == 0 and loss.item() == 0.0
    _, count = selflabel_loss(torch.tensor([[0.01, 0.0]]), torch.zeros(1, 2), threshold=0.5)
    assert count == 1


# ---------------------------------------------------------------- 2. the strong augmentation's ops act


def test_the_strong_augmentation_ops_alone_change_nearly_every_image():
    # with Cutout, flip and the weak shift switched off, only the 4 RandAugment-style ops remain; all 4
    # are the identity for about (1/14)^4 of the images, and the other ops change an image of mid-grey
    # noise, so at least 90% of the images must come out different (an augmentation that skipped the
    # ops would return every image unchanged)
    cfg = AugmentConfig(cutout_fraction=0.0, flip=False, weak_translate=0.0)
    augment = StrongAugment(cfg, image_size=16)
    torch.manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(64, 3, 16, 16)
    out = augment(x.clone())
    assert out.shape == x.shape
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean().item() >= 0.9


# ---------------------------------------------------------------- 3 and 8: one clustered tiny run, shared


@pytest.fixture(scope="module")
def clustered_run(mined_run, tmp_path_factory):
    """The shared mined run, copied, with the cluster stage done (TINY settings; copy it before use)."""
    base = tmp_path_factory.mktemp("clustered")
    run = copy_run(mined_run, base, [])
    stage_cluster(run)
    return run.run_dir


def _open_copy(source, target, overrides):
    shutil.copytree(source, target)
    return open_run(load_config("digits", list(TINY) + overrides), target)


# ---------------------------------------------------------------- 3. selflabel.class_balance reaches the loss


@pytest.mark.parametrize("balance", [True, False])
def test_selflabel_stage_passes_the_configured_class_balance_to_its_loss(clustered_run, tmp_path, monkeypatch,
                                                                         balance):
    # a threshold below 1/C makes every sample confident, so the stage never skips training
    run = _open_copy(clustered_run, tmp_path / "run", [f"selflabel.class_balance={str(balance).lower()}",
                                                       "selflabel.threshold=0.05", "selflabel.epochs=1",
                                                       "selflabel.min_cluster_keep=0"])
    seen = []
    signature = inspect.signature(selflabel_loss)

    def spy(*args, **kwargs):
        seen.append(signature.bind(*args, **kwargs).arguments.get("class_balance", "not given"))
        return selflabel_loss(*args, **kwargs)
    monkeypatch.setattr(selflabel_stage, "selflabel_loss", spy)   # the name the stage calls
    record = stage_selflabel(run)
    assert not record.get("skipped")
    assert seen and all(value is balance for value in seen), seen


# ---------------------------------------------------------------- 4 and 5. momentum encoders


def _method(name, overrides=()):
    torch.manual_seed(0)
    cfg = load_config("digits", list(TINY) + [f"pretext.method={name}", *overrides])
    return build_pretext(name, build_backbone("resnet_small", 1, width=8), cfg, 8, 1, num_samples=32)


def _move_online_and_step(online, target, after_step):
    """Shift every online parameter by +1 (as if trained), run `after_step`, and return
    (target before, online, target after) as float64 copies."""
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    old = [t.detach().double().clone() for t in target.parameters()]
    live = [p.detach().double().clone() for p in online.parameters()]
    after_step()
    new = [t.detach().double().clone() for t in target.parameters()]
    return old, live, new


def _assert_ema(old, live, new, m):
    """θ_target ← m·θ_target + (1 − m)·θ_online for every parameter."""
    assert len(old) == len(live) == len(new) > 0
    for o, p, n in zip(old, live, new):
        torch.testing.assert_close(n, m * o + (1 - m) * p, atol=2e-6, rtol=0)


def test_byol_queue_target_follows_the_cosine_momentum_schedule():
    # m_n = 1 − (1 − m_base)(cos(π n / (N − 1)) + 1) / 2 over N = 5 steps, m_base = 0.9:
    # step 0: 0.9, step 2: cos(π/2) = 0 -> 0.95, step 4 (last): 1 (the target no longer moves)
    method = _method("byol_queue", ["pretext.ema_momentum=0.9"])
    for step, m in ((0, 0.9), (2, 0.95), (4, 1.0)):
        old, live, new = _move_online_and_step(method.online, method.target, partial(method.after_step, step, 5))
        _assert_ema(old, live, new, m)
        # the target neither stays put nor becomes the online network (except at m = 1)
        assert (max((n - o).abs().max().item() for n, o in zip(new, old)) > 0.04) == (m < 1)
    # and by default m_base = 0.996 on the first step
    method = _method("byol_queue")
    _assert_ema(*_move_online_and_step(method.online, method.target, lambda: method.after_step(0, 10)), 0.996)


@pytest.mark.parametrize("overrides, m", [((), 0.999), (("pretext.ema_momentum=0.9",), 0.9)])
def test_moco_key_encoder_is_an_ema_of_the_query_encoder(overrides, m):
    # after one step every key parameter has moved (1 − m) of the way to the query's (shifted by +1),
    # whatever the step: MoCo's momentum is fixed
    method = _method("moco", overrides)
    for step in (0, 7):
        old, live, new = _move_online_and_step(method.query, method.key, partial(method.after_step, step, 10))
        _assert_ema(old, live, new, m)


# ---------------------------------------------------------------- 6. SPC: S is trained on the weak view

STRONG, WEAK = 0.25, 0.75     # every pixel of a (patched) strong / weak view


def test_spc_trains_the_strong_set_on_the_weak_view(tmp_path, monkeypatch):
    # the augmentations return constant images, so every network input says which view it is; the
    # pseudo-labels are fixed: samples 0..7 form S (class = index mod 2), 8..15 form W
    monkeypatch.setattr(scan.nets.augment.StrongAugment, "forward", lambda self, x: torch.full_like(x, STRONG))
    monkeypatch.setattr(scan.nets.augment.WeakAugment, "forward", lambda self, x: torch.full_like(x, WEAK))
    n = 16
    strong = np.arange(n) < 8
    labels = np.arange(n) % 2

    def fixed_labels(features, probs, *args, **kwargs):
        return PseudoLabels(strong.copy(), strong.copy(), np.eye(2)[labels], labels)
    monkeypatch.setattr(scan.train.refine, "hierarchical_pseudo_labels", fixed_labels)

    torch.manual_seed(0)
    rt = Runtime(torch.device("cpu"), quiet=True)
    model = rt.prepare(ClusteringModel(build_backbone("resnet_small", 1, width=8), num_clusters=2))
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    inputs = image_inputs(model, images, AugmentConfig(), rt)
    fed = []

    def spy(x):
        fed.append(x.detach().clone())
        return inputs.logits(x)
    r = RefineConfig(method="spc", epochs=1, batch_size=4, top_fraction=0.5, num_neighbors=3)
    train_spc(model, dataclasses.replace(inputs, logits=spy), n, r, rt, tmp_path, "fp")
    assert len(fed) == n // 4
    for x in fed:   # rows 0..3: S, rows 4..7: S mixed with strongly augmented W (λ' >= 1/2 towards S)
        assert x.shape[0] == 8
        assert bool((x[:4] == WEAK).all())
        mixed = x[4:].flatten(1)
        assert bool((mixed >= 0.5 * WEAK + 0.5 * STRONG - 1e-6).all() and (mixed <= WEAK + 1e-6).all())


# ---------------------------------------------------------------- 7. weighted P/R/F1 are per cluster


def test_weighted_precision_recall_f1_worked_out_by_hand():
    # cluster 0 holds 8 images of class 0 and 1 of class 1; cluster 1 holds 3 of class 1.
    # Classes have 8 and 4 images. Per cluster (majority class t, weight |cluster| / 12):
    #   cluster 0: p = 8/9, r = 8/8 = 1,  f = 16/17,  weight 9/12
    #   cluster 1: p = 3/3, r = 3/4,      f = 6/7,    weight 3/12
    # P = 11/12, R = 9/12 + 3/12 * 3/4 = 15/16, F = 9/12 * 16/17 + 3/12 * 6/7.
    # Swapping prediction and label gives R = 8/12 * 8/9 + 4/12 = 25/27 and another F.
    pred = np.array([0] * 9 + [1] * 3)
    labels = np.array([0] * 8 + [1] + [1] * 3)
    m = weighted_precision_recall_f1(pred, labels, 2, 2)
    assert m["precision"] == pytest.approx(11 / 12, abs=1e-12)
    assert m["recall"] == pytest.approx(15 / 16, abs=1e-12)
    assert m["f1"] == pytest.approx(9 / 12 * 16 / 17 + 3 / 12 * 6 / 7, abs=1e-12)
    assert weighted_precision_recall_f1(labels, pred, 2, 2)["recall"] == pytest.approx(25 / 27, abs=1e-12)


# ---------------------------------------------------------------- 8. predict/export confidence is the neighbour measure


def _neighbour_confidence(model, images):
    """The measure of scan.algo.ood, written out: for an image with cluster c = argmax p(x), the
    mean of p_j[c] over its k most cosine-similar reference images j, weighted by max(cos, 0)."""
    with torch.no_grad():
        features = model.backbone(images.float() / 255)
        probs = torch.softmax(model.head(features), 1)
        sims = F.normalize(features.double(), dim=1) @ model.trust.features.double().T
        top, idx = sims.topk(model.trust.neighbours, dim=1)
        weights = top.clamp_min(0)
        share = model.trust.probs.double()[idx, probs.argmax(1)[:, None]]     # (B, k): p_j[c(x)]
        confidence = (weights * share).sum(1) / weights.sum(1)
    return confidence.numpy(), probs.max(1).values.double().numpy()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit: TorchScript is deprecated upstream
def test_predict_and_export_report_the_neighbour_confidence_not_the_softmax_maximum(clustered_run, tmp_path):
    from scan.use.export import export_run
    from scan.use.inference import open_trained_run, predict_images, trusted_classifier
    run_dir = tmp_path / "run"
    shutil.copytree(clustered_run, run_dir)
    run = open_trained_run(run_dir, device="cpu", with_data=True)
    images = run.eval.images[:120]
    predicted = predict_images(run, images, [str(i) for i in range(len(images))])
    hand, softmax_max = _neighbour_confidence(trusted_classifier(run), images)
    # the two measures are far apart on several of these images, so the test can tell them apart
    assert (np.abs(hand - softmax_max) > 0.05).sum() >= 10     # 29 of these 120 when written
    np.testing.assert_allclose(predicted.trust.confidence, hand, atol=1e-4)

    path = export_run(run_dir, tmp_path / "model.pt", "torchscript")
    exported = torch.jit.load(str(path))
    with torch.no_grad():
        _, confidence, _ = exported(images)
    np.testing.assert_allclose(confidence.numpy(), hand, atol=1e-4)


# ---------------------------------------------------------------- 9. kNN mining


def test_mined_neighbours_of_five_vectors_worked_out_by_hand():
    # five 2-D vectors at 0°, 10°, 30°, 70°, 150° with lengths 10, 1, 1, 5, 1. By angle apart:
    #   0°: 10° (10), 30° (30), 70° (70)        10°: 0° (10), 30° (20), 70° (60)
    #   30°: 10° (20), 0° (30), 70° (40)        70°: 30° (40), 10° (60), 0° (70)
    #   150°: 70° (80), 30° (120), 10° (140)
    # By raw inner product the long 0° and 70° vectors would come first for the short ones
    # (30°: 10 cos 30° = 8.7 and 5 cos 40° = 3.8 before cos 20° = 0.94).
    angles = np.radians([0, 10, 30, 70, 150])
    lengths = np.array([10, 1, 1, 5, 1])[:, None]
    x = (np.stack([np.cos(angles), np.sin(angles)], 1) * lengths).astype(np.float32)
    neighbours = mine_neighbors(x, k=3)
    assert neighbours.tolist() == [[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0], [3, 2, 1]]
    # on unit vectors, the search itself returns each vector first (cos 1), then its nearest
    sims, idx = knn_search(l2_normalize(x), 2)
    assert idx.tolist() == [[0, 1], [1, 0], [2, 1], [3, 2], [4, 3]]
    np.testing.assert_allclose(sims[:, 0], 1, atol=1e-6)
    np.testing.assert_allclose(sims[:, 1], np.cos(np.radians([10, 10, 20, 40, 80])), atol=1e-6)


# ---------------------------------------------------------------- 10. cosine learning-rate schedule


def test_cosine_schedule_values_worked_out_by_hand():
    # no warm-up, 4 steps: t = n / 4, lr = ½(1 + cos πt): 1, ½(1 + √2/2), ½, ½(1 − √2/2)
    half = math.sqrt(2) / 2
    np.testing.assert_allclose(cosine_schedule(1.0, 4), [1, 0.5 * (1 + half), 0.5, 0.5 * (1 - half)], atol=1e-12)
    # with 2 warm-up steps of 6: base·(n + 1)/2 = ½, 1, then the same cosine over the 4 steps left
    np.testing.assert_allclose(cosine_schedule(1.0, 6, warmup_steps=2),
                               [0.5, 1, 1, 0.5 * (1 + half), 0.5, 0.5 * (1 - half)], atol=1e-12)
    # towards a final value 0.1 from 0.5: final + (base − final)·½(1 + cos πt)
    np.testing.assert_allclose(cosine_schedule(0.5, 4, final=0.1),
                               [0.5, 0.1 + 0.2 * (1 + half), 0.3, 0.1 + 0.2 * (1 - half)], atol=1e-12)
