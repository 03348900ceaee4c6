"""The SPC paper's protocol against our default, and the paper's open choices, on one SCAN checkpoint.

For each seed the pretext, mine and cluster stages of `--config` (default digits-spc) run once;
each variant then refines a copy of that run directory, so all start from the same cluster model:

    selflabel        our default pipeline: self-labelling, no SPC
    spc-once         SPC with the pseudo-labels built once (refine.rounds = 1, the old default)
    spc-paper        the config as shipped: SPC instead of self-labelling, labels rebuilt each round
                     (refine.weak_labels soft, refine.rank_by propagated)
    spc-hard-weak    spc-paper with refine.weak_labels = hard
    spc-rank-predicted  spc-paper with refine.rank_by = predicted

Prints JSON: per seed and variant held-out ACC/NMI/ARI and seconds, then per variant the median,
min and max over seeds. Digits: about 4 minutes per seed on 2 cores (much longer when they are
shared). Fashion-MNIST (hours on a CPU; run it on a machine of your own):

    python benchmarks/spc_protocol.py --seeds 3 [--config digits-spc] [--set refine.epochs=30 ...] [--out DIR]
    python benchmarks/spc_protocol.py --seeds 3 --config fashion-mnist-spc --set data.path=DIR
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from seeds import run_seeds, spread  # benchmarks/seeds.py (python puts the script's folder on the path)

from scan.core.checkpoint import read_json
from scan.pipeline import load_config, open_run, run_pipeline

BASE_STAGES = ("pretext", "mine", "cluster")
REFINE = ("refine", "evaluate")
VARIANTS = {   # name: (stages run on a copy of the base run, overrides on top of the config)
    "selflabel": (("selflabel", "evaluate"), ["selflabel.enabled=true", "refine.method=none"]),
    "spc-once": (REFINE, ["refine.rounds=1"]),
    "spc-paper": (REFINE, []),
    "spc-hard-weak": (REFINE, ["refine.weak_labels=hard"]),
    "spc-rank-predicted": (REFINE, ["refine.rank_by=predicted"]),
}
METRICS = ("acc", "nmi", "ari")


def one_seed(config: str, seed: int, overrides: list[str], root: Path) -> dict:
    common = overrides + [f"seed={seed}", "quiet=true"]
    base = open_run(load_config(config, common), root / "base")
    run_pipeline(base, BASE_STAGES)
    out: dict = {"seed": seed}
    for name, (stages, extra) in VARIANTS.items():
        shutil.copytree(root / "base", root / name, dirs_exist_ok=True)
        run = open_run(load_config(config, common + extra), root / name)
        metrics = run_pipeline(run, stages)
        stage = metrics["final_stage"]
        out.setdefault("cluster", {k: metrics["cluster"][k] for k in METRICS})   # the shared starting point
        out[name] = {**{k: metrics[stage][k] for k in METRICS},
                     "seconds": read_json(run.path(stages[0], "done.json"))["seconds"]}
        if stage == "refine":
            last = read_json(run.path("refine", "done.json"))["rounds"][-1]
            out[name]["last_round"] = {k: last.get(k) for k in ("strong_prime", "strong", "acc_strong", "acc_weak")}
    return out


def summarise(runs: list[dict]) -> dict:
    """Median and spread (min, max) over seeds of every variant's ACC/NMI/ARI and seconds."""
    summary = {}
    for name in VARIANTS:
        row = {}
        for key in METRICS + ("seconds",):
            values = [r[name][key] for r in runs]
            row[key] = spread(values)
        summary[name] = row
    return summary


def main(argv=None) -> int:
    return run_seeds(argv, "digits-spc", "scan-spc-protocol-", one_seed, summarise, "summary")


if __name__ == "__main__":
    sys.exit(main())
