"""The heads' partition competes with recipes on the same features (cluster.candidates, issue 27): the one with
the highest modularity on the kNN graph wins and the final model follows it."""
import builtins
import json

import numpy as np
import pytest
from conftest import copy_run
from test_fingerprint_coverage import RecordingConfig, covered
from test_pretrained import needs_weights

import scan.pipeline.stages.cluster as cluster
from scan.algo import candidates
from scan.algo.candidates import CANDIDATES, compute_candidates, pick_partition
from scan.algo.metrics import cluster_accuracy
from scan.algo.neighbors import mine_neighbors
from scan.cli import main
from scan.config import ConfigError
from scan.pipeline import load_config
from scan.pipeline.resolve import pretrained_overrides
from scan.pipeline.stage import stage_settings


def _blobs(n: int = 90, groups: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % groups
    centers = rng.normal(size=(groups, 8)) * 10
    return (centers[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels


def test_the_partition_with_the_highest_modularity_wins_and_ties_go_to_the_first():
    features, labels = _blobs()
    neighbors = mine_neighbors(features, 5)
    right = CANDIDATES.get("kmeans")(features, None, 3, 0)
    assert cluster_accuracy(right, labels) == 1.0
    bad = labels.copy()
    bad[: len(bad) // 3] = (bad[: len(bad) // 3] + 1) % 3   # a third of the points planted in the wrong blob
    pick, scores = pick_partition({"ours": bad, "kmeans": right}, neighbors)
    assert pick == "kmeans" and scores["kmeans"] > scores["ours"]
    # the same partition under other numbers scores the same: the first listed keeps it
    assert pick_partition({"ours": (right + 1) % 3, "kmeans": right}, neighbors)[0] == "ours"


def test_the_graph_recipe_is_the_choice_hierarchy_on_the_mined_neighbours():
    """cluster.candidates=[graph]: the mined kNN graph's partition into k from the hierarchy the choice of C
    uses (not a search of its own: it reads the neighbours it is given); None with too few images."""
    from scan.algo.num_clusters import nested_partitions
    features, labels = _blobs()
    neighbors = mine_neighbors(features, 5)
    found = CANDIDATES.get("graph")(None, neighbors, 3, 0)
    assert cluster_accuracy(found, labels) == 1.0
    assert np.array_equal(found, nested_partitions(neighbors, [3], 0, 4)[3])   # the top: 90 images / 20 = 4
    assert CANDIDATES.get("graph")(None, neighbors[:4], 3, 0) is None


@pytest.fixture
def no_umap(monkeypatch):
    """umap-learn made unimportable, as where the `umap` extra is not installed."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "umap" or name.startswith("umap."):
            raise ImportError("No module named 'umap'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", blocked)


def test_without_umap_learn_the_umap_recipe_is_skipped(no_umap):
    features, _ = _blobs()
    partitions, skipped = compute_candidates(("kmeans", "umap_kmeans"), features, None, 3, 0)
    assert list(partitions) == ["kmeans"] and skipped == ["umap_kmeans"]


@pytest.mark.umap
def test_the_umap_recipe_recovers_separated_groups_and_repeats_itself():
    """The one test that embeds with umap-learn (elsewhere the suite makes it unimportable: conftest)."""
    pytest.importorskip("umap")
    import torch
    features, labels = _blobs(n=120, groups=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as OMP_NUM_THREADS=1 asks: numba's OpenMP layer raised it to all cores
    try:
        partitions, skipped = compute_candidates(("umap_kmeans",), features, None, 4, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    found = partitions["umap_kmeans"]
    assert skipped == [] and found.shape == (120,) and cluster_accuracy(found, labels) == 1.0
    assert np.array_equal(CANDIDATES.get("umap_kmeans")(features, None, 4, 0), found)   # seeded: the same again


def test_a_recipe_that_cannot_run_gives_none_and_a_misspelt_one_is_refused_at_load():
    assert CANDIDATES.get("umap_kmeans")(np.zeros((12, 4), np.float32), None, 2, 0) is None   # too few rows to embed
    with pytest.raises(ConfigError, match="cluster.candidates 'kmean' is unknown .did you mean 'kmeans'"):
        load_config("digits", ["cluster.candidates=[kmean]"])


def test_the_frozen_path_lets_both_recipes_compete_and_the_default_lets_none():
    assert pretrained_overrides("efficientnet_lite0")["cluster"]["candidates"] == ["kmeans", "umap_kmeans"]
    cfg = load_config("digits")
    assert cfg.cluster.candidates == ()
    # unset, the fields are outside the cluster fingerprint: runs made before them stay valid
    assert not {"candidates", "candidate_steps"} & set(stage_settings(cfg, "cluster")["cluster"])
    chosen = load_config("digits", ["cluster.candidates=[kmeans]"])
    assert {"candidates", "candidate_steps"} <= set(stage_settings(chosen, "cluster")["cluster"])


PLANTED_WIN = ["cluster.epochs=0", "cluster.candidates=[kmeans]", "cluster.lr=0.01", "cluster.candidate_steps=40",
               "cluster.update_backbone=false", "selflabel.enabled=false"]


@pytest.fixture
def planted_win(mined_run, tmp_path, monkeypatch):
    """A run whose heads train for no epoch (so stay near uniform) beside k-means on the same features, which
    must win on the kNN graph; records what the recipes were asked for and what they returned."""
    run = copy_run(mined_run, tmp_path, PLANTED_WIN)
    calls = []

    def spy(names, features, neighbors, k, seed):
        calls.append({"names": tuple(names), "rows": len(features), "k": k, "seed": seed,
                      "out": compute_candidates(names, features, neighbors, k, seed)})
        return calls[-1]["out"]
    real_pick = cluster.pick_partition

    def pick_spy(partitions, neighbors):
        calls[-1]["ours"] = partitions["ours"]
        return real_pick(partitions, neighbors)
    monkeypatch.setattr(cluster, "compute_candidates", spy)
    monkeypatch.setattr(cluster, "pick_partition", pick_spy)
    return run, calls


def test_the_winning_recipe_reaches_the_final_model(planted_win):
    from scan.pipeline import run_pipeline
    from scan.pipeline.run import head_probs, load_stage_model
    run, calls = planted_win
    metrics = run_pipeline(run)
    # cluster.candidates reached the recipes, with the training features, C and the seed
    assert [{k: v for k, v in c.items() if k not in ("out", "ours")} for c in calls] == [
        {"names": ("kmeans",), "rows": len(run.train), "k": 10, "seed": 0}]
    recipe = calls[0]["out"][0]["kmeans"]
    record = json.loads(run.path("cluster", "done.json").read_text())["candidates"]
    assert record["pick"] == "kmeans" and record["modularity"]["kmeans"] > record["modularity"]["ours"]
    assert metrics["final_stage"] == "cluster" and metrics["candidates"]["pick"] == "kmeans"
    # the kept model moved to the recipe's partition (on images, through strong views, in 40 steps: part of the way)
    model = load_stage_model(run, "cluster")
    follows = cluster_accuracy(head_probs(run, model, "train")[0].argmax(1).numpy(), recipe)
    assert follows == pytest.approx(record["fit_agreement"], abs=1e-4)
    assert follows > 0.5 > cluster_accuracy(calls[0]["ours"], recipe)


def test_candidate_steps_reaches_the_fit(planted_win, monkeypatch):
    run, _ = planted_win
    steps = []
    real = cluster.optimizer_step

    def counting(optimizer, loss, stage, epoch):
        steps.append(stage)
        return real(optimizer, loss, stage, epoch)
    monkeypatch.setattr(cluster, "optimizer_step", counting)
    cluster.stage_cluster(run)
    assert len(steps) == 40   # cluster.epochs=0: every step is the fit's


def test_a_fit_stopped_midway_resumes_from_its_last_pass_to_the_same_model(planted_win, mined_run, tmp_path,
                                                                           monkeypatch):
    """The fit is a training like the others (the stages' epoch loop): a stop after some of its passes resumes
    from its checkpoint under cluster/fit/ and ends where an uninterrupted fit ends; the checkpoint goes."""
    import torch
    run, _ = planted_win
    whole = tmp_path / "whole"
    whole.mkdir()
    reference = copy_run(mined_run, whole, PLANTED_WIN)
    cluster.stage_cluster(reference)
    per_pass = len(run.train) // run.cfg.cluster.batch_size
    assert 40 % per_pass and 40 // per_pass >= 2     # the last pass is a part one, and a stop can fall between
    real, steps = cluster.optimizer_step, []

    def stopping(optimizer, loss, stage, epoch):
        if len(steps) == per_pass + 1:                # the second step of the second pass: the first is checkpointed
            raise RuntimeError("stopped")
        steps.append(epoch)
        return real(optimizer, loss, stage, epoch)
    monkeypatch.setattr(cluster, "optimizer_step", stopping)
    with pytest.raises(RuntimeError, match="stopped"):
        cluster.stage_cluster(run)
    assert steps == [0] * per_pass + [1] and run.path("cluster", "fit", "checkpoint.pt").is_file()
    resumed = []
    monkeypatch.setattr(cluster, "optimizer_step", lambda *a: resumed.append(a[3]) or real(*a))
    cluster.stage_cluster(run)
    assert resumed == list(np.repeat(np.arange(40 // per_pass + 1), per_pass)[per_pass:40])   # from the second pass
    ours, theirs = (torch.load(r.path("cluster", "model.pt"), weights_only=True) for r in (run, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    done = json.loads(run.path("cluster", "done.json").read_text())["candidates"]
    assert done["fit_loss"]["passes"] == -(-40 // per_pass) and not run.path("cluster", "fit", "checkpoint.pt").exists()


def test_the_choice_reads_only_what_the_cluster_fingerprint_covers(mined_run, tmp_path):
    run = copy_run(mined_run, tmp_path, ["cluster.epochs=1", "cluster.candidates=[kmeans]",
                                         "cluster.candidate_steps=5", "cluster.update_backbone=false"])
    recording = RecordingConfig(run.cfg)
    run.cfg = recording
    cluster.stage_cluster(run)
    assert recording.sections_read() - covered("cluster", recording._cfg) == set()
    assert "candidates" in json.loads(run.path("cluster", "done.json").read_text())


def test_the_umap_recipe_is_part_of_the_fingerprint_inputs(monkeypatch, mined_run, tmp_path):
    run = copy_run(mined_run, tmp_path, ["cluster.candidates=[kmeans, umap_kmeans]"])
    monkeypatch.setattr(candidates.importlib.util, "find_spec", lambda name: None)
    without = run.fingerprint("cluster")
    monkeypatch.setattr(candidates.importlib.util, "find_spec", lambda name: object())
    assert run.fingerprint("cluster") != without   # installing umap-learn recomputes the choice


@needs_weights
def test_on_frozen_features_the_run_follows_kmeans_when_it_wins_even_without_umap(tmp_path, no_umap):
    """Heads that train for no epoch lose to k-means on EfficientNet features of three colours; umap-learn is
    made unimportable, so k-means alone competes, and the final predictions are k-means' (ACC 1.0)."""
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    images = (rng.integers(0, 60, size=(30, 12, 12, 3)) + np.eye(3)[labels][:, None, None] * 190).astype(np.uint8)
    np.savez(tmp_path / "pile.npz", images=images, labels=labels)
    out = tmp_path / "r"
    assert main(["run", "--data", str(tmp_path / "pile.npz"), "--pretrained", "efficientnet_lite0", "--out", str(out),
                 "--quiet", "--set", "cluster.epochs=0", "--set", "selflabel.epochs=2"]) == 0
    record = json.loads((out / "cluster" / "done.json").read_text())["candidates"]
    assert record["pick"] == "kmeans" and record["skipped"] == ["umap_kmeans"]
    assert set(record["modularity"]) == {"ours", "kmeans"} and record["fit_agreement"] == 1.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["candidates"]["pick"] == "kmeans"
    assert cluster_accuracy(np.load(out / "predictions.npy"), labels) == 1.0
