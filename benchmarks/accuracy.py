"""Accuracy of the shipped recipes, end to end: per data set and seed, ACC/NMI/ARI of every stage,
the purity of the mined neighbours and seconds per stage, then median/min/max over seeds.

Each run resolves its configuration exactly as `scan run --config NAME --seed S [--pretrained P]
[--set ...]` does (scan.cli's parser and build_config) and runs the pipeline in a temporary run
directory. Prints one JSON object; --out also writes it to a file (input of --table).

    python benchmarks/accuracy.py [--data-sets digits fashion-mnist] [--seeds 3] \
        [--pretrained efficientnet_lite0] [--set cluster.epochs=40 ...] [--out acc.json]
    python benchmarks/accuracy.py --table acc.json [more.json ...]   # the README's Markdown table
    python benchmarks/accuracy.py --runs fashion-mnist runs/a runs/b   # summarise finished run directories

--runs reads RUN/metrics.json of runs made elsewhere (another benchmark, `scan run`) instead of
running: the same JSON, so a 40-minute run is not repeated to get its row.

A data set is a built-in config name (digits, fashion-mnist, digits-spc, ...). The default is
digits, plus fashion-mnist when its files are installed (/usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from seeds import emit, spread  # benchmarks/seeds.py (python puts the script's folder on the path)

from scan.algo.neighbors import neighbor_purity
from scan.cli import build_parser
from scan.core.checkpoint import read_json
from scan.pipeline import open_run, run_pipeline
from scan.pipeline.resolve import build_config

FASHION_FILES = Path("/usr/share/datasets/fashion-mnist")
SCORED = ("kmeans_pixels", "kmeans", "cluster", "selflabel", "refine")
SCORES = ("acc", "nmi", "ari")


def purity(run, metrics: dict) -> float | None:
    """The mine stage records the purity when the training images have labels; else work it out."""
    if metrics.get("neighbor_purity") is not None:
        return metrics["neighbor_purity"]
    path = run.path("mine", "neighbors.npy")
    labels = run.train.labels
    return neighbor_purity(np.load(path), labels) if path.exists() and labels is not None else None


def one_run(config: str, seed: int, pretrained: str | None, overrides: list[str], run_dir: Path) -> dict:
    argv = ["run", "--config", config, "--seed", str(seed), "--run-dir", str(run_dir), "--quiet"]
    argv += ["--pretrained", pretrained] if pretrained else []
    for text in overrides:
        argv += ["--set", text]
    cfg, data = build_config(build_parser(argv).parse_args(argv))
    start = time.time()
    run = open_run(cfg, run_dir, restart=True, data=data)
    metrics = run_pipeline(run)
    out = row(seed, metrics, purity(run, metrics), time.time() - start)
    if pretrained:
        out["seconds"]["embedding"] = embedding_seconds(run_dir)
    return out


def embedding_seconds(run_dir: Path) -> float | None:
    """How long a pretrained run's embedding took when it was computed (a rerun reuses the cache)."""
    return (read_json(run_dir / "pretext" / "done.json") or {}).get("embed_seconds")


def row(seed: int, metrics: dict, neighbor_purity: float | None, seconds_total: float) -> dict:
    """One run's entry: the scores of every stage, the final one, purity and seconds per stage."""
    out = {"seed": seed, "final_stage": metrics["final_stage"], "neighbor_purity": neighbor_purity,
           "seconds_total": seconds_total, "seconds": metrics.get("seconds", {})}
    for stage in SCORED:
        if stage in metrics:
            out[stage] = {k: metrics[stage][k] for k in SCORES}
    out["final"] = out.get(metrics["final_stage"])
    return out


