"""Stage 2, mine: the neighbours of every training image (mine.method, mine.features); writes
mine/neighbors.npy."""
from __future__ import annotations

import time

from scan.algo.neighbors import neighbor_purity
from scan.core.checkpoint import atomic_save_npy
from scan.core.distributed import on_main
from scan.pipeline.run import Run, mined_neighbor_count, mining_inputs, say
from scan.pipeline.stage import Stage, register_stage
from scan.train.mining import mine


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
    requested = run.cfg.mine.num_neighbors
    if neighbors.shape[1] < requested:   # a small data set: the smallest plausible cluster holds fewer
        extra["num_neighbors_requested"] = requested
        say(run.rt, f"mine: {neighbors.shape[1]} neighbours per image, not mine.num_neighbors={requested}: "
                    f"{run.info['num_train']} images in {run.num_clusters} clusters hold about "
                    f"{run.info['num_train'] // run.num_clusters} per cluster, and neighbours beyond half of that "
                    f"would reach into other clusters")
    if run.train.labels is not None:
        extra["purity"] = neighbor_purity(neighbors, run.train.labels)
        baseline = f" (plain kNN {facts['knn_purity']:.3f})" if "knn_purity" in facts else ""
        say(run.rt, f"mine: {neighbors.shape[1]} neighbours per image, purity {extra['purity']:.3f}{baseline}")
    return run.finish("mine", **extra)


register_stage(Stage("mine", stage_mine, needs=("pretext",), sections=("seed", "mine", "augment"),
                     # only the multi-view miner's head depends on C: kNN neighbours serve any number of clusters
                     # (scan recluster reuses them), unless C lowers K on a small data set
                     inputs=lambda run: (mined_neighbor_count(run),) + ((run.num_clusters,)
                                                                        if run.cfg.mine.method == "multiview" else ()),
                     # only the multi-view miner augments (its strong and weak views); kNN runs keep their fingerprint
                     ignores=lambda cfg: ("augment",) if cfg.mine.method != "multiview" else (),
                     description="the K nearest neighbours of every image"))
