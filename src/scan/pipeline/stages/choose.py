"""Stage 1b, choose (only with data.num_clusters=auto, the default for data without labels): the number
of clusters, chosen without labels from the pretext features' nearest neighbours
(scan.algo.num_clusters); writes choose/done.json with the choice and the criterion per candidate."""
from __future__ import annotations

import time

from scan.algo.num_clusters import (
    CHOICE_CURVES,
    MAX_CLUSTERS,
    MIN_CLUSTER_SIZE,
    RESOLUTION,
    candidate_range,
    choice_neighbors,
    choose_num_clusters,
    close_behind,
)
from scan.config import AUTO, MineConfig
from scan.core.distributed import on_main
from scan.core.errors import StageError, typed
from scan.pipeline.run import Run, mining_inputs, record_run_config, say
from scan.pipeline.stage import Stage, register_stage
from scan.train.mining import mining_space


def stage_choose(run: Run) -> dict:
    """Choose the number of clusters (scan.algo.num_clusters.choose_num_clusters). Runs once, on rank 0,
    under torchrun."""
    if run.cfg.data.num_clusters != AUTO:   # asked for alone (scan choose) on a run with a given number
        raise StageError(f"data.num_clusters is {run.num_clusters}: the choose stage runs with --num-clusters auto "
                         f"(the default for data without labels)")
    if (record := run.done("choose")) is not None:
        return record
    return on_main(lambda: _choose(run))


def _choose(run: Run) -> dict:
    start = time.time()
    space = mining_space(mining_inputs(run, "train", chosen=False))
    candidates = candidate_range(len(space), run.cfg.choose.min_clusters, run.cfg.choose.max_clusters)
    # the requested K, not the mine stage's cap for the largest candidate (a local graph over-splits), except
    # where the range allows smaller clusters than K; self-pairs (mine.num_neighbors=0) still need a graph here
    k = choice_neighbors(len(space), candidates[-1], run.cfg.mine.num_neighbors or MineConfig.num_neighbors)
    choice = choose_num_clusters(space, candidates, k, run.cfg.seed)
    seconds = time.time() - start
    count, curve = choice["num_clusters"], choice["curve"]
    # a small set's default range is short (80 images: 2..4): say so, or 8 kinds of 10 photos end as 3 clusters
    range_note = (f" (at most one cluster per {MIN_CLUSTER_SIZE} images; for smaller kinds raise choose.max_clusters)"
                  if run.cfg.choose.max_clusters is None and candidates[-1] < MAX_CLUSTERS else "")
    if not range_note and count == candidates[-1]:   # the best at the edge: a larger C was never scored
        range_note = " (the top of the range: raise choose.max_clusters to score more)"
    close = close_behind(curve, count)
    close_note = (f"; close behind: {', '.join(f'{c} ({curve[c]:.3f})' for c in close)}, one command away (scan "
                  f"recluster {typed(run.run_dir)} --num-clusters C)" if close else "")
    say(run.rt, f"choose: {count} clusters (score {curve[count]:.3f} = neighbour agreement "
                f"{choice['agreement'][count]:.3f} - {RESOLUTION} x chance {choice['chance'][count]:.3f}, the "
                f"highest of C = {candidates[0]}..{candidates[-1]}{range_note}; {k} neighbours; {seconds:.1f} s)"
                f"{close_note}; the curve is in metrics.json and the report")
    record = run.finish("choose", num_clusters=count, criterion=choice["criterion"], neighbors=k, seconds=seconds,
                        close=close, **{key: {str(c): v for c, v in choice[key].items()} for key in CHOICE_CURVES})
    record_run_config(run)   # the models' configuration snapshots, keyed by fingerprints that need the choice
    return record


register_stage(Stage("choose", stage_choose, needs=("pretext",), sections=("seed", "choose", "mine"),
                     enabled=lambda cfg: cfg.data.num_clusters == AUTO,
                     # it searches mine.features with mine.num_neighbors; the miner and its head are mine's
                     ignores=lambda cfg: ("mine.method", "mine.head_epochs", "mine.head_lr",
                                          "mine.head_entropy_weight", "mine.head"),
                     description="the number of clusters, chosen without labels (data.num_clusters=auto)"))
