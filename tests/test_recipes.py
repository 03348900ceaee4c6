"""The published recipes (issue 14): each paper config resolves to the published value of every
setting in the table below (so a drift fails here), the CPU configs keep ours, and each new
setting reaches the code it configures:

1. mine.features=projection mines on the pretext's L2-normalised projection output;
2. augment.strong_strength=paper builds the authors' op ranges, no shift first, a random-side Cutout
   filled with the mean colour;
3. data.pretext_split trains the pretext on that split set (its fingerprint covers those images);
4. cluster.head_choice=per_epoch keeps the (epoch, head) with the lowest held-out SCAN loss;
5. selflabel.ema_mode=write_back copies the average into the trained weights after every step.
"""
import json

import kornia.geometry.transform as KT
import numpy as np
import pytest
import torch
from conftest import copy_run
from fakes import write_stl10
from torch import nn

from scan.algo.losses import scan_loss_over_pairs
from scan.algo.neighbors import mine_neighbors
from scan.nets.augment import STRENGTHS, build_augment, cutout, rand_ops
from scan.nets.averaging import EMA
from scan.pipeline import load_config, open_run
from scan.pipeline.run import head_probs, load_stage_model
from scan.pipeline.stages.cluster import heldout_neighbors, stage_cluster
from scan.pipeline.stages.mine import stage_mine
from scan.pipeline.stages.pretext import stage_pretext
from scan.pipeline.stages.selflabel import stage_selflabel
from scan.train.best_weights import BestWeights
from scan.train.engine import minibatches

# ---------------------------------------------------------------- the published table

SCAN_SMALL = {   # CIFAR-10, CIFAR-100-20, STL-10: SimCLR ResNet-18, SCAN, self-labelling (the paper, Sec. 4.1)
    "pretext.method": "simclr", "pretext.epochs": 500, "pretext.batch_size": 512, "pretext.optimizer": "sgd",
    "pretext.lr": 0.4, "pretext.temperature": 0.1, "model.projection_dim": 128,
    "mine.num_neighbors": 20, "mine.features": "projection",                                    # item 1
    "augment.strong_num_ops": 4, "augment.strong_strength": "paper",                            # item 2
    "cluster.epochs": 100, "cluster.batch_size": 128, "cluster.optimizer": "adam", "cluster.lr": 1e-4,
    "cluster.weight_decay": 1e-4, "cluster.entropy_weight": 5.0, "cluster.num_heads": 10,
    "cluster.augment": "strong", "cluster.update_backbone": True,
    "cluster.head_choice": "per_epoch", "cluster.heldout_neighbors": 5,                         # item 4
    "selflabel.epochs": 200, "selflabel.batch_size": 1000, "selflabel.optimizer": "adam", "selflabel.lr": 1e-4,
    "selflabel.threshold": 0.99, "selflabel.class_balance": True, "selflabel.ema_decay": 0.0,
    "selflabel.ema_mode": "separate",                                                           # item 5
    "data.pretext_split": None,                                                                 # item 3
    "selflabel.keep": "last", "selflabel.min_cluster_keep": 0.0,                                # item 6
}
IMAGENET = {     # ImageNet-50/100/200: frozen MoCo ResNet-50, heads only, then self-labelling with an EMA
    "model.backbone": "resnet50", "pretext.method": "moco", "pretext.epochs": 0, "data.image_size": 224,
    "mine.num_neighbors": 50, "mine.features": "backbone",                                      # item 1
    "augment.strong_strength": "paper", "augment.cutout_fraction": 0.335,                       # item 2
    "cluster.epochs": 100, "cluster.batch_size": 512, "cluster.optimizer": "sgd", "cluster.lr": 5.0,
    "cluster.momentum": 0.9, "cluster.weight_decay": 0.0, "cluster.entropy_weight": 5.0, "cluster.num_heads": 10,
    "cluster.update_backbone": False, "cluster.head_choice": "per_epoch", "cluster.heldout_neighbors": 5,  # item 4
    "selflabel.epochs": 25, "selflabel.batch_size": 512, "selflabel.optimizer": "sgd", "selflabel.lr": 0.03,
    "selflabel.threshold": 0.99, "selflabel.class_balance": False, "selflabel.ema_decay": 0.999,
    "selflabel.ema_mode": "write_back",                                                         # item 5
    "data.pretext_split": None,
    "selflabel.keep": "last", "selflabel.min_cluster_keep": 0.0,                                # item 6
}
PUBLISHED = {
    "cifar10": {**SCAN_SMALL, "model.backbone": "resnet18_cifar", "augment.cutout_fraction": 0.5},      # 16 of 32 px
    "cifar100-20": {**SCAN_SMALL, "model.backbone": "resnet18_cifar", "augment.cutout_fraction": 0.5},
    "stl10": {**SCAN_SMALL, "model.backbone": "resnet18", "augment.cutout_fraction": 0.333,             # 32 of 96 px
              "data.pretext_split": "train+unlabeled"},                                             # item 3
    "imagenet50": IMAGENET,
    # the paper's cluster batch is 512 / 1024 / 1024 for ImageNet-50 / 100 / 200
    "imagenet100": {**IMAGENET, "cluster.batch_size": 1024}, "imagenet200": {**IMAGENET, "cluster.batch_size": 1024},
    # full ImageNet: batch 4096, lr 30, K = 20, reported after the clustering step (heads only)
    "imagenet1k": {**IMAGENET, "cluster.batch_size": 4096, "cluster.lr": 30.0, "mine.num_neighbors": 20,
                   "selflabel.enabled": False, "data.dataset": "imagenet"},
}
OURS = {         # the CPU configs keep our settings for items 1-6
    "mine.features": "backbone", "augment.strong_strength": "scan-cpu", "data.pretext_split": None,
    "cluster.head_choice": "final", "selflabel.ema_mode": "separate",
    "selflabel.keep": "most_confident", "selflabel.min_cluster_keep": 0.5,
}


