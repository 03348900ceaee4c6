"""Run the stages of a run directory in order: `open_run(cfg, run_dir)` then `run_pipeline(run)`.

The stages themselves live in `scan/pipeline/stages/` (one module each, declared with the contract in
`scan.pipeline.stage`); the run directory and what every stage shares, in `scan.pipeline.run`.
"""
from __future__ import annotations

from scan.pipeline.run import Run
from scan.pipeline.stage import get_stage, model_stages, stage_enabled, stage_names

STAGES = stage_names()


def run_pipeline(run: Run, stages=STAGES) -> dict:
    """Run (or resume) the given stages in order; returns the evaluation metrics.

    Disabled optional stages are skipped in a chain; a stage asked for alone always runs, so
    that it can say how to enable it rather than silently doing nothing.
    """
    result: dict = {}
    for stage in stages:
        if len(stages) > 1 and not stage_enabled(run.cfg, stage):
            continue
        result = get_stage(stage).run(run)
    return result


def summary_line(run: Run, metrics: dict) -> str:
    parts = []
    for stage in ("kmeans_pixels", "kmeans", *model_stages()):   # the baselines, then every trained model
        if stage in metrics:
            m = metrics[stage]
            parts.append(f"{stage} acc {m['acc']:.3f} nmi {m['nmi']:.3f} ari {m['ari']:.3f}")
    held_out = run.eval is not run.train   # folders and .npz files have no split: evaluated in-sample
    images = f"{metrics['num_eval']} '{metrics['split']}' images" if held_out else f"all {metrics['num_eval']} images (in-sample)"
    where = f"{images}, {run.num_clusters} clusters"
    problems = [f"{stage} {c['status']}" for stage, c in metrics.get("checks", {}).items() if c["status"] != "ok"]
    checks = f"; checks: {', '.join(problems)} (see metrics.json)" if problems else "; every self-check ok"
    if not parts:
        return f"clustered {where} without labels{checks}; results in {run.run_dir}"
    return f"{' | '.join(parts)}  ({where}{checks}; results in {run.run_dir})"
