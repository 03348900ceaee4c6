"""The many-class combination on the built-in digits: `scan run --set pretext.method=byol_queue --set
mine.method=multiview`, over seeds (issue 26).

Prints JSON: per seed the held-out ACC, NMI, ARI and cluster-weighted precision/recall/F1 of the final
stage (and of the cluster stage), the smallest cluster and the lowest per-class recall (a merged or
emptied cluster shows there first), and the label purity of the neighbours: the multi-view ones the run
mined, plain kNN on the same features, and the 5 nearest in the pretext features; then the median of each.

    python benchmarks/manyclass.py [--seeds 3] [--root bench-manyclass] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from runs_common import parse_seed_args, scan  # noqa: E402

from scan.algo.neighbors import mine_neighbors, neighbor_purity  # noqa: E402
from scan.data import load_dataset  # noqa: E402

COMBINATION = ("pretext.method=byol_queue", "mine.method=multiview")
SCORES = ("acc", "nmi", "ari", "precision", "recall", "f1")


def one_seed(root: Path, seed: int, overrides: list[str], train_labels: np.ndarray) -> dict:
    out = root / f"seed{seed}"
    sets = [a for o in (*COMBINATION, *overrides) for a in ("--set", o)]
    assert scan(["run", "--out", str(out), "--seed", str(seed), "--quiet", "--restart", *sets]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    mine = json.loads((out / "mine" / "done.json").read_text())
    final = metrics[metrics["final_stage"]]
    confusion = np.asarray(final["confusion"])            # rows: true class, columns: class of the cluster
    features = np.load(out / "features" / "train.npy")
    row = {"seed": seed, "final_stage": metrics["final_stage"],
           **{k: round(final[k], 4) for k in SCORES},
           **{f"cluster_{k}": round(metrics["cluster"][k], 4) for k in SCORES},
           "smallest_cluster": int(np.bincount(np.load(out / "predictions.npy"), minlength=metrics["num_clusters"]).min()),
           "lowest_class_recall": round(float((confusion.diagonal() / confusion.sum(1)).min()), 4),
           "purity_multiview": round(mine["purity"], 4), "purity_knn": round(mine["knn_purity"], 4),
           "purity_pretext_5nn": round(neighbor_purity(mine_neighbors(features, 5), train_labels), 4),
           "pretext_check": metrics["checks"]["pretext"]["status"]}
    return row


def main() -> None:
    args = parse_seed_args(__doc__.splitlines()[0], "bench-manyclass")
    labels = np.asarray(load_dataset("digits", split="train").labels)
    runs = []
    for seed in range(args.seeds):
        runs.append(one_seed(Path(args.root), seed, args.overrides, labels))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    numeric = [k for k, v in runs[0].items() if k != "seed" and isinstance(v, (int, float))]
    print(json.dumps({"config": "digits", "overrides": [*COMBINATION, *args.overrides], "runs": runs,
                      "median": {k: statistics.median(r[k] for r in runs) for k in numeric}}, indent=2))


if __name__ == "__main__":
    main()
