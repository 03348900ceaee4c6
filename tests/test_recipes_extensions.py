"""SPC protocol and many-class recipe settings (issue 14, items 6-10): the shipped configs against a
published table, each new setting reaching its code, and each new config running on tiny fake files."""
import json
import logging

import numpy as np
import pytest
import torch
from fakes import write_fashion_mnist, write_stl10
from test_imagenet import write_tree

import scan.train.mining as mining
from scan.algo.propagation import hierarchical_pseudo_labels, top_r_filters
from scan.config import AugmentConfig, Config, ConfigError, flatten
from scan.data import read_class_list
from scan.nets.augment import SimCLRAugment
from scan.nets.augment_views import build_views
from scan.nets.models import ContrastiveModel, build_backbone, projection_head
from scan.pipeline import load_config, open_run, run_pipeline
from scan.pretext import build_pretext
from scan.train.mining import mlp_head
from scan.train.refine import warn_if_top_r_keeps_all

# The published recipes (SPC paper protocol; many-class paper), as the configs must resolve them.
# Changing a config without changing this table (and the README table) fails the suite.
SPC_PROTOCOL = {"selflabel.enabled": False, "refine.method": "spc", "refine.weak_labels": "soft",
                "refine.rank_by": "propagated", "refine.threshold": 0.95, "refine.mu": 0.01,
                "refine.mix_weight": 1.0}
MANY_CLASS = {"pretext.method": "byol_queue", "pretext.views": "randaugment", "model.backbone": "resnet50",
              "pretext.batch_size": 256, "pretext.epochs": 300, "pretext.temperature": 0.2,
              "pretext.ema_momentum": 0.996, "mine.method": "multiview", "mine.num_neighbors": 50,
              "mine.head": "mlp", "mine.features": "backbone", "selflabel.enabled": False,
              "cluster.batch_size": 512, "cluster.epochs": 100,
              "data.train_split": "all", "data.eval_split": "all", "data.image_size": 224}
PUBLISHED = {
    "stl10-spc": {**SPC_PROTOCOL, "data.dataset": "stl10", "refine.epochs": 50, "refine.rounds": 5,
                  "refine.top_fraction": 0.03, "refine.num_neighbors": 20, "refine.lr": 0.03,
                  "refine.batch_size": 256},
    "digits-spc": {**SPC_PROTOCOL, "data.dataset": "digits", "refine.epochs": 20, "refine.rounds": 4},
    "fashion-mnist-spc": {**SPC_PROTOCOL, "data.dataset": "fashion-mnist", "refine.epochs": 10, "refine.rounds": 5},
    "imagenet50-manyclass": {**MANY_CLASS, "data.dataset": "imagenet50"},
    "imagenet100-manyclass": {**MANY_CLASS, "data.dataset": "imagenet100"},
    "imagenet200-manyclass": {**MANY_CLASS, "data.dataset": "imagenet200"},
    "imagenet1k-manyclass": {**MANY_CLASS, "data.dataset": "imagenet"},
    "imagenet10-manyclass": {**MANY_CLASS, "data.dataset": "imagenet10"},
    "imagenet-dogs15-manyclass": {**MANY_CLASS, "data.dataset": "imagenet-dogs15"},
    "stl10-manyclass": {**MANY_CLASS, "data.dataset": "stl10", "data.image_size": 96, "mine.num_neighbors": 20},
}
# what our CPU defaults keep (the other side of the README table)
OUR_DEFAULTS = {"refine.rounds": 1, "refine.weak_labels": "soft", "refine.rank_by": "propagated",
                "pretext.views": "simclr", "mine.head": "linear", "selflabel.enabled": True}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_resolves_to_the_published_table(name):
    resolved = dict(flatten(load_config(name).to_dict()))
    assert {key: resolved[key] for key in PUBLISHED[name]} == PUBLISHED[name]


