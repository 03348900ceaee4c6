"""The published recipe against ours, one setting at a time (issue 14, items 1, 2 and 6), over seeds.

For each seed the CPU config runs once as shipped ("ours"); each variant then copies that run
directory and changes one setting, so the stages it does not touch are reused: the mining
variant keeps the pretext, the strong-augmentation variant reruns self-labelling only (SimCLR
never sees that augmentation), the SPC variant runs the data set's `-spc` config (SPC refines
the cluster model in place of self-labelling). Prints JSON: per variant and seed ACC/NMI/ARI of
the cluster stage and the final one, neighbour purity and seconds, then per variant the median,
min-max spread and the median difference to ours over seeds.

    python benchmarks/recipes.py --seeds 3                          # digits, about 1-2 min per run
    python benchmarks/recipes.py --config fashion-mnist --seeds 3 --pretext-seed 0   # Fashion-MNIST

--pretext-seed N trains the pretext once (seed N, pretext.seed) and runs every later stage under
each seed on it, as the SCAN paper reports the spread of its clustering step: on Fashion-MNIST the
pretext is 31 of the 37 minutes of a run on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from accuracy import row  # benchmarks/accuracy.py (python puts the script's folder on the path)
from seeds import emit

from scan.pipeline import load_config, open_run, run_pipeline

# variant -> (suffix of the config name, the overrides) that turn our CPU default into the published setting
VARIANTS = {
    "ours": ("", []),
    "mine.features=projection": ("", ["mine.features=projection"]),            # item 1: the authors' mining space
    "augment.strong_strength=paper": ("", ["augment.strong_strength=paper"]),  # item 2: the authors' strong augmentation
    "spc-paper": ("-spc", []),   # item 6: SPC in place of self-labelling, labels rebuilt each round (config NAME-spc)
}
STAGES = ("cluster", "selflabel", "refine")
METRICS = ("acc", "nmi", "ari")


def one_run(config: str, seed: int, overrides: list[str], run_dir: Path, start_from: Path | None) -> dict:
    """Run the pipeline in `run_dir` (a copy of `start_from`, whose unchanged stages are then skipped).

    A `run_dir` left by an earlier, interrupted call with the same --out is resumed instead: its
    finished stages are reused. Seconds are the run's stage seconds (reused stages included)."""
    if start_from is not None and not run_dir.exists():
        shutil.copytree(start_from, run_dir)
    cfg = load_config(config, overrides + [f"seed={seed}", "quiet=true"])
    metrics = run_pipeline(open_run(cfg, run_dir))
    seconds = sum(v for v in metrics.get("seconds", {}).values() if v is not None)
    return row(seed, metrics, metrics.get("neighbor_purity"), seconds)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per variant: median and spread of every metric, and the per-seed difference to ours."""
    summary = {}
    for variant, rows in runs.items():
        entry = {}
        for stage in (*STAGES, "final"):
            for metric in METRICS:
                values = [r[stage][metric] for r in rows if stage in r]
                if values:
                    entry[f"{stage}_{metric}"] = spread(values)
        purity = [r["neighbor_purity"] for r in rows if r.get("neighbor_purity") is not None]
        if purity:
            entry["neighbor_purity"] = spread(purity)
        if variant != "ours":
            diffs = [r["final"]["acc"] - o["final"]["acc"] for r, o in zip(rows, runs["ours"])]
            entry["final_acc_minus_ours"] = spread(diffs)
        entry["seconds_median"] = statistics.median(r["seconds_total"] for r in rows)
        summary[variant] = entry
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    parser.add_argument("--pretext-seed", type=int, help="one pretext trained with this seed, shared by every seed")
    parser.add_argument("--out", help="keep run directories here (default: a temporary folder); a rerun with "
                                      "the same --out resumes the runs an interrupted one left")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scan-recipes-"))
    variants = ["ours"] + [v for v in args.variants if v != "ours"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    shared = [] if args.pretext_seed is None else [f"pretext.seed={args.pretext_seed}"]
    for seed in range(args.seeds):
        ours_dir = root / f"seed{seed}" / "ours"
        for variant in variants:
            suffix, overrides = VARIANTS[variant]
            if variant != "ours":
                start_from = ours_dir
            else:   # with a shared pretext, later seeds start from the first seed's run (its pretext is reused)
                start_from = root / "seed0" / "ours" if shared and seed > 0 else None
            row = one_run(args.config + suffix, seed, args.overrides + shared + overrides,
                          root / f"seed{seed}" / variant.replace("=", "-"), start_from)
            runs[variant].append(row)
            print(json.dumps({"variant": variant, **row}), file=sys.stderr)
    result = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
              "pretext_seed": args.pretext_seed,
              "variants": {v: {"config": args.config + VARIANTS[v][0], "overrides": VARIANTS[v][1]} for v in variants},
              "summary": summarise(runs), "runs": runs}
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
