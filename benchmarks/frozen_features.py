"""Benchmark the pretrained path against what people run on the same frozen features (issue 27).

For each data set: `scan run --data X --pretrained efficientnet_lite0` (features embedded once and kept
in the run directory, so a rerun only retrains the heads), then on the very features it cached:
k-means, and spectral clustering of the same kNN graph the run mined (the graph half of UMAP -> k-means),
plus UMAP -> k-means itself when umap-learn is installed (the `umap` extra; its first call in a process
also JIT-compiles numba code: see umap_seconds). The run's cluster stage lets its heads' partition compete
with the same two recipes (cluster.candidates) and follows the one with the highest modularity on its kNN
graph, so "ours" is that final answer. Prints, as JSON per set: neighbour purity and count, ACC/NMI/ARI of
our final model and of each recipe, the run's choice (every candidate's modularity, the pick, how closely the
head learnt it), ours' NMI margin over the better recipe, and the seconds after the embedding; then a summary
(sets where ours beats both recipes, the worst margin).

    python benchmarks/frozen_features.py [--sets ...] [--root bench-frozen] [--data-dir DIR] [--set K=V ...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).parent))
from datasets import build  # noqa: E402
from runs_common import parse_args, scan  # noqa: E402

from scan.algo.candidates import CANDIDATES  # noqa: E402
from scan.algo.metrics import evaluate_clustering  # noqa: E402
from scan.algo.num_clusters import spectral_embedding, spectral_partition  # noqa: E402
from scan.use.inference import open_trained_run  # noqa: E402

SETS = ("photo-patches", "photo-crops-80", "digits", "fashion-2k", "shapes", "fashion-long-tailed",
        "digits-fashion-20")
SCORES = ("acc", "nmi", "ari")



def photo_crops(root: Path, per_kind: int = 10) -> Path:
    """8 kinds x `per_kind` 96 px crops of scikit-image photos: the small folder whose kinds hold fewer
    images than the default neighbour count."""
    from PIL import Image
    from skimage import data
    folder = root / f"photo-crops-{8 * per_kind}"
    if folder.exists():
        return folder
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "brick", "moon"):
        photo = getattr(data, name)()
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        (folder / name).mkdir(parents=True)
        h, w = photo.shape[:2]
        for j in range(per_kind):
            side = int(rng.integers(min(h, w) // 2, min(h, w) * 3 // 4))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            Image.fromarray(photo[y:y + side, x:x + side]).resize((96, 96), Image.BILINEAR).save(folder / name / f"{j}.png")
    return folder


def _scores(pred: np.ndarray, labels: np.ndarray) -> dict:
    result = evaluate_clustering(pred, labels, int(labels.max()) + 1)
    return {k: round(result[k], 4) for k in SCORES}


def umap_kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """umap-learn's documented clustering recipe as people run it (its own approximate neighbours, Euclidean,
    10-d, min_dist 0, 30 neighbours, then k-means), if installed: the rival. The run's own umap_kmeans candidate
    embeds an exact cosine kNN graph instead (scan.algo.candidates), which is faster."""
    try:
        import umap
    except ImportError:
        return None
    embedding = umap.UMAP(n_neighbors=30, min_dist=0.0, n_components=10, random_state=seed).fit_transform(features)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)


def one_set(name: str, path: Path, root: Path, overrides: list[str]) -> dict:
    run_dir = root / "runs" / name
    kinds = (len([d for d in path.iterdir() if d.is_dir()]) if path.is_dir()
             else int(np.load(path)["labels"].max()) + 1)   # the true number of clusters is given
    args = ["run", "--data", str(path), "--pretrained", "efficientnet_lite0", "--out", str(run_dir), "--quiet",
            "--num-clusters", str(kinds), *(a for o in overrides for a in ("--set", o))]
    start = time.time()
    assert scan(args + (["--labels-from-folders"] if path.is_dir() else [])) == 0
    wall = time.time() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = open_trained_run(run_dir, "cpu", with_data=True)
    labels, k, seed = np.asarray(run.train.labels), run.num_clusters, run.cfg.seed
    features = np.load(run_dir / "features" / "train.npy")
    neighbors = np.load(run_dir / "mine" / "neighbors.npy")
    mine = json.loads((run_dir / "mine" / "done.json").read_text())
    recipes_start = time.time()
    # k-means as the run's cluster stage computes its candidate (same features, C and seed: same partition)
    kmeans_pred = CANDIDATES.get("kmeans")(features, k, seed)
    out = {"images": len(labels), "clusters": k, "num_neighbors": mine["num_neighbors"],
           "neighbor_purity": round(mine.get("purity", float("nan")), 4),
           "ours": {s: round(metrics[metrics["final_stage"]][s], 4) for s in SCORES},
           "kmeans": _scores(kmeans_pred, labels),
           "spectral_knn": _scores(spectral_partition(spectral_embedding(neighbors, k), k, seed), labels)}
    umap_start = time.time()
    umap_pred = umap_kmeans(features, k, seed)
    out["umap_kmeans"] = None if umap_pred is None else _scores(umap_pred, labels)
    out["umap_seconds"] = None if umap_pred is None else round(time.time() - umap_start, 1)
    # the run's own label-free choice (cluster.candidates): every candidate's modularity on the kNN graph, the pick
    choice = metrics.get("candidates")
    out["choice"] = None if choice is None else {key: choice[key] for key in ("modularity", "pick", "skipped")
                                                 if key in choice} | {"fit_agreement": choice.get("fit_agreement"),
                                                                      "seconds": round(choice["seconds"], 1)}
    recipes = [out[r]["nmi"] for r in ("kmeans", "umap_kmeans") if out[r] is not None]
    out["nmi_margin_over_best_recipe"] = round(out["ours"]["nmi"] - max(recipes), 4)
    stage_seconds = metrics["seconds"]
    out["seconds_after_embedding"] = round(sum(v for s, v in stage_seconds.items() if s != "pretext"), 1)
    out["recipes_seconds"] = round(time.time() - recipes_start, 1)
    out["wall_seconds"] = round(wall, 1)
    return out


def main() -> None:
    args, root, data_dir = parse_args(__doc__.splitlines()[0], SETS, "bench-frozen")
    paths = build(data_dir, [s for s in args.sets if s != "photo-crops-80"])
    paths["photo-crops-80"] = photo_crops(data_dir)
    out = {"overrides": args.overrides, "sets": {}}
    for name in args.sets:
        out["sets"][name] = one_set(name, paths[name], root, args.overrides)
        print(json.dumps({name: out["sets"][name]}), file=sys.stderr, flush=True)
    margins = [s["nmi_margin_over_best_recipe"] for s in out["sets"].values()]
    # done when (issue 27): never more than 0.01 NMI below either recipe, above both on at least half the sets
    out["summary"] = {"sets_above_both_recipes": sum(m > 0 for m in margins), "sets": len(margins),
                      "worst_margin": min(margins)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
