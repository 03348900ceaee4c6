"""Defaults from the data, self-checks that cannot be silent, and the raw-pixel baseline."""
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import copy_run

import scan.pipeline as pipeline
from scan.algo.checks import baseline_check, cluster_check, pretext_check, selflabel_check, size_balance
from scan.algo.losses import scan_loss, scan_loss_over_pairs
from scan.algo.neighbors import combine_features, mine_neighbors, neighbor_agreement, pixel_features
from scan.cli import main
from scan.data import ImageDataset
from scan.pipeline import load_config, open_run, run_pipeline
from scan.pipeline.defaults import auto_defaults, estimate_seconds, stem_stride
from scan.pipeline.stages import cluster as cluster_stage
from scan.report import write_run_report
from scan.use.inference import finished_run

# ---------------------------------------------------------------- pure checks, values by hand

def test_pretext_check_fails_when_the_loss_barely_falls():
    assert pretext_check([{"loss": 5.0}, {"loss": 4.9}])["status"] == "failed"     # 2% < 5%
    ok = pretext_check([{"loss": 5.0}, {"loss": 3.0}])
    assert ok["status"] == "ok" and ok["drop"] == pytest.approx(0.4)


def test_pretext_check_measures_the_fall_from_the_peak_not_from_a_filling_queue():
    # BYOL-queue on digits: epoch 1 scores against a queue still filling (5.04), then log(queue) ~ 7.2
    queue = pretext_check([{"loss": 5.04}, {"loss": 7.2}, {"loss": 6.0}, {"loss": 5.7}])
    assert queue["status"] == "ok" and queue["drop"] == pytest.approx(1 - 5.7 / 7.2)
    stuck = pretext_check([{"loss": 5.04}, {"loss": 7.27}, {"loss": 7.26}, {"loss": 7.25}])
    assert stuck["status"] == "failed" and stuck["peak_loss"] == 7.27     # 0.3% below the peak


def test_cluster_check_flags_the_uniform_prediction():
    c = 10
    assert cluster_check(math.log(c) * 0.95, 0.12, c)["status"] == "failed"
    assert cluster_check(math.log(c) * 0.5, 0.8, c)["status"] == "ok"


def test_selflabel_check_says_when_nothing_was_confident():
    assert selflabel_check(0, None, 0.99)["status"] == "warning"
    merged = {"cluster": 2, "size": 5, "cluster_stage_size": 100}
    assert "shrank from 100 to 5" in selflabel_check(7, merged, 0.99)["message"]
    assert selflabel_check(7, None, 0.99)["status"] == "ok"


