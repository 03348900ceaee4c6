"""Wall time of `scan --help`, `scan run --help` and `scan --version` in a fresh interpreter, next to
a bare `python -c pass` (the interpreter's own start-up, which the CLI cannot go below).

Prints JSON: the median of N runs of each, in seconds. The target is under 1 s for `scan --help`.

    python benchmarks/cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMANDS = {"python -c pass": ["-c", "pass"], "scan --help": ["-m", "scan.cli", "--help"],
            "scan run --help": ["-m", "scan.cli", "run", "--help"], "scan --version": ["-m", "scan.cli", "--version"]}


def seconds(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": SRC}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    result = {name: round(statistics.median(seconds(args) for _ in range(repeats)), 3)
              for name, args in COMMANDS.items()}
    print(json.dumps({"median_seconds": result, "repeats": repeats, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