def resolved(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_paper_config_resolves_to_the_published_values(name):
    cfg = load_config(name)
    wrong = {k: (resolved(cfg, k), v) for k, v in PUBLISHED[name].items() if resolved(cfg, k) != v}
    assert not wrong, f"{name}: (resolved, published) differ: {wrong}"


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_cpu_configs_keep_our_settings(name):
    cfg = load_config(name)
    assert {k: resolved(cfg, k) for k in OURS} == OURS


# ---------------------------------------------------------------- 2. strong augmentation strength

def test_paper_strong_augmentation_has_the_published_ranges():
    paper = build_augment("strong", load_config("cifar10").augment, 32, 3)
    ours = build_augment("strong", load_config("digits").augment, 8, 1)
    assert (paper.strength.shear, paper.strength.translate) == (0.1, 0.1)
    assert (ours.strength.shear, ours.strength.translate) == (0.3, 0.3)
    assert paper.weak.max_shift == 0 and ours.weak.max_shift == 0.125 * 8   # the authors shift nothing first
    assert paper.cutout_fraction == 0.5

    x = torch.rand(6, 3, 32, 32)
    full = torch.ones(6)
    ops = rand_ops(paper.strength)
    # shear at full magnitude is ±0.1 (the sign is random per image)
    sheared = ops["shear_x"](x, full)
    for i in range(6):
        candidates = [KT.shear(x[i:i + 1], torch.tensor([[s, 0.0]])) for s in (0.1, -0.1)]
        assert any(torch.allclose(sheared[i:i + 1], c, atol=1e-6) for c in candidates)
    # translate at full magnitude moves by 0.1 of the side: 3.2 px
    moved = ops["translate_y"](x, full)
    assert any(torch.allclose(moved[:1], KT.translate(x[:1], torch.tensor([[0.0, s]])), atol=1e-6)
               for s in (3.2, -3.2))
    # enhance factors stop at 0.95: full-magnitude brightness is 0.95 x, never brighter
    assert torch.allclose(ops["brightness"](x, full), 0.95 * x)
    assert torch.allclose(ops["brightness"](x, torch.zeros(6)), 0.05 * x)
    brighter = rand_ops(STRENGTHS.get("scan-cpu"))["brightness"](x, full)
    assert any(torch.allclose(brighter[i], (1.95 * x[i]).clamp(0, 1)) for i in range(6))


def test_paper_cutout_has_a_random_side_up_to_the_configured_one_and_the_mean_colour():
    torch.manual_seed(0)
    x = torch.cat([torch.ones(100, 1, 32, 32), torch.zeros(100, 1, 32, 32)])   # batch mean 0.5
    fixed = cutout(x, 0.5)
    paper = cutout(x, 0.5, random_side=True, fill="mean")
    holes_fixed = (fixed[:100] == 0).sum(dim=(1, 2, 3))
    holes_paper = (paper[:100] == 0.5).sum(dim=(1, 2, 3))
    assert set(torch.unique(paper).tolist()) == {0.0, 0.5, 1.0}     # the hole is the batch's mean colour
    assert holes_fixed.max() == 16 * 16 and holes_paper.max() <= 16 * 16
    # a centre away from the border shows the whole square: always 256 px for ours, any side 1..16 for the paper
    assert len(torch.unique(holes_paper)) > 8
    assert float(holes_paper.float().mean()) < 0.6 * float(holes_fixed.float().mean())


# ---------------------------------------------------------------- shared tiny digits run



# ---------------------------------------------------------------- 1. mining on the projection

def test_projection_mining_uses_the_normalised_projection_output(mined_run, tmp_path):
    run = copy_run(mined_run, tmp_path, ["mine.features=projection"])
    projection = np.load(run.path("features", "train_projection.npy"))
    assert projection.shape == (len(run.train), run.cfg.model.projection_dim)
    assert np.allclose(np.linalg.norm(projection, axis=1), 1.0, atol=1e-5)
    assert np.load(run.path("features", "eval_projection.npy")).shape == (len(run.eval), 128)
    stage_mine(run)
    neighbors = np.load(run.path("mine", "neighbors.npy"))
    assert np.array_equal(neighbors, mine_neighbors(projection, 5))
    backbone = mine_neighbors(np.load(run.path("features", "train.npy")), 5)
    assert not np.array_equal(neighbors, backbone), "the two spaces must differ for the test to discriminate"


# ---------------------------------------------------------------- 4. per-epoch head choice

def test_lowest_loss_keeps_the_epoch_and_head_with_the_lowest_held_out_loss():
    model = nn.Linear(2, 2)
    lowest = BestWeights()
    weights = {}
    for epoch, losses in enumerate(([3.0, 2.0], [1.5, 2.5], [1.8, 1.7]), start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)            # each epoch's weights are recognisable
        weights[epoch] = model.weight.detach().clone()
        losses = torch.tensor(losses)   # as the cluster stage offers an epoch: its lowest head's loss
        lowest.offer(model, float(losses.min()), epoch, detail=int(losses.argmin()))
    # the last epoch's best head (1.7) is not the lowest; epoch 2's head 0 (1.5) is
    assert (lowest.epoch, lowest.detail, lowest.score) == (2, 0, 1.5)
    assert torch.equal(lowest.state["weight"], weights[2])
    restored = BestWeights()
    restored.load_state_dict(lowest.state_dict())
    assert (restored.epoch, restored.detail, restored.score) == (2, 0, 1.5)


def test_per_epoch_head_choice_saves_the_lowest_held_out_loss_of_all_epochs(mined_run, tmp_path):
    run = copy_run(mined_run, tmp_path, ["cluster.head_choice=per_epoch", "cluster.epochs=4",
                                          "cluster.heldout_neighbors=4"])
    record = stage_cluster(run)
    table = np.array([h["heldout_losses"] for h in record["history"]])      # (epochs, heads)
    assert table.shape == (4, 3)
    epoch, head = np.unravel_index(table.argmin(), table.shape)
    assert record["kept"]["epoch"] == epoch + 1 and record["kept"]["head"] == head == record["best_head"]
    assert json.loads(run.path("cluster", "done.json").read_text())["kept"] == record["kept"]
    # the saved model's own held-out loss is that minimum
    model = load_stage_model(run, "cluster")
    heldout = heldout_neighbors(run)
    assert heldout.shape == (len(run.eval), 4)
    loss = scan_loss_over_pairs(head_probs(run, model, "eval", dtype=torch.float16), heldout,
                                run.cfg.cluster.entropy_weight)[0]
    assert loss.item() == pytest.approx(table.min(), abs=1e-5)


def test_per_epoch_head_choice_keeps_an_earlier_epoch_when_its_held_out_loss_was_lowest(mined_run, tmp_path,
                                                                                         monkeypatch):
    """Held-out losses scripted per epoch (3 heads): epoch 2's head 0 is the lowest, the last epoch's
    best head is another one, and the training-split choice would be yet another epoch's weights."""
    import scan.pipeline.stages.cluster as cluster
    script = iter([[3.0, 2.0, 4.0], [1.5, 2.5, 3.0], [1.8, 1.7, 1.9]])
    weights, real_probs, real_loss = [], cluster.head_probs, cluster.scan_loss_over_pairs

    def probs(run, model, split, dtype=torch.float32):
        if split == "eval":   # after an epoch: remember that epoch's weights
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_probs(run, model, split, dtype)

    def loss(probs, neighbors, entropy_weight, prior=None):
        if len(neighbors) == len(run.eval) and neighbors.shape[1] == 4:
            return (torch.tensor(next(script)),) * 3
        return real_loss(probs, neighbors, entropy_weight, prior=prior)
    monkeypatch.setattr(cluster, "head_probs", probs)
    monkeypatch.setattr(cluster, "scan_loss_over_pairs", loss)
    run = copy_run(mined_run, tmp_path, ["cluster.head_choice=per_epoch", "cluster.epochs=3",
                                          "cluster.heldout_neighbors=4"])
    record = cluster.stage_cluster(run)
    assert record["kept"] == {"epoch": 2, "head": 0, "heldout_loss": 1.5} and record["best_head"] == 0
    saved = torch.load(run.path("cluster", "model.pt"), map_location="cpu")
    epoch2 = weights[1]
    assert torch.equal(saved["heads.0.weight"], epoch2["heads.0.weight"])
    assert not torch.equal(saved["heads.0.weight"], weights[2]["heads.0.weight"])
    backbone = [k for k in saved if k.startswith("backbone.") and saved[k].is_floating_point()]
    assert backbone and all(torch.equal(saved[k], epoch2[k]) for k in backbone)


def test_per_epoch_head_choice_resumes_with_its_lowest_loss(mined_run, tmp_path, monkeypatch):
    """An interrupted cluster stage resumes with the remembered (epoch, head, weights) from its checkpoint:
    epoch 1 is scripted to be the lowest, so a resume that forgot it would keep epoch 3."""
    import scan.pipeline.stages.cluster as cluster
    real_loss, script = cluster.scan_loss_over_pairs, []

    def loss(probs, neighbors, entropy_weight, prior=None):
        if neighbors.shape[1] == 4:   # the held-out pairs
            return (torch.tensor(script.pop(0)),) * 3
        return real_loss(probs, neighbors, entropy_weight, prior=prior)
    monkeypatch.setattr(cluster, "scan_loss_over_pairs", loss)
    overrides = ["cluster.head_choice=per_epoch", "cluster.epochs=3", "cluster.heldout_neighbors=4"]
    script[:] = [[1.0, 5.0, 5.0], [2.0, 5.0, 5.0], [3.0, 5.0, 5.0]]
    whole = stage_cluster(copy_run(mined_run, tmp_path / "whole", overrides))
    assert whole["kept"]["epoch"] == 1

    offer, calls = BestWeights.offer, []

    def interrupted(self, model, score, epoch, detail=None):
        calls.append(epoch)
        if epoch == 3 and calls.count(3) == 1:
            raise KeyboardInterrupt   # as SIGTERM: epochs 1-2 are checkpointed, epoch 3 is not
        return offer(self, model, score, epoch, detail)
    monkeypatch.setattr(BestWeights, "offer", interrupted)
    script[:] = [[1.0, 5.0, 5.0], [2.0, 5.0, 5.0], [3.0, 5.0, 5.0], [3.0, 5.0, 5.0]]
    run = copy_run(mined_run, tmp_path / "cut", overrides)
    with pytest.raises(KeyboardInterrupt):
        stage_cluster(run)
    resumed = stage_cluster(run)
    assert calls == [1, 2, 3, 3] and not script
    assert resumed["kept"] == whole["kept"]
    a = torch.load(tmp_path / "whole" / "run" / "cluster" / "model.pt", map_location="cpu")
    b = torch.load(run.path("cluster", "model.pt"), map_location="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 5. EMA written back

def test_write_back_replaces_the_trained_weights_by_the_average():
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    ema = EMA(model, 0.75)
    with torch.no_grad():
        model.weight.add_(4.0)                 # a training step
    ema.update(model)
    ema.write_back(model)
    assert torch.allclose(model.weight, before + 0.25 * 4.0)
    assert torch.allclose(ema.model.weight, model.weight)


@pytest.mark.parametrize("mode, writes", [("separate", False), ("write_back", True)])
def test_selflabel_writes_the_average_back_every_step(mined_run, tmp_path, monkeypatch, mode, writes):
    run = copy_run(mined_run, tmp_path, ["selflabel.threshold=0.05", "selflabel.epochs=1",
                                          "selflabel.min_cluster_keep=0", "selflabel.ema_decay=0.5",
                                          f"selflabel.ema_mode={mode}"])
    stage_cluster(run)
    calls = []
    write_back = EMA.write_back

    def spy(self, model):
        write_back(self, model)
        calls.append(all(torch.equal(a, b) for a, b in zip(self.model.parameters(), model.parameters())))
    monkeypatch.setattr(EMA, "write_back", spy)
    stage_selflabel(run)
    steps = len(minibatches(len(run.train), run.cfg.selflabel.batch_size))
    assert calls == ([True] * steps if writes else [])


# ---------------------------------------------------------------- 3. pretext on another split set

def test_pretext_split_trains_the_pretext_on_the_union_and_clusters_the_train_split(tmp_path):
    root = write_stl10(tmp_path / "data", n_train=12, n_test=6, n_unlabeled=9)
    small = ["model.backbone=resnet_small", "model.width=8", "model.stem_stride=4", "pretext.epochs=1",
             "pretext.batch_size=8", "mine.num_neighbors=3", "quiet=true", f"data.path={root}"]
    run = open_run(load_config("stl10", small), tmp_path / "run")
    assert run.cfg.data.pretext_split == "train+unlabeled"
    assert len(run.pretext_data) == 21 and len(run.train) == 12
    record = stage_pretext(run)
    assert (record["num_images"], record["split"]) == (21, "train+unlabeled")
    assert np.load(run.path("features", "train.npy")).shape[0] == 12      # mining sees the train split
    # the fingerprint covers the pretext images: other unlabeled images or no pretext split change it
    plain = open_run(load_config("stl10", small + ["data.pretext_split=null"]), tmp_path / "plain")
    other_root = write_stl10(tmp_path / "other", n_train=12, n_test=6, n_unlabeled=9, seed=0)
    (other_root / "stl10_binary" / "unlabeled_X.bin").write_bytes(bytes(9 * 3 * 96 * 96))
    other = open_run(load_config("stl10", small + [f"data.path={other_root}"]), tmp_path / "other_run")
    prints = {run.fingerprint("pretext"), plain.fingerprint("pretext"), other.fingerprint("pretext")}
    assert len(prints) == 3
    assert len(plain.pretext_data) == 12


def test_stl10_reads_any_plus_joined_split_set_in_order(tmp_path):
    from scan.data import DataError, load_dataset
    root = write_stl10(tmp_path / "data", n_train=3, n_test=2, n_unlabeled=4)
    train, test, unlabeled = (load_dataset("stl10", str(root), split=s) for s in ("train", "test", "unlabeled"))
    joined = load_dataset("stl10", str(root), split="unlabeled+test")
    assert torch.equal(joined.images, torch.cat([unlabeled.images, test.images])) and joined.labels is None
    labelled = load_dataset("stl10", str(root), split="test+train")
    assert labelled.labels.tolist() == test.labels.tolist() + train.labels.tolist()
    assert len(load_dataset("stl10", str(root), split="all+train+unlabeled")) == 3 + 2 + 4   # each part once
    with pytest.raises(DataError, match="STL-10 has no split 'extra'"):
        load_dataset("stl10", str(root), split="train+extra")


# ---------------------------------------------------------------- 6. which self-labelling epoch is kept

@pytest.mark.parametrize("keep", ["last", "most_confident"])
def test_selflabel_keeps_the_last_epoch_or_the_most_confident_one(mined_run, tmp_path, keep):
    run = copy_run(mined_run, tmp_path, ["selflabel.epochs=3", "selflabel.threshold=0.2", f"selflabel.keep={keep}",
                                          "selflabel.min_cluster_keep=0"])
    stage_cluster(run)
    record = stage_selflabel(run)
    counts = record["confident"][1:]   # after each epoch
    assert int(np.argmax(counts)) != 2, "the last epoch must not be the most confident for the test to discriminate"
    assert len(counts) == 3
    expected = 3 if keep == "last" else 1 + int(np.argmax(counts))
    assert record["best_epoch"] == expected
    assert ("best_confident" in record) == (keep == "most_confident")
