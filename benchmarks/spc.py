"""Compare self-labelling, SPC refinement and self-labelling followed by SPC on one SCAN checkpoint.

For each seed the pretext, mine and cluster stages run once; each variant then works on a
copy of that run directory, so all three start from the very same cluster model:

    selflabel      cluster -> selflabel
    spc            cluster -> refine (SPC)
    selflabel+spc  cluster -> selflabel -> refine (SPC)   (continues the selflabel copy)

Prints JSON: per seed and variant ACC/NMI/ARI on the held-out split, pseudo-label accuracy on
the training set and seconds, then the median over seeds.

    python benchmarks/spc.py --seeds 3 [--config digits] [--set refine.epochs=30 ...] [--out DIR]
"""
from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from seeds import run_seeds  # benchmarks/seeds.py (python puts the script's folder on the path)

from scan.algo.metrics import cluster_to_class
from scan.core.checkpoint import read_json
from scan.pipeline import load_config, open_run, run_pipeline
from scan.pipeline.run import head_probs, load_stage_model, trained_stages

BASE_STAGES = ("pretext", "mine", "cluster")
VARIANTS = {   # name: (stages run on the copy, extra overrides, directory it copies)
    "selflabel": (("selflabel", "evaluate"), [], "base"),
    "spc": (("refine", "evaluate"), ["selflabel.enabled=false", "refine.method=spc"], "base"),
    "selflabel+spc": (("refine", "evaluate"), ["refine.method=spc"], "selflabel"),
}


def selflabel_pseudo_labels(run) -> dict:
    """Share and accuracy of the training images the cluster model labels with confidence > selflabel.threshold."""
    probs = head_probs(run, run.rt.prepare(load_stage_model(run, "cluster")), "train")[0].numpy()
    labels = run.train.labels
    pred = probs.argmax(1)
    mapping = cluster_to_class(pred, labels, probs.shape[1], run.info["num_classes"])
    confident = probs.max(1) > run.cfg.selflabel.threshold
    return {"confident": int(confident.sum()), "acc_confident": float((mapping[pred] == labels)[confident].mean())}


def one_seed(config: str, seed: int, overrides: list[str], root: Path) -> dict:
    common = overrides + [f"seed={seed}", "quiet=true"]
    base = open_run(load_config(config, common), root / "base")
    run_pipeline(base, BASE_STAGES)
    out = {"seed": seed, "seconds_base": sum(read_json(base.path(s, "done.json"))["seconds"] for s in BASE_STAGES),
           "selflabel_pseudo_labels": selflabel_pseudo_labels(base)}
    for name, (stages, extra, source) in VARIANTS.items():
        shutil.copytree(root / source, root / name, dirs_exist_ok=True)
        run = open_run(load_config(config, common + extra), root / name)
        metrics = run_pipeline(run, stages)
        stage = metrics["final_stage"]
        result = {k: metrics[stage][k] for k in ("acc", "nmi", "ari")}
        result["seconds"] = sum(read_json(run.path(s, "done.json"))["seconds"] for s in trained_stages(run)
                                if s != "cluster")
        if stage == "refine":
            result["rounds"] = read_json(run.path("refine", "done.json"))["rounds"]
        out[name] = result
    return out


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for name in VARIANTS:
        row = {k: statistics.median(r[name][k] for r in runs) for k in ("acc", "nmi", "ari", "seconds")}
        rounds = [r[name]["rounds"] for r in runs if "rounds" in r[name]]
        for key in ("strong_prime", "strong", "acc_strong_prime", "acc_strong", "acc_weak"):
            for which, at in (("first", 0), ("last", -1)):
                values = [rs[at][key] for rs in rounds if rs[at].get(key) is not None]
                if values:
                    row[f"{which}_round_{key}"] = statistics.median(values)
        summary[name] = row
    summary["selflabel"]["acc_confident"] = statistics.median(
        r["selflabel_pseudo_labels"]["acc_confident"] for r in runs)
    summary["selflabel"]["confident"] = statistics.median(r["selflabel_pseudo_labels"]["confident"] for r in runs)
    summary["cluster_seconds_median"] = statistics.median(r["seconds_base"] for r in runs)
    return summary


def main(argv=None) -> int:
    return run_seeds(argv, "digits", "scan-spc-", one_seed, summarise, "median")


if __name__ == "__main__":
    sys.exit(main())
