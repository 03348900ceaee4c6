"""Pretext zoo and multi-view mining on the built-in digits data set; prints JSON.

    python benchmarks/pretext_zoo.py pretext [--seeds 1] [--methods simclr moco ...] [--full]
    python benchmarks/pretext_zoo.py mining [--seeds 3] [--set pretext.method=simclr]

pretext  every registered pretext method (or --methods) with the digits config's budget: kNN
         purity of its train features (K = mine.num_neighbors), pretext seconds and, with
         --full, the held-out ACC of the whole pipeline.
mining   plain kNN vs multi-view mining on the same pretext features per seed: neighbour
         purity, the plain-kNN purity of the same run, and the held-out ACC of the cluster and
         self-label stages; median (and min/max) over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scan.core.checkpoint import read_json
from scan.pipeline import load_config, open_run, run_pipeline
from scan.pretext import list_pretext_methods


def run_digits(overrides: list[str], run_dir: Path, stages, restart: bool) -> dict:
    """Run `stages` on digits; returns the metrics (when evaluated) plus the mine and pretext records."""
    cfg = load_config("digits", overrides + ["quiet=true"])
    start = time.time()
    run = open_run(cfg, run_dir, restart=restart)
    metrics = run_pipeline(run, stages)
    out = {"seconds_total": time.time() - start, "mine": read_json(run_dir / "mine" / "done.json"),
           "pretext_seconds": read_json(run_dir / "pretext" / "done.json")["seconds"]}
    for stage in ("kmeans", "cluster", "selflabel"):
        if stage in metrics:
            out[f"{stage}_acc"] = metrics[stage]["acc"]
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_pretext(args, root: Path) -> dict:
    stages = ("pretext", "mine", "cluster", "selflabel", "evaluate") if args.full else ("pretext", "mine")
    rows = {}
    for method in args.methods or list_pretext_methods():
        runs = []
        for seed in range(args.seeds):
            r = run_digits(args.overrides + [f"pretext.method={method}", f"seed={seed}"],
                           root / f"{method}-seed{seed}", stages, restart=True)
            runs.append({"seed": seed, "knn_purity": r["mine"]["purity"], "pretext_seconds": r["pretext_seconds"],
                         **{k: v for k, v in r.items() if k.endswith("_acc")}})
            print(json.dumps({"method": method, **runs[-1]}), file=sys.stderr)
        rows[method] = {key: spread([r[key] for r in runs]) for key in runs[0] if key != "seed"}
    return {"part": "pretext", "seeds": args.seeds, "overrides": args.overrides, "methods": rows}


def bench_mining(args, root: Path) -> dict:
    runs = {"knn": [], "multiview": []}
    for seed in range(args.seeds):
        for i, miner in enumerate(runs):
            # same run folder: the pretext stage of the first miner is reused by the second
            r = run_digits(args.overrides + [f"mine.method={miner}", f"seed={seed}"], root / f"seed{seed}",
                           ("pretext", "mine", "cluster", "selflabel", "evaluate"), restart=i == 0)
            row = {"seed": seed, "purity": r["mine"]["purity"], "mine_seconds": r["mine"]["seconds"],
                   "cluster_acc": r["cluster_acc"], "selflabel_acc": r["selflabel_acc"]}
            if "knn_purity" in r["mine"]:
                row["knn_purity_same_run"] = r["mine"]["knn_purity"]
            runs[miner].append(row)
            print(json.dumps({"miner": miner, **row}), file=sys.stderr)
    summary = {miner: {key: spread([r[key] for r in rows]) for key in rows[0] if key != "seed"}
               for miner, rows in runs.items()}
    return {"part": "mining", "seeds": args.seeds, "overrides": args.overrides, "summary": summary, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("pretext", "mining"))
    parser.add_argument("--seeds", type=int, default=None, help="default: 1 for pretext, 3 for mining")
    parser.add_argument("--methods", nargs="*", help="pretext methods (default: every registered one)")
    parser.add_argument("--full", action="store_true", help="pretext: also run every later stage for ACC")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="keep run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.part == "pretext" else 3)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scan-zoo-"))
    result = (bench_pretext if args.part == "pretext" else bench_mining)(args, root)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
