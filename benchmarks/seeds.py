"""The command line shared by the benchmarks that run one config over several seeds."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable


def run_seeds(argv, default_config: str, prefix: str, one_seed: Callable[[str, int, list[str], Path], dict],
              summarise: Callable[[list[dict]], dict], summary_key: str = "summary") -> int:
    """Parse --config/--seeds/--set/--out, run `one_seed` per seed (each line of JSON on stderr as it
    finishes) and print the runs and `summarise(runs)` as JSON on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="keep run directories here; a rerun reuses finished stages")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=prefix))
    runs = []
    for seed in range(args.seeds):
        runs.append(one_seed(args.config, seed, args.overrides, root / f"seed{seed}"))
        print(json.dumps(runs[-1]), file=sys.stderr)
    print(json.dumps({"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
                      summary_key: summarise(runs), "runs": runs}, indent=2))
    return 0


def spread(values: list[float]) -> dict:
    """Median, min and max of a measurement over seeds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def emit(result: dict, path: str | None) -> int:
    """Print a benchmark's JSON on stdout and, when asked, keep it in `path`."""
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    print(text)
    return 0