def finished_run(run_dir: Path) -> dict:
    """The entry of a run directory finished elsewhere, from its metrics.json (seconds: its stages' sum,
    a pretrained run's pretext counted as the embedding time its cache recorded)."""
    metrics = read_json(run_dir / "metrics.json")
    if metrics is None:
        raise SystemExit(f"--runs {run_dir}: no metrics.json (is the run finished?)")
    seed = yaml.safe_load((run_dir / "config.yaml").read_text()).get("seed")
    seconds = dict(metrics.get("seconds", {}))
    embedding = embedding_seconds(run_dir)
    if embedding is not None:   # a pretrained run's pretext stage may only have read the cached embedding
        seconds["pretext"] = embedding
    return row(seed, {**metrics, "seconds": seconds}, metrics.get("neighbor_purity"),
               sum(v for v in seconds.values() if v is not None))


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for stage in SCORED + ("final",):
        for metric in SCORES:
            values = [r[stage][metric] for r in runs if r.get(stage)]
            if values:
                summary[f"{stage}_{metric}"] = spread(values)
    if all(r["neighbor_purity"] is not None for r in runs):
        summary["neighbor_purity"] = spread([r["neighbor_purity"] for r in runs])
    summary["seconds_total"] = spread([r["seconds_total"] for r in runs])
    for stage in runs[0]["seconds"]:
        values = [r["seconds"][stage] for r in runs if r["seconds"].get(stage) is not None]
        if values:
            summary[f"seconds_{stage}"] = spread(values)
    return summary


def table(results: list[dict]) -> str:
    """Markdown rows: final-stage ACC/NMI/ARI median [min, max] over seeds, purity, seconds per stage."""
    rows = ["| data set | config | seeds | final stage | ACC median [min, max] | NMI | ARI | purity "
            "| seconds: total (per stage) |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for name, entry in result["data_sets"].items():
            s, runs = entry["summary"], entry["runs"]
            acc = s["final_acc"]
            stages = [k[len("seconds_"):] for k in s if k.startswith("seconds_") and k != "seconds_total"]
            per_stage = " / ".join(f"{st} {s['seconds_' + st]['median']:.0f}" for st in stages)
            config = name + (f" --pretrained {result['pretrained']}" if result.get("pretrained") else "")
            config += "".join(f" --set {o}" for o in result.get("overrides", []))
            purity_text = f"{s['neighbor_purity']['median']:.3f}" if "neighbor_purity" in s else "–"
            rows.append(f"| {name} | `{config}` | {len(runs)} | {runs[0]['final_stage']} "
                        f"| **{acc['median']:.3f}** [{acc['min']:.3f}, {acc['max']:.3f}] "
                        f"| {s['final_nmi']['median']:.3f} | {s['final_ari']['median']:.3f} | {purity_text} "
                        f"| {s['seconds_total']['median']:.0f} ({per_stage}) |")
    return "\n".join(rows)


def main(argv=None) -> int:
    default_sets = ["digits"] + (["fashion-mnist"] if FASHION_FILES.is_dir() else [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-sets", nargs="+", default=default_sets, metavar="CONFIG",
                        help=f"built-in configs to run (default: {' '.join(default_sets)})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--pretrained", metavar="NAME", help="frozen pretrained features, e.g. efficientnet_lite0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of earlier --out files")
    parser.add_argument("--runs", nargs="+", metavar=("NAME", "RUN_DIR"),
                        help="summarise finished run directories of data set NAME instead of running")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(Path(p).read_text()) for p in args.table]))
        return 0
    if args.runs:
        name, *dirs = args.runs
        runs = [finished_run(Path(d)) for d in dirs]
        result = {"pretrained": args.pretrained, "overrides": args.overrides,
                  "data_sets": {name: {"summary": summarise(runs), "runs": runs}}}
        return emit(result, args.out)
    result = {"pretrained": args.pretrained, "overrides": args.overrides, "data_sets": {}}
    with tempfile.TemporaryDirectory(prefix="scan-accuracy-") as root:
        for name in args.data_sets:
            runs = []
            for seed in range(args.seeds):
                runs.append(one_run(name, seed, args.pretrained, args.overrides, Path(root) / f"{name}-seed{seed}"))
                print(json.dumps({name: runs[-1]}), file=sys.stderr)
            result["data_sets"][name] = {"summary": summarise(runs), "runs": runs}
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
