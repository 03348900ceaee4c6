"""Cost of the per-epoch checkpoints: seconds per save vs seconds per epoch, per training stage.

Runs the built-in pipeline once (or reads an existing run directory) and prints JSON from the
per-epoch `seconds` / `checkpoint_seconds` that every stage records in `<stage>/done.json`.

    python benchmarks/checkpoint_overhead.py [--config digits] [--run-dir DIR] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from digits import one_run  # noqa: E402

from scan.core.checkpoint import read_json  # noqa: E402

TRAINING_STAGES = ("pretext", "cluster", "selflabel", "refine")


def overhead(run_dir: Path) -> dict:
    result = {}
    for stage in TRAINING_STAGES:
        history = (read_json(run_dir / stage / "done.json") or {}).get("history") or []
        epochs = [h for h in history if "checkpoint_seconds" in h]
        if not epochs:
            continue
        epoch_s = statistics.median(h["seconds"] for h in epochs)
        save_s = statistics.median(h["checkpoint_seconds"] for h in epochs)
        size = (run_dir / stage / "model.pt").stat().st_size if (run_dir / stage / "model.pt").exists() else None
        result[stage] = {"epochs": len(epochs), "epoch_seconds_median": epoch_s,
                         "checkpoint_seconds_median": save_s, "overhead_percent": 100 * save_s / epoch_s,
                         "model_file_bytes": size}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="digits")
    parser.add_argument("--run-dir", help="read this finished run instead of running the pipeline")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="scan-ckpt-")) / "run"
    if not args.run_dir:
        one_run(args.config, 0, list(args.overrides), run_dir)
    print(json.dumps({"config": args.config, "run_dir": str(run_dir), "stages": overhead(run_dir)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
