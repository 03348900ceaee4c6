"""A finer or coarser partition of a finished run: `scan recluster RUN --num-clusters C`.

The new run directory (default RUN-cC, beside RUN) starts with copies of RUN's pretext, cached features
and mined neighbours, so its own pipeline reuses them (their fingerprints do not depend on C) and trains
only the clustering heads and what follows: seconds on cached features, never a pretext. It is a run
of its own: config.yaml, fingerprints, metrics.json and report.html; RUN is only read.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from scan.core.errors import RunError, StageError, typed
from scan.pipeline.chain import run_pipeline
from scan.pipeline.choices import load_config
from scan.pipeline.run import Run, open_run
from scan.rundir.directory import CONFIG_FILE, is_run_dir, read_record

# the folders a recluster starts from: what the stages before the clustering wrote
REUSED = ("pretext", "features", "mine")


def recluster_dir(source: Path, num_clusters: int) -> Path:
    return source.with_name(f"{source.name}-c{num_clusters}")


def recluster(source, num_clusters: int, target=None, overrides=()) -> tuple[Run, dict]:
    """Cluster a finished run's images into `num_clusters` in a new run directory (continued if it is one
    already); `overrides` are --set KEY=VALUE texts on top of RUN's config.yaml. Returns (run, metrics)."""
    source = Path(source)
    if not is_run_dir(source):
        raise RunError(f"{source} is not a run directory (no {CONFIG_FILE} and run.json): give the folder of a "
                       f"finished `scan run`")
    if read_record(source / "pretext" / "done.json") is None:
        raise StageError(f"{source} has no finished pretext stage to start from: finish it first (scan run "
                         f"--run-dir {typed(source)})")
    target = Path(target) if target is not None else recluster_dir(source, num_clusters)
    if target.resolve() == source.resolve():
        raise RunError(f"--out {target} is the run being reclustered; give another folder (default {recluster_dir(source, num_clusters)})")
    fresh = not is_run_dir(target)
    cfg = load_config(str(source / CONFIG_FILE), [*overrides, f"data.num_clusters={num_clusters}"])
    run = open_run(cfg, target)   # claims and locks the new folder (it refuses one that is not ours)
    if fresh:
        for folder in REUSED:
            _copy_files(source / folder, target / folder)
    return run, run_pipeline(run)


def _copy_files(source: Path, target: Path) -> None:
    """The regular files of one stage folder (not links, not checkpoints of unfinished training)."""
    if not source.is_dir() or source.is_symlink():
        return
    target.mkdir(exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.is_symlink() and file.name != "checkpoint.pt":
            shutil.copy2(file, target / file.name)
