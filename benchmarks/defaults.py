"""The default path (`scan run --data X`, no config, no hand-set option) on several real data sets.

For each set: held-out-free accuracy (the sets have no split: clustered and scored on all
images), k-means on raw pixels and on our features, neighbour purity, seconds per stage and
the self-check verdicts. Prints one JSON document; progress lines go to stderr.

    python benchmarks/defaults.py [--sets digits fashion-5k ...] [--data-dir bench-data] [--out runs/bench]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from datasets import NPZ_SETS, build  # noqa: E402

ALL_SETS = list(NPZ_SETS) + ["photo-patches"]
QUICK_SETS = ["digits", "fashion-5k", "fashion-tinted", "shapes", "photo-patches"]


def run_one(name: str, path: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "scan.cli", "run", "--data", str(path), "--out", str(out), "--restart", "--quiet"]
    if path.is_dir():
        cmd.append("--labels-from-folders")
    start = time.time()
    proc = subprocess.run(cmd + extra, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"set": name, "error": proc.stderr.strip().splitlines()[-1:], "seconds_total": seconds}
    m = json.loads((out / "metrics.json").read_text())
    final = m["final_stage"]
    row = {"set": name, "num_images": m["num_eval"], "seconds_total": round(seconds, 1),
           "seconds": {k: round(v, 1) for k, v in m["seconds"].items() if v is not None},
           "neighbor_purity": m.get("neighbor_purity"), "final_stage": final,
           "checks": {k: v["status"] for k, v in m.get("checks", {}).items()},
           "unsupervised": m.get("unsupervised")}
    for key in ("kmeans_pixels", "kmeans", "cluster", "selflabel"):
        if key in m:
            row[key] = {k: round(m[key][k], 3) for k in ("acc", "nmi", "ari")}
    row["margin_over_pixels"] = round(m[final]["acc"] - m["kmeans_pixels"]["acc"], 3) if "kmeans_pixels" in m else None
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=QUICK_SETS, choices=ALL_SETS)
    parser.add_argument("--data-dir", default="bench-data")
    parser.add_argument("--out", default="runs/bench-defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed on as --set")
    args = parser.parse_args(argv)
    paths = build(Path(args.data_dir), args.sets)
    extra = [a for o in args.overrides for a in ("--set", o)]
    rows = []
    for name in args.sets:
        rows.append(run_one(name, paths[name], Path(args.out) / name, extra))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"overrides": args.overrides, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
