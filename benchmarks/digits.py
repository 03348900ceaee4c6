"""Benchmark the default pipeline on the built-in digits data set over several seeds.

Prints JSON: per seed and per stage ACC/NMI/ARI on the held-out split and seconds per stage,
plus the median (and mean ± std, as the paper reports) over seeds. With --overcluster the
same runs use C = 2 x classes.

    python benchmarks/digits.py --seeds 3 [--overcluster] [--config digits] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scan.pipeline import load_config, open_run, run_pipeline

STAGES = ("kmeans", "cluster", "selflabel")


def one_run(config: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    cfg = load_config(config, overrides + [f"seed={seed}", "quiet=true"])
    start = time.time()
    run = open_run(cfg, run_dir, restart=True)
    metrics = run_pipeline(run)
    out = {"seed": seed, "seconds_total": time.time() - start, "seconds": metrics["seconds"],
           "neighbor_purity": metrics.get("neighbor_purity"), "num_clusters": metrics["num_clusters"]}
    for stage in STAGES:
        if stage in metrics:
            out[stage] = {k: metrics[stage][k] for k in ("acc", "nmi", "ari")}
    return out


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for stage in STAGES:
        for metric in ("acc", "nmi", "ari"):
            values = [r[stage][metric] for r in runs if stage in r]
            if values:
                summary[f"{stage}_{metric}"] = {
                    "median": statistics.median(values), "mean": statistics.fmean(values),
                    "std": statistics.pstdev(values), "min": min(values), "max": max(values)}
    summary["seconds_total_median"] = statistics.median(r["seconds_total"] for r in runs)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--overcluster", action="store_true", help="C = 2 x number of classes")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="keep run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.overcluster:
        base = load_config(args.config, overrides)
        probe = open_run(base, Path(tempfile.mkdtemp()) / "probe")
        overrides.append(f"data.num_clusters={2 * probe.info['num_classes']}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scan-bench-"))
    runs = []
    for seed in range(args.seeds):
        runs.append(one_run(args.config, seed, overrides, root / f"seed{seed}"))
        print(json.dumps(runs[-1]), file=sys.stderr)
    print(json.dumps({"config": args.config, "overrides": overrides, "seeds": args.seeds,
                      "summary": summarise(runs), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