def test_defaults_are_ours_and_every_new_choice_is_checked_at_load_time():
    resolved = dict(flatten(Config().to_dict()))
    assert {key: resolved[key] for key in OUR_DEFAULTS} == OUR_DEFAULTS
    for key, bad in (("refine.weak_labels", "sofft"), ("refine.rank_by", "network"), ("pretext.views", "simcl"),
                     ("mine.head", "mpl")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("digits", [f"{key}={bad}"])


# ---- item 6: weak labels and the ranked column, on graphs solved by hand

def test_soft_and_hard_weak_labels_on_two_pairs_worked_by_hand():
    """Two pairs of identical points: with k = 1 each pair is its own graph, W̃ = [[0, 1], [1, 0]], and
    (I − γW̃)⁻¹ ∝ [[1, γ], [γ, 1]]. μ = 1 → γ = ½, so P_i ∝ Y_i + ½ Y_j (rows normalised):
    P_0 = (1.3, 0.2)/1.5, P_1 = (1.1, 0.4)/1.5, P_2 = (0.4, 1.1)/1.5, P_3 = (0.35, 1.15)/1.5."""
    features = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])    # only sample 0 is above δ
    p = np.array([[1.3, 0.2], [1.1, 0.4], [0.4, 1.1], [0.35, 1.15]]) / 1.5
    kwargs = dict(threshold=0.9, top_fraction=0.25, k=1, mu=1.0, max_iter=50)
    soft = hierarchical_pseudo_labels(features, probs, weak_labels="soft", **kwargs)
    hard = hierarchical_pseudo_labels(features, probs, weak_labels="hard", **kwargs)
    np.testing.assert_allclose(soft.targets, p, atol=1e-9)
    assert hard.targets.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    for pl in (soft, hard):   # the split and the hard labels of S do not depend on W's targets
        assert pl.strong.tolist() == [True, False, False, False] and pl.labels.tolist() == [0, 0, 1, 1]


def test_rank_by_chooses_the_column_of_a_sample_that_propagation_flips():
    """Four identical points (complete graph, W̃ = (J − I)/3), sample 0 confidently class 0, the others
    confidently class 1. μ = 0.25 → γ = 0.8: Z_1 ∝ (γ/3, 1), Z_0 = Y_0 + γZ_1, so P_0 = (7, 12)/19 and
    P_1..3 = (4, 15)/19: propagation moves sample 0 to class 1. With r = 3/4 (3 per column) column 1
    keeps samples 1-3 (15/19 > 12/19), column 0 keeps sample 0 (7/19 > 4/19)."""
    features = np.ones((4, 2), dtype=np.float32)
    probs = np.array([[0.95, 0.05]] + [[0.05, 0.95]] * 3)
    kwargs = dict(threshold=0.9, top_fraction=0.75, k=3, mu=0.25, max_iter=50)
    by_p = hierarchical_pseudo_labels(features, probs, rank_by="propagated", **kwargs)
    by_q = hierarchical_pseudo_labels(features, probs, rank_by="predicted", **kwargs)
    np.testing.assert_allclose(by_p.targets, np.array([[7, 12]] + [[4, 15]] * 3) / 19, atol=1e-9)
    assert by_p.strong.tolist() == [False, True, True, True]          # ranked in column 1, where it is 4th
    assert by_q.strong.tolist() == [True, True, True, True] and by_q.labels.tolist() == [0, 1, 1, 1]


# ---- item 7: the top-r filter with many classes

def test_top_r_warning_fires_exactly_when_c_times_r_reaches_one(caplog):
    assert top_r_filters(10, 0.03) and not top_r_filters(50, 0.03) and not top_r_filters(10, 0.1)
    with caplog.at_level(logging.WARNING, logger="scan"):
        warn_if_top_r_keeps_all(10, 0.03)
        assert not caplog.records
        warn_if_top_r_keeps_all(50, 0.03)
    assert len(caplog.records) == 1 and "refine.top_fraction=0.03" in caplog.text and "50 clusters" in caplog.text


# ---- item 9: the paper's pretext views

