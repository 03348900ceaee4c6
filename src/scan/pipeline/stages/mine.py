"""Stage 2, mine: the neighbours of every training image (mine.method, mine.features); writes
mine/neighbors.npy."""
from __future__ import annotations

import time

from scan.algo.neighbors import neighbor_purity
from scan.core.checkpoint import atomic_save_npy
from scan.core.distributed import on_main
from scan.pipeline.run import Run, say
from scan.pipeline.stage import Stage, register_stage
from scan.train.features import features_path, read_features
from scan.train.mining import MiningInputs, mine
from scan.train.sources import load_backbone


def mining_inputs(run: Run, split: str) -> MiningInputs:
    """What the miners and mining spaces read for the 'train' or 'eval' images (features/<split>*.npy)."""
    data = run.train if split == "train" else run.eval
    features = read_features(run, split)
    projection = features_path(run, split, "_projection")
    return MiningInputs(features, data.images, lambda: load_backbone(run), run.cfg, run.num_clusters, run.rt,
                        data.labels, lambda m: say(run.rt, m),
                        projection_path=run.path("pretext", "projection.pt"),
                        load_projection=(lambda: read_features(run, split, "_projection")) if projection.is_file() else None)


def stage_mine(run: Run) -> dict:
    """Neighbours of every training image in pretext feature space (mine.method: knn | multiview)."""
    if (record := run.done("mine")) is not None:
        return record
    # the features were embedded by every rank (its shard) and gathered by the pretext stage;
    # the search runs once, on rank 0; every rank waits for its record (neighbors.npy is then written)
    return on_main(lambda: _mine(run))


def _mine(run: Run) -> dict:
    start = time.time()
    neighbors, facts = mine(mining_inputs(run, "train"))
    atomic_save_npy(run.path("mine", "neighbors.npy"), neighbors)
    extra = {"seconds": time.time() - start, "method": run.cfg.mine.method, "num_neighbors": int(neighbors.shape[1]),
             **facts}
    if run.train.labels is not None:
        extra["purity"] = neighbor_purity(neighbors, run.train.labels)
        baseline = f" (plain kNN {facts['knn_purity']:.3f})" if "knn_purity" in facts else ""
        say(run.rt, f"mine: {neighbors.shape[1]} neighbours per image, purity {extra['purity']:.3f}{baseline}")
    return run.finish("mine", **extra)


register_stage(Stage("mine", stage_mine, needs=("pretext",), sections=("seed", "mine", "augment"),
                     inputs=lambda run: (run.num_clusters,),
                     # only the multi-view miner augments (its strong and weak views); kNN runs keep their fingerprint
                     ignores=lambda cfg: ("augment",) if cfg.mine.method != "multiview" else (),
                     description="the K nearest neighbours of every image"))
