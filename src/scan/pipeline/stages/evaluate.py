"""Final stage, evaluate: metrics of the baselines and of each trained stage on the eval split,
label-free scores against k-means on raw pixels, and every stage's self-check; writes
metrics.json, probs.npy and predictions.npy. It always runs (it has no fingerprint to skip on)."""
from __future__ import annotations

import time

import numpy as np

from scan.algo.baselines import kmeans_assign, pixel_kmeans, unsupervised_scores
from scan.algo.checks import baseline_check, report
from scan.algo.metrics import evaluate_clustering
from scan.algo.num_clusters import CHOICE_CURVES, merge_tree
from scan.config import AUTO
from scan.core.checkpoint import atomic_save_npy, atomic_write_json
from scan.core.distributed import on_main
from scan.core.errors import StageError
from scan.pipeline.run import Run, head_probs, load_stage_model, trained_stages
from scan.pipeline.stage import Stage, register_stage, stage_names
from scan.train.features import read_features


def stage_evaluate(run: Run) -> dict:
    """Metrics of the baselines and each trained stage on the eval split, label-free scores against
    k-means on raw pixels, and every stage's self-check; writes metrics.json.

    Under torchrun it runs once, on rank 0; every rank returns the metrics."""
    return on_main(lambda: _evaluate(run))


def _evaluate(run: Run) -> dict:
    rt, k, seed = run.rt, run.num_clusters, run.cfg.seed
    start = time.time()
    metrics: dict = {"split": run.cfg.data.eval_split, "num_eval": len(run.eval), "num_clusters": k}
    labels, classes = run.eval.labels, run.info["num_classes"]
    train_feats = read_features(run, "train")
    eval_feats = train_feats if run.eval is run.train else read_features(run, "eval")
    kmeans_train, kmeans_eval = kmeans_assign(train_feats, eval_feats, k, seed)
    pixels = pixel_kmeans(run.train.images, run.eval.images, k, seed)
    if labels is not None:
        metrics["kmeans"] = evaluate_clustering(kmeans_eval, labels, classes)
        if pixels is not None:
            metrics["kmeans_pixels"] = evaluate_clustering(pixels[1], labels, classes)
    last = None
    for stage in trained_stages(run):
        model = rt.prepare(load_stage_model(run, stage))
        probs = head_probs(run, model, "eval")[0].numpy()
        if labels is not None:
            metrics[stage] = evaluate_clustering(probs, labels, classes)
        last = (stage, probs, model)
    if last is None:
        raise StageError(f"no trained model in {run.run_dir}: run the cluster stage first (scan cluster)")
    metrics["final_stage"], probs, model = last
    atomic_save_npy(run.path("probs.npy"), probs)
    atomic_save_npy(run.path("predictions.npy"), probs.argmax(1))
    # split-less data (folders, .npz) evaluate on the training images: no second pass over them
    train_probs = probs if run.eval is run.train else head_probs(run, model, "train")[0].numpy()
    records = {stage: record for stage in stage_names()[:-1] if (record := run.record(stage))}
    metrics.update(_label_free(run, train_probs, kmeans_train, pixels, records))
    if "candidates" in records.get("cluster", {}):   # the partitions that competed, and which one won
        metrics["candidates"] = records["cluster"]["candidates"]
    if run.cfg.data.num_clusters == AUTO:   # why this C: the criterion per candidate (scan.algo.num_clusters)
        choice = records["choose"]
        # a run chosen by an earlier criterion recorded other curves (modularity, stability): those it has
        metrics["num_clusters_choice"] = {key: choice[key] for key in ("num_clusters", "criterion", "close",
                                                                       *CHOICE_CURVES) if key in choice}
    for stage, record in records.items():
        metrics.setdefault("seconds", {})[stage] = record.get("seconds")
        if "purity" in record:
            metrics["neighbor_purity"] = record["purity"]
    metrics.setdefault("seconds", {})["evaluate"] = time.time() - start
    atomic_write_json(run.path("metrics.json"), metrics)
    return metrics


def _label_free(run: Run, train_probs: np.ndarray, kmeans_train: np.ndarray, pixels, records: dict) -> dict:
    """Scores that need no labels for ours and the baselines (training images), every stage's check, and the
    merge tree of our clusters on the mined neighbours."""
    path = run.path("mine", "neighbors.npy")
    neighbors = np.load(path) if path.exists() else None
    k = run.num_clusters
    scores = {"ours": unsupervised_scores(train_probs.argmax(1), neighbors, k, train_probs),
              "kmeans_features": unsupervised_scores(kmeans_train, neighbors, k)}
    if pixels is not None:
        scores["kmeans_pixels"] = unsupervised_scores(pixels[0], neighbors, k)
    checks = {stage: record["check"] for stage, record in records.items() if "check" in record}
    if neighbors is not None and pixels is not None:
        checks["baseline"] = report("baseline", baseline_check(scores["ours"], scores["kmeans_pixels"]))
    out = {"unsupervised": scores, "checks": checks}
    if neighbors is not None:   # how the final clusters nest: which join first as C shrinks
        out["merge_tree"] = merge_tree(train_probs.argmax(1), neighbors, k)
    return out


register_stage(Stage("evaluate", stage_evaluate, needs=("cluster", "selflabel", "refine"),
                     description="ACC/NMI/ARI, baselines, label-free scores, self-checks"))