def test_randaugment_views_have_no_simclr_part_and_cutout_on_view_b_only():
    cfg = AugmentConfig(strong_num_ops=0, flip=False, weak_translate=0.0, cutout_fraction=0.5)
    a, b = build_views("randaugment", cfg, 16, 3)
    x = torch.full((4, 3, 16, 16), 0.5)
    assert torch.equal(a(x), x)                                     # no ops, no shift, no cutout: identity
    out = b(x)
    zeros = (out == 0).all(1).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 64)).all()                      # one 8 x 8 square, clipped at the border
    assert torch.equal(out[out != 0], x[out != 0])                  # and nothing else changed
    simclr = build_views("simclr", cfg, 16, 3)
    assert not any(isinstance(m, SimCLRAugment) for v in (a, b) for m in v.modules())
    assert all(any(isinstance(m, SimCLRAugment) for m in v.modules()) for v in simclr)


def test_pretext_views_setting_reaches_byol_queue(tiny_overrides):
    for views, has_simclr in (("simclr", True), ("randaugment", False)):
        cfg = load_config("digits", tiny_overrides + ["pretext.method=byol_queue", f"pretext.views={views}"])
        method = build_pretext("byol_queue", build_backbone("resnet_small", 1, width=8), cfg, 8, 1, 64)
        assert any(isinstance(m, SimCLRAugment) for m in method.view_a.modules()) == has_simclr


# ---- item 10: the MLP mining head

def test_mlp_head_starts_from_the_projection_first_layer(tmp_path):
    model = ContrastiveModel(build_backbone("resnet_small", 1, width=8), 16)
    path = tmp_path / "projection.pt"
    torch.save(projection_head(model).state_dict(), path)
    head = mlp_head(model.backbone.feature_dim, 5, path)
    assert torch.equal(head[0].weight, model.head[0].weight) and torch.equal(head[0].bias, model.head[0].bias)
    assert head[2].out_features == 5 and head[0].out_features == model.head[0].out_features
    with pytest.raises(Exception, match="mine.head=mlp needs the pretext projection"):
        mlp_head(model.backbone.feature_dim, 5, tmp_path / "missing.pt")


# ---- every new config starts and runs a few steps on tiny fake files in its real format

FEW_STEPS = ["pretext.epochs=1", "cluster.epochs=1", "cluster.num_heads=2", "mine.num_neighbors=5",
             "refine.epochs=2", "refine.rounds=2", "quiet=true"]


def _spc_run_checks(metrics, run_dir, n_eval, clusters):
    assert metrics["final_stage"] == "refine" and "selflabel" not in metrics
    assert metrics["num_eval"] == n_eval and np.load(run_dir / "probs.npy").shape == (n_eval, clusters)


def test_digits_spc_refines_in_rounds_instead_of_self_labelling(tmp_path, tiny_overrides, caplog):
    cfg = load_config("digits-spc", tiny_overrides + FEW_STEPS + ["refine.top_fraction=0.2", "refine.threshold=0.2"])
    with caplog.at_level(logging.WARNING, logger="scan"):
        metrics = run_pipeline(open_run(cfg, tmp_path / "run"))
    _spc_run_checks(metrics, tmp_path / "run", 360, 10)
    assert "refine.top_fraction=0.2" in caplog.text      # 10 clusters x 0.2 >= 1
    done = json.loads((tmp_path / "run" / "refine" / "done.json").read_text())
    assert [r["epoch"] for r in done["rounds"]] == [1, 2]    # labels rebuilt at every round


@pytest.mark.slow
def test_stl10_spc_runs_on_fake_binary_files(tmp_path):
    root = write_stl10(tmp_path / "data", n_train=24, n_test=8, n_unlabeled=4)
    cfg = load_config("stl10-spc", FEW_STEPS + [f"data.path={root}", "refine.batch_size=8", "cluster.batch_size=8"])
    _spc_run_checks(run_pipeline(open_run(cfg, tmp_path / "run")), tmp_path / "run", 8, 10)