def test_size_balance_and_neighbor_agreement_by_hand():
    assert size_balance(np.array([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert size_balance(np.array([1, 1, 1, 1]), 4) == pytest.approx(0.0)
    assignments = np.array([0, 0, 1, 1])
    neighbors = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])   # agreeing pairs: (0,1) (1,0) (2,3) (3,2)
    assert neighbor_agreement(assignments, neighbors) == pytest.approx(4 / 8)
    assert baseline_check({"neighbor_agreement": 0.5}, {"neighbor_agreement": 0.6})["status"] == "warning"
    assert baseline_check({"neighbor_agreement": 0.7}, {"neighbor_agreement": 0.6})["status"] == "ok"


def test_scan_loss_over_pairs_matches_the_batch_loss_and_is_chunked():
    torch.manual_seed(0)
    heads, n, k, c = 3, 40, 4, 5
    logits = torch.randn(heads, n, c)
    neighbors = torch.randint(n, (n, k))
    total, consistency, h = scan_loss_over_pairs(logits.softmax(-1), neighbors, 2.0, chunk_elements=7 * heads * k * c)
    # the same loss with every (anchor, neighbour) pair laid out as a batch; entropy over the anchors
    anchors = logits.repeat_interleave(k, dim=1)
    _, ref_consistency, _ = scan_loss(anchors, logits[:, neighbors.reshape(-1)], 2.0)
    assert torch.allclose(consistency, ref_consistency, atol=1e-5)
    p_mean = logits.softmax(-1).mean(1)
    assert torch.allclose(h, -(p_mean * p_mean.log()).sum(-1), atol=1e-6)
    assert torch.allclose(total, consistency - 2.0 * h)


# ---------------------------------------------------------------- defaults from the data

def _images(n, side, channels=1):
    return ImageDataset(torch.zeros(n, channels, side, side, dtype=torch.uint8), None, None)


def test_auto_defaults_scale_budgets_in_images_seen():
    cfg = load_config(None, {"device": "cpu"})
    small = auto_defaults(cfg, _images(5000, 28))
    assert small["model"]["stem_stride"] == 2 and small["mine"]["features"] == "backbone+pixels"
    assert small["pretext"]["epochs"] == 40          # 40 images seen per image: 200k
    assert small["cluster"]["epochs"] == 11 and small["cluster"]["lr"] == 3e-3    # 54k anchors seen
    assert small["selflabel"]["epochs"] == 6         # 6 x 5k = 30k images
    big = auto_defaults(cfg, _images(100_000, 28))
    assert big["pretext"]["epochs"] == 6             # the 600k ceiling: time stays flat past 15k images
    tiny = auto_defaults(cfg, _images(1000, 8))
    assert tiny["pretext"]["epochs"] == 150 and tiny["model"]["stem_stride"] == 1   # the 150k floor
    assert [stem_stride(s) for s in (8, 28, 32, 64, 224)] == [1, 2, 2, 4, 4]


def test_estimate_counts_images_through_the_backbone():
    cfg = load_config(None, {"pretext": {"epochs": 10}, "cluster": {"epochs": 5, "update_backbone": False},
                             "selflabel": {"epochs": 2}})
    est = estimate_seconds(cfg, 300, 0, rate=100.0)
    assert est["pretext"] == pytest.approx(1.5 * (2 * 300 * 10 + 300 / 3) / 100)
    assert est["cluster"] == pytest.approx(1.5 * (2 * 300 * 5 / 3 + 300 / 3) / 100)
    assert est["selflabel"] == pytest.approx(1.5 * (300 * 2 * (1 + 2 / 3)) / 100)
    cfg = load_config(None, {"pretext": {"epochs": 10}, "cluster": {"epochs": 5, "update_backbone": False,
                                                                     "restarts": 3}, "selflabel": {"epochs": 2}})
    restarted = estimate_seconds(cfg, 300, 0, rate=100.0)
    assert restarted["cluster"] == pytest.approx(3 * est["cluster"]) and restarted["pretext"] == est["pretext"]


def test_the_frozen_path_estimate_counts_the_heads_and_the_umap_candidate(monkeypatch):
    import scan.pipeline.defaults as defaults
    cfg = load_config("pretrained")
    assert "umap_kmeans" in cfg.cluster.candidates
    monkeypatch.setattr(defaults, "umap_available", lambda: True)
    est = estimate_seconds(cfg, 10_000, 0, rate=100.0)
    assert est["pretext"] == pytest.approx(1.5 * 10_000 / 100)
    assert est["cluster"] == pytest.approx(17 + 10 + 22)   # heads, numba's compile, the embedding (measured)
    monkeypatch.setattr(defaults, "umap_available", lambda: False)   # without the `umap` extra: the heads alone
    assert estimate_seconds(cfg, 10_000, 0, rate=100.0)["cluster"] == pytest.approx(17)


def test_cli_prints_the_chosen_defaults_and_a_time_estimate(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, size=(40, 10, 10), dtype=np.uint8)
    np.savez(tmp_path / "pile.npz", images=images)
    args = ["run", "--data", str(tmp_path / "pile.npz"), "--num-clusters", "2", "--out", str(tmp_path / "r"),
            "--set", "pretext.epochs=1", "--set", "cluster.epochs=1", "--set", "selflabel.enabled=false",
            "--set", "mine.num_neighbors=3", "--set", "model.width=4"]
    assert main(args) == 0
    err = capsys.readouterr().err
    chose = next(line for line in err.splitlines() if "chose defaults from the data" in line)
    assert "mine.features=backbone+pixels" in chose and "pretext.batch_size=40" in chose
    # what the user set is not listed as chosen (it is what runs)
    assert "pretext.epochs" not in chose and "cluster.epochs" not in chose and "model.width" not in chose
    assert "estimated time: pretext" in err and "images/s through the backbone" in err


# ---------------------------------------------------------------- settings reach the code

def test_mine_features_setting_reaches_the_miner(tmp_path, tiny_overrides):
    cfg = load_config("digits", tiny_overrides + ["mine.features=pixels"])
    run = open_run(cfg, tmp_path / "run")
    run_pipeline(run, ("pretext", "mine"))
    expected = mine_neighbors(pixel_features(run.train.images, seed=0), 5)
    assert np.array_equal(np.load(run.path("mine", "neighbors.npy")), expected)
    both = combine_features(np.ones((3, 2)) * [[1, 0], [0, 1], [1, 1]], np.eye(3))
    assert np.allclose(np.linalg.norm(both, axis=1), 1)   # two unit blocks, scaled by 1/sqrt(2)


def test_a_cluster_stage_that_cannot_learn_says_so(mined_run, tmp_path, tiny_overrides, caplog):
    """lr 1e-9: the heads stay uniform; the retries at 10x and 100x cannot help; the run says so."""
    overrides = tiny_overrides + ["cluster.lr=0.000000001", "selflabel.enabled=false"]
    with caplog.at_level(logging.WARNING, logger="scan"):
        metrics = run_pipeline(copy_run(mined_run, tmp_path, overrides[len(tiny_overrides):]))
    check = metrics["checks"]["cluster"]
    assert check["status"] == "failed"
    assert [a["lr"] for a in check["attempts"]] == pytest.approx([1e-9, 1e-8, 1e-7])
    assert "cluster check FAILED" in caplog.text and "raise cluster.lr" in caplog.text
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["checks"]["cluster"]["status"] == "failed"
    run = open_run(load_config("digits", overrides), tmp_path / "run")
    assert "cluster failed" in pipeline.summary_line(run, metrics)
    html = write_run_report(finished_run(run)).read_text()     # the report leads with the checks and the baselines
    assert html.index("Can these clusters be trusted?") < html.index("<h2>Summary</h2>")
    assert "cluster: failed" in html and "k-means on raw pixels" in html and "raise cluster.lr" in html


def test_the_cluster_stage_rescues_itself_with_a_higher_learning_rate(mined_run, tmp_path, monkeypatch):
    seen_lrs = []
    real_build, real_check = cluster_stage.build_optimizer, cluster_stage.cluster_check

    def recording_build(params, name, lr, *args, **kwargs):
        seen_lrs.append(lr)
        return real_build(params, name, lr, *args, **kwargs)

    calls = []

    def first_fails(consistency, confidence, c):
        calls.append(consistency)
        result = real_check(consistency, confidence, c)
        return {**result, "status": "failed"} if len(calls) == 1 else {**result, "status": "ok"}

    run = copy_run(mined_run, tmp_path, ["cluster.lr=0.0002"])
    monkeypatch.setattr(cluster_stage, "build_optimizer", recording_build)
    monkeypatch.setattr(cluster_stage, "cluster_check", first_fails)
    record = run_pipeline(run, ("cluster",))
    assert seen_lrs == pytest.approx([2e-4, 2e-3])
    assert record["check"]["status"] == "rescued" and "cluster.lr=0.002" in record["check"]["fix"]
    assert not list(run.path("cluster").rglob("checkpoint.pt"))


def test_every_evaluation_reports_kmeans_on_pixels_and_label_free_scores(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.5 < metrics["kmeans_pixels"]["acc"] < 0.95          # k-means on digits pixels: ~0.8
    for name in ("ours", "kmeans_pixels", "kmeans_features"):
        assert set(metrics["unsupervised"][name]) >= {"neighbor_agreement", "size_balance"}
    assert set(metrics["checks"]) == {"pretext", "cluster", "selflabel", "baseline"}
    assert metrics["checks"]["baseline"]["neighbor_agreement"] == metrics["unsupervised"]["ours"]["neighbor_agreement"]


@pytest.mark.slow
def test_using_a_trained_run_imports_no_training_code(trained_run, tmp_path):
    """predict, report and export use the final model without the stage modules, losses, pretext or SPC code."""
    import shutil
    import subprocess
    import sys
    shutil.copytree(trained_run, tmp_path / "run")
    from PIL import Image
    (tmp_path / "new").mkdir()
    for i, image in enumerate(np.random.default_rng(0).integers(0, 255, size=(3, 8, 8), dtype=np.uint8)):
        Image.fromarray(image).save(tmp_path / "new" / f"{i}.png")
    code = ("import sys; from scan.cli import main; "
            f"assert main(['predict', {str(tmp_path / 'run')!r}, {str(tmp_path / 'new')!r}, '--out', "
            f"{str(tmp_path / 'p.csv')!r}]) == 0; "
            f"assert main(['report', {str(tmp_path / 'run')!r}]) == 0; "
            f"assert main(['export', {str(tmp_path / 'run')!r}]) == 0; "
            "training = sorted(m for m in sys.modules if m.startswith(('scan.pipeline.stages', 'scan.algo.losses', 'scan.pretext', "
            "'scan.train.mining', 'scan.train.refine'))); print(training); assert not training, training")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4
