"""What the benchmarks that drive `scan` on the built data sets share: the command run in-process with
its summary lines kept off the benchmark's JSON, and the command line (sets, root, data folder, --set)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from scan.cli import main as _scan_main


def scan(args: list[str]) -> int:
    """`scan ARGS` in this process, its summary lines on stderr: stdout is the benchmark's JSON."""
    with contextlib.redirect_stdout(sys.stderr):
        return _scan_main(args)


def parse_seed_args(description: str, root: str) -> argparse.Namespace:
    """--seeds N (seeds 0..N-1), --root (where the run directories go), --set KEY=VALUE."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--root", default=root)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args()


def parse_args(description: str, sets: tuple[str, ...], root: str) -> tuple[argparse.Namespace, Path, Path]:
    """--sets, --root (run directories in ROOT/runs), --data-dir (default ROOT/data), --set KEY=VALUE;
    returns (args, root, data folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sets", nargs="+", default=list(sets), choices=sets)
    p.add_argument("--root", default=root, help="run directories go here (ROOT/runs)")
    p.add_argument("--data-dir", help="where the data sets are built (default ROOT/data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    root_dir = Path(args.root)
    return args, root_dir, Path(args.data_dir) if args.data_dir else root_dir / "data"
