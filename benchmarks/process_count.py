"""Does the result depend on the number of processes? `scan run` (built-in digits) in one process and under
`torchrun --nproc-per-node=2` (gloo, one thread each), over several seeds (issue 26).

Prints JSON: held-out ACC/NMI of every stage per seed and process count, the medians and spreads, and
whether the 2-process median lies within the 1-process spread (the question asked; one seed proves
nothing either way).

    python benchmarks/process_count.py [--seeds 3] [--root bench-processes] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from runs_common import parse_seed_args  # noqa: E402

STAGES = ("cluster", "selflabel")


def run(root: Path, processes: int, seed: int, overrides: list[str]) -> dict:
    """One `scan run` of the built-in digits; returns metrics.json."""
    out = root / f"{processes}p-seed{seed}"
    sets = [a for o in overrides for a in ("--set", o)]
    args = ["-m", "scan", "run", "--out", str(out), "--seed", str(seed), "--quiet", *sets]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(2 // processes)}
    if processes == 1:
        command = [sys.executable, *args]
    else:   # torchrun's own launcher, as a user would start it (the module form of `torchrun ... -m scan run`)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   *args]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    args = parse_seed_args(__doc__.splitlines()[0], "bench-processes")
    root = Path(args.root)
    results: dict = {"overrides": args.overrides, "runs": {}}
    for processes in (1, 2):
        for seed in range(args.seeds):
            metrics = run(root, processes, seed, args.overrides)
            results["runs"][f"{processes}p-seed{seed}"] = {
                stage: {k: round(metrics[stage][k], 4) for k in ("acc", "nmi")} for stage in STAGES if stage in metrics}
            print(json.dumps({f"{processes}p-seed{seed}": results["runs"][f"{processes}p-seed{seed}"]}),
                  file=sys.stderr, flush=True)
    final = {n: [results["runs"][f"{n}p-seed{s}"][STAGES[-1]]["acc"] for s in range(args.seeds)] for n in (1, 2)}
    results["final_acc"] = {f"{n}p": {"per_seed": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
                            for n, v in final.items()}
    results["two_process_median_within_one_process_spread"] = min(final[1]) <= statistics.median(final[2]) <= max(final[1])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
