"""Benchmark head-only SCAN on a frozen pretrained network (config/builtin/pretrained.yaml).

For each data set prints, as JSON: ACC/NMI/ARI of k-means on the pretrained features, of the
SCAN heads trained on the cached features and of the self-labelled heads; the purity of the
mined neighbours; and wall-clock seconds of the embedding and of the head training, apart.

    flock /tmp/scan-bench.lock python benchmarks/pretrained.py \
        [--datasets fashion-mnist digits] [--backbone efficientnet_lite0] [--out runs/bench-pretrained] \
        [--scratch fashion-mnist=runs/fm/metrics.json] [--set cluster.epochs=100 ...]

fashion-mnist clusters the 10k test split (and is evaluated on it); digits uses its usual
train/val split. Run directories are kept under --out, so a rerun reuses the cached features
and only retrains the heads. --scratch reads the metrics.json of a from-scratch run of the
same data set and reports it alongside (accuracy and neighbour purity of its pretext features).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from scan.config import merge, parse_override
from scan.core.checkpoint import read_json
from scan.pipeline import load_config, open_run, run_pipeline

DATASETS = {
    "fashion-mnist": {"data": {"dataset": "fashion-mnist", "train_split": "test", "eval_split": "test"}},
    "digits": {"data": {"dataset": "digits", "train_split": "train", "eval_split": "val"}},
}
SCORES = ("acc", "nmi", "ari")


def scores(metrics: dict, stage: str) -> dict | None:
    return {k: metrics[stage][k] for k in SCORES} if stage in metrics else None


def from_scratch(path: Path) -> dict:
    """The final-stage scores, k-means, neighbour purity and seconds of a from-scratch run's metrics.json."""
    metrics = json.loads(Path(path).read_text())
    return {"metrics_json": str(path), "final_stage": metrics.get("final_stage"),
            "final": scores(metrics, metrics.get("final_stage", "")), "kmeans": scores(metrics, "kmeans"),
            "neighbor_purity": metrics.get("neighbor_purity"), "seconds": metrics.get("seconds")}


def dataset_config(name: str, backbone: str, overrides: list[str]):
    """config/builtin/pretrained.yaml for data set `name`, then the backbone, then the user's --set overrides."""
    data = merge(DATASETS[name], {"model": {"backbone": backbone}, "quiet": True})
    for text in overrides:
        data = merge(data, parse_override(text))
    return load_config("pretrained", data)


def one_dataset(name: str, backbone: str, overrides: list[str], run_dir: Path) -> dict:
    cfg = dataset_config(name, backbone, overrides)
    start = time.time()
    run = open_run(cfg, run_dir, restart=True)   # recomputes every stage; the feature cache survives
    metrics = run_pipeline(run)
    record = {s: read_json(run.path(s, "done.json")) or {} for s in ("pretext", "mine", "cluster", "selflabel")}
    embed = record["pretext"]
    heads = record["cluster"].get("seconds", 0.0) + record["selflabel"].get("seconds", 0.0)
    return {
        "num_train": len(run.train), "num_eval": len(run.eval), "eval_split": cfg.data.eval_split,
        "kmeans_on_features": scores(metrics, "kmeans"),
        "scan_heads": scores(metrics, "cluster"),
        "scan_heads_selflabel": scores(metrics, "selflabel"),
        "neighbor_purity": metrics.get("neighbor_purity"),
        "seconds": {
            # a reused cache reports how long its embedding took when it was computed
            "embedding": embed.get("embed_seconds"), "embedding_reused": embed.get("reused"),
            "mine": record["mine"].get("seconds"), "cluster_heads": record["cluster"].get("seconds"),
            "selflabel_heads": record["selflabel"].get("seconds"), "head_training": heads,
            "total_this_run": time.time() - start},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", default="runs/bench-pretrained", help="run directories (kept: the cache is reused)")
    parser.add_argument("--scratch", action="append", default=[], metavar="DATASET=METRICS_JSON",
                        help="metrics.json of a from-scratch run of DATASET, reported alongside")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    scratch = dict(text.split("=", 1) for text in args.scratch)
    results = {}
    for name in args.datasets:
        results[name] = one_dataset(name, args.backbone, args.overrides, Path(args.out) / f"{name}-{args.backbone}")
        if name in scratch:
            results[name]["from_scratch"] = from_scratch(Path(scratch[name]))
        print(json.dumps({name: results[name]}), file=sys.stderr)
    print(json.dumps({"backbone": args.backbone, "overrides": args.overrides, "torch_threads": torch.get_num_threads(),
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
