"""Wall time of `scan --help`, `scan run --help` and `scan --version` in a fresh interpreter, next to
a bare `python -c pass` (the interpreter's own start-up, which the CLI cannot go below).

Prints JSON: the median of N runs of each, in seconds. The target is under 1 s for `scan --help`.

    python benchmarks/cli_startup.py [--repeats 5] [--src OTHER_CHECKOUT/src]   # --src: time another version
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMANDS = {"python -c pass": ["-c", "pass"], "scan --help": ["-m", "scan.cli", "--help"],
            "scan run --help": ["-m", "scan.cli", "run", "--help"], "scan --version": ["-m", "scan.cli", "--version"]}


def seconds(args: list[str], src: str) -> float:
    """Wall time of one run; NaN when the command fails (an older version without --version)."""
    env = {**os.environ, "PYTHONPATH": src}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, env=env)
    return time.perf_counter() - start if done.returncode == 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--src", default=SRC, help="the src/ folder whose scan is timed (default: this checkout's)")
    opts = parser.parse_args()
    result = {}
    for name, args in COMMANDS.items():
        median = statistics.median(seconds(args, opts.src) for _ in range(opts.repeats))
        result[name] = None if math.isnan(median) else round(median, 3)   # None: the command failed
    print(json.dumps({"median_seconds": result, "repeats": opts.repeats, "src": opts.src, "cpus": os.cpu_count()},
                     indent=1))


if __name__ == "__main__":
    main()