def test_fashion_mnist_spc_runs_on_fake_idx_files(tmp_path):
    root = write_fashion_mnist(tmp_path / "fashion", n_train=60, n_test=20)
    cfg = load_config("fashion-mnist-spc", FEW_STEPS + [f"data.path={root}", "pretext.batch_size=32"])
    _spc_run_checks(run_pipeline(open_run(cfg, tmp_path / "run")), tmp_path / "run", 20, 10)


TINY_MANY_CLASS = ["data.image_size=16", "model.backbone=resnet_small", "model.width=8", "pretext.epochs=1",
                   "pretext.batch_size=64", "pretext.warmup_epochs=0", "cluster.epochs=1", "cluster.num_heads=2",
                   "cluster.batch_size=64", "mine.num_neighbors=3", "mine.head_epochs=1", "quiet=true"]


@pytest.mark.parametrize("name, subset, classes", [("imagenet50-manyclass", "imagenet50", None),
                                                   ("imagenet1k-manyclass", "imagenet50", 3),
                                                   ("imagenet10-manyclass", "imagenet10", None),
                                                   ("imagenet-dogs15-manyclass", "imagenet-dogs15", None)])
def test_many_class_config_runs_on_a_fake_tree_with_the_mlp_head_from_the_projection(tmp_path, monkeypatch,
                                                                                    name, subset, classes):
    wnids = [wnid for wnid, _ in read_class_list(subset)][:classes]
    root = write_tree(tmp_path / "imagenet", wnids)                    # 2 train + 2 val images per class
    heads = []
    original = mining.train_brief_head

    def spy(features, neighbors, head, *args):
        heads.append({k: v.clone() for k, v in head.state_dict().items()})
        return original(features, neighbors, head, *args)
    monkeypatch.setattr(mining, "train_brief_head", spy)
    cfg = load_config(name, TINY_MANY_CLASS + [f"data.path={root}"])
    metrics = run_pipeline(open_run(cfg, tmp_path / "run"))
    n = 4 * len(wnids)
    assert metrics["num_eval"] == n and metrics["num_clusters"] == len(wnids)    # train + val, evaluated on all
    assert metrics["final_stage"] == "cluster"                                     # no self-labelling
    projection = torch.load(tmp_path / "run" / "pretext" / "projection.pt", weights_only=True)
    assert len(heads) == 1 and torch.equal(heads[0]["0.weight"], projection["0.weight"])
    mine_done = json.loads((tmp_path / "run" / "mine" / "done.json").read_text())
    assert mine_done["method"] == "multiview" and mine_done["head"].startswith("mlp")


def test_stl10_many_class_config_merges_train_and_test_and_mines_with_several_views(tmp_path):
    root = write_stl10(tmp_path / "data", n_train=24, n_test=8, n_unlabeled=4)
    cfg = load_config("stl10-manyclass", TINY_MANY_CLASS + [f"data.path={root}"])
    metrics = run_pipeline(open_run(cfg, tmp_path / "run"))
    assert metrics["num_eval"] == 24 + 8 and metrics["num_clusters"] == 10    # train + test, evaluated on all
    assert metrics["final_stage"] == "cluster"
    pretext = json.loads((tmp_path / "run" / "pretext" / "done.json").read_text())
    assert pretext["num_images"] == 24 + 8                                     # not the unlabeled part
    assert json.loads((tmp_path / "run" / "mine" / "done.json").read_text())["method"] == "multiview"


def test_the_multiview_miner_fingerprint_covers_the_augmentations_it_applies(mined_run, tmp_path):
    """The multi-view miner embeds strong and weak views: changing augment.strong_strength must mine again;
    plain kNN reads no augmentation, so the same change keeps its neighbours."""
    from conftest import copy_run
    prints = {}
    for method in ("knn", "multiview"):
        for strength in ("scan-cpu", "paper"):
            run = copy_run(mined_run, tmp_path / f"{method}-{strength}",
                           [f"mine.method={method}", f"augment.strong_strength={strength}"])
            prints[method, strength] = run.fingerprint("mine")
    assert prints["knn", "scan-cpu"] == prints["knn", "paper"]
    assert prints["multiview", "scan-cpu"] != prints["multiview", "paper"]
