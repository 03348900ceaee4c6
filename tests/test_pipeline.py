import json

import numpy as np
import pytest
import torch

from scan.cli import main
from scan.pipeline import load_config, run_pipeline
from scan.pipeline.stages.selflabel import shrunk_cluster

# Measured with the TINY settings (seed 0, 2 CPU threads): k-means on the pretext features 0.642, cluster
# 0.361, selflabel 0.386 on the 360 held-out images; seeds 1 and 2: k-means 0.542, 0.439, cluster 0.369,
# 0.356, selflabel 0.392, 0.356. Chance is 0.1. Floors keep ~70% of the lowest seed's margin over chance.
TINY_FLOORS = {"kmeans": 0.33, "cluster": 0.27, "selflabel": 0.27}
SELFLABEL_MARGIN = 0.02   # self-labelling refines the cluster model: measured +0.025, +0.023, 0.000


def test_tiny_pipeline_writes_every_artifact_and_skips_finished_stages(trained_run, tmp_path):
    from conftest import copy_run
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for stage, floor in TINY_FLOORS.items():
        assert metrics[stage]["acc"] >= floor, (stage, metrics[stage]["acc"])
    assert metrics["selflabel"]["acc"] >= metrics["cluster"]["acc"] - SELFLABEL_MARGIN, metrics
    assert metrics["num_eval"] == 360
    probs = np.load(trained_run / "probs.npy")
    assert probs.shape == (360, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert np.load(trained_run / "mine" / "neighbors.npy").shape == (1437, 5)
    assert metrics["final_stage"] == "selflabel"
    # no checkpoints or temp files left behind once stages are done
    assert not list(trained_run.rglob("*.tmp")) and not list(trained_run.rglob("checkpoint.pt"))

    # a rerun with the same config skips every training stage: artifacts are not rewritten
    run = copy_run(trained_run, tmp_path, [])          # copied with their modification times
    model_file = run.path("cluster", "model.pt")
    stamp = model_file.stat().st_mtime_ns
    assert run_pipeline(run)["selflabel"] == metrics["selflabel"]
    assert model_file.stat().st_mtime_ns == stamp
    # changing a cluster setting recomputes cluster (and what follows) but not pretext
    backbone = run.path("pretext", "backbone.pt")
    b_stamp = backbone.stat().st_mtime_ns
    run_pipeline(copy_run(trained_run, tmp_path / "w", ["cluster.entropy_weight=4"]))
    changed = tmp_path / "w" / "run"
    assert (changed / "cluster" / "model.pt").stat().st_mtime_ns != stamp
    assert (changed / "pretext" / "backbone.pt").stat().st_mtime_ns == b_stamp


def test_same_seed_gives_identical_predictions_on_cpu(mined_run, trained_run, tmp_path):
    """Two runs of the TINY settings: `trained_run` ran every stage by itself; this one continues
    the separately trained `mined_run` (pretext and mine) with cluster and self-labelling."""
    from conftest import copy_run
    for name in ("features/train.npy", "features/eval.npy", "mine/neighbors.npy"):
        assert np.array_equal(np.load(mined_run / name), np.load(trained_run / name)), name
    run = copy_run(mined_run, tmp_path, [])
    metrics = run_pipeline(run)
    assert np.array_equal(np.load(run.path("predictions.npy")), np.load(trained_run / "predictions.npy"))
    expected = json.loads((trained_run / "metrics.json").read_text())
    for stage in ("cluster", "selflabel"):
        assert metrics[stage] == expected[stage], stage


def test_overclustering_runs_and_is_evaluated(mined_run, tmp_path):
    from conftest import copy_run
    run = copy_run(mined_run, tmp_path, ["data.num_clusters=20", "selflabel.enabled=false"])
    pretext = run.path("pretext", "backbone.pt").stat().st_mtime_ns
    metrics = run_pipeline(run)
    assert run.path("pretext", "backbone.pt").stat().st_mtime_ns == pretext   # the pretext does not read C
    assert metrics["num_clusters"] == 20
    assert np.load(run.path("probs.npy")).shape == (360, 20)
    assert len(metrics["cluster"]["cluster_to_class"]) == 20


def test_cli_run_on_npz_without_labels(tmp_path, tiny_overrides, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(64, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "pile.npz", images=images)
    args = ["run", "--data", str(tmp_path / "pile.npz"), "--num-clusters", "3", "--out", str(tmp_path / "r")]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "without labels" in out.out
    assert "chose defaults from the data" not in out.err   # --quiet silences it
    assert np.load(tmp_path / "r" / "predictions.npy").shape == (64,)


@pytest.mark.parametrize("args, message", [
    (["run", "--data", "/nonexistent/folder"], "/nonexistent/folder does not exist"),
    (["run", "--set", "cluster.entropy_weight=-1"], "cluster.entropy_weight must be >= 0.0, got -1.0"),
    (["run", "--set", "clustr.epochs=3"], "did you mean 'cluster'"),
    (["run", "--set", "data.num_clusters=5000"], "larger than the number of images"),
    (["run", "--device", "cuda:3"], "CUDA is not available"),
])
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, args, message, capsys):
    code = main(args + ["--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _three_kinds(n_each: int = 30, seed: int = 0):
    """Images of three unmistakable kinds (dark, bright, striped), with noise; and their kinds."""
    rng = np.random.default_rng(seed)
    stripes = np.tile(np.array([0, 255] * 6, np.uint8)[None, :, None], (12, 1, 3))
    bases = [np.full((12, 12, 3), 20, np.uint8), np.full((12, 12, 3), 235, np.uint8), stripes]
    kinds = np.repeat(np.arange(3), n_each)
    noise = rng.integers(-15, 16, size=(len(kinds), 12, 12, 3))
    return np.clip(np.stack([bases[k] for k in kinds]) + noise, 0, 255).astype(np.uint8), kinds


def test_npz_without_labels_chooses_the_number_of_clusters(tmp_path, tiny_overrides, capsys):
    """No labels and no --num-clusters: the choose stage picks C (3 kinds), config.yaml says auto, and the
    choice with its curve reaches done.json, metrics.json and the report."""
    images, kinds = _three_kinds()
    np.savez(tmp_path / "pile.npz", images=images)
    args = ["run", "--data", tmp_path / "pile.npz", "--out", tmp_path / "r", "--set", "choose.max_clusters=6"]
    for o in tiny_overrides:
        args += ["--set", o]
    assert main([str(a) for a in args]) == 0
    run_dir = tmp_path / "r"
    choice = json.loads((run_dir / "choose" / "done.json").read_text())
    assert choice["num_clusters"] == 3 and sorted(map(int, choice["curve"])) == [2, 3, 4, 5, 6]
    assert "num_clusters: auto" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_clusters"] == 3 and metrics["num_clusters_choice"]["num_clusters"] == 3
    assert metrics["num_clusters_choice"]["close"] == choice["close"]   # the near misses, if any
    assert len(metrics["merge_tree"]) == 2
    assert np.load(run_dir / "predictions.npy").shape == kinds.shape
    assert "neighbour modularity" in (run_dir / "report.html").read_text()
    # a run chosen by the earlier criterion (modularity x stability curves) still evaluates, with what it has
    old = {k: v for k, v in choice.items() if k not in ("agreement", "chance")}
    (run_dir / "choose" / "done.json").write_text(json.dumps({**old, "modularity": old["curve"],
                                                               "stability": old["curve"]}))
    assert main(["evaluate", "--run-dir", str(run_dir), "--quiet"]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())["num_clusters_choice"]
    assert again["curve"] == choice["curve"] and "agreement" not in again


def test_shrunk_cluster_finds_the_cluster_that_lost_most():
    ref = torch.tensor([10, 10, 10, 0])
    assert shrunk_cluster(torch.tensor([10, 10, 10, 0]), ref, 0.5) is None
    assert shrunk_cluster(torch.tensor([12, 4, 14, 0]), ref, 0.5) == 1
    assert shrunk_cluster(torch.tensor([6, 4, 20, 0]), ref, 0.5) == 1      # the worst one is named
    assert shrunk_cluster(torch.tensor([12, 4, 14, 0]), ref, 0.0) is None   # 0 turns the check off
    assert shrunk_cluster(torch.tensor([10, 6, 14, 0]), ref, 0.5) is None   # 60% kept is allowed


def test_selflabel_that_merges_clusters_stops_and_keeps_the_cluster_model(trained_run, tmp_path):
    from conftest import copy_run
    # keep = 1.0 treats any shrinking cluster as merging, and a large rate makes the first epoch move images
    run = copy_run(trained_run, tmp_path, ["selflabel.min_cluster_keep=1.0", "selflabel.lr=0.01",
                                           "selflabel.epochs=3"])
    metrics = run_pipeline(run)   # pretext, mine and cluster are the shared run's: only self-labelling reruns
    done = json.loads(run.path("selflabel", "done.json").read_text())
    assert len(done["history"]) == 1 and done["history"][0]["stop"]
    assert done["best_epoch"] == 0 and done["merged"]["size"] < done["merged"]["cluster_stage_size"]
    kept = torch.load(run.path("selflabel", "model.pt"))
    cluster = torch.load(run.path("cluster", "model.pt"))
    assert kept.keys() == cluster.keys() and all(torch.equal(kept[k], cluster[k]) for k in kept)
    assert metrics["selflabel"]["acc"] == metrics["cluster"]["acc"]


def test_per_cluster_selection_trains_on_each_clusters_top_fraction(trained_run, tmp_path):
    from conftest import copy_run

    from scan.pipeline.stages.cluster import stage_cluster
    from scan.pipeline.stages.selflabel import stage_selflabel
    # 1,437 training images, 10 clusters: at most ⌈0.05 · 1437 / 10⌉ = 8 labels per cluster, 80 per epoch
    # (the TINY threshold of 0.5 would label most of the images)
    run = copy_run(trained_run, tmp_path, ["selflabel.selection=per_cluster",
                                           "selflabel.per_cluster_fraction=0.05", "selflabel.min_cluster_keep=0"])
    stage_cluster(run)   # done: the shared run's (selflabel settings are not part of the cluster fingerprint)
    done = stage_selflabel(run)
    used = [h["confident_in_batches"] for h in done["history"]]
    assert len(used) == 2 and all(0 < u <= 80 for u in used), used
    # the threshold selection at 0.1 labels every image of the 5 full batches of 256 (max p ≥ 1/10)
    threshold = copy_run(trained_run, tmp_path / "t", ["selflabel.threshold=0.1", "selflabel.min_cluster_keep=0"])
    stage_cluster(threshold)
    assert [h["confident_in_batches"] for h in stage_selflabel(threshold)["history"]] == [1280, 1280]
    # the fraction is part of self-labelling's fingerprint only when the selection reads it
    other = copy_run(trained_run, tmp_path / "f", ["selflabel.selection=per_cluster", "selflabel.min_cluster_keep=0",
                                                   "selflabel.per_cluster_fraction=0.1"])
    assert other.fingerprint("selflabel") != run.fingerprint("selflabel")
    assert copy_run(trained_run, tmp_path / "g", ["selflabel.threshold=0.1", "selflabel.per_cluster_fraction=0.1",
                                                  "selflabel.min_cluster_keep=0"]) \
        .fingerprint("selflabel") == threshold.fingerprint("selflabel")


def test_unknown_selection_is_a_config_error_naming_the_setting():
    from scan.config import ConfigError
    from scan.pipeline import check_choices
    with pytest.raises(ConfigError, match="selflabel.selection"):
        check_choices(load_config("digits", ["selflabel.selection=percluster"]))


def test_summary_line_says_in_sample_for_data_without_a_split():
    from types import SimpleNamespace

    from scan.pipeline import summary_line
    metrics = {"num_eval": 40, "split": "val", "cluster": {"acc": 0.5, "nmi": 0.25, "ari": 0.125}, "checks": {}}
    train = object()
    folder = SimpleNamespace(train=train, eval=train, num_clusters=4, run_dir="runs/x")
    split = SimpleNamespace(train=train, eval=object(), num_clusters=4, run_dir="runs/x")
    assert summary_line(folder, metrics) == ("cluster acc 0.500 nmi 0.250 ari 0.125  (all 40 images (in-sample), "
                                             "4 clusters; every self-check ok; results in runs/x)")
    assert "(40 'val' images, 4 clusters;" in summary_line(split, metrics)


def test_pretext_seed_keeps_one_pretext_while_later_stages_follow_the_run_seed(mined_run, tmp_path):
    """pretext.seed lets downstream stages vary their seed on one trained pretext; settings the
    pretext method does not read (the strong augmentation, for SimCLR) do not retrain it."""
    from conftest import copy_run

    from scan.pipeline import load_config, open_run
    from scan.pipeline.stage import stage_basis
    base = copy_run(mined_run, tmp_path, [])
    pinned = copy_run(mined_run, tmp_path / "a", ["pretext.seed=0", "seed=5"])
    assert pinned.cfg.pretext_seed == 0 and base.cfg.pretext_seed == 0
    assert pinned.fingerprint("pretext") != base.fingerprint("pretext")   # the setting itself is part of it
    reseeded = copy_run(mined_run, tmp_path / "b", ["pretext.seed=0", "seed=7"])
    assert reseeded.fingerprint("pretext") == pinned.fingerprint("pretext")
    for stage in ("mine", "cluster", "selflabel", "refine"):   # they read the run's seed themselves
        assert reseeded.fingerprint(stage) != pinned.fingerprint(stage), stage
    assert "seed" not in stage_basis(pinned, "pretext")["settings"]
    assert stage_basis(pinned, "cluster")["settings"]["seed"] == 5
    # without pretext.seed the run's seed trains the pretext
    assert copy_run(mined_run, tmp_path / "c", ["seed=5"]).fingerprint("pretext") != base.fingerprint("pretext")
    # SimCLR never sees the strong augmentation; a BYOL-queue pretext with the paper's RandAugment views does
    paper = copy_run(mined_run, tmp_path / "d", ["augment.strong_strength=paper"])
    assert paper.fingerprint("pretext") == base.fingerprint("pretext")
    assert paper.fingerprint("selflabel") != base.fingerprint("selflabel")
    byol = ["pretext.method=byol_queue", "pretext.views=randaugment", "quiet=true"]
    prints = {open_run(load_config("digits", byol + extra), tmp_path / f"byol{i}").fingerprint("pretext")
              for i, extra in enumerate(([], ["augment.strong_strength=paper"]))}
    assert len(prints) == 2


def test_pretext_seed_seeds_the_pretext_training(tmp_path, tiny_overrides):
    from scan.pipeline import load_config, open_run
    from scan.pipeline.stages.pretext import stage_pretext
    features = []
    for name, extra in (("a", ["seed=0"]), ("b", ["seed=3", "pretext.seed=0"]), ("c", ["seed=3"])):
        run = open_run(load_config("digits", tiny_overrides + extra + ["pretext.epochs=1"]), tmp_path / name)
        stage_pretext(run)
        features.append(np.load(run.path("features", "train.npy")))
    assert np.array_equal(features[0], features[1]) and not np.allclose(features[0], features[2])
