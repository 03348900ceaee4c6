"""Command-line interface: `scan run` chains every stage; each stage is also a subcommand."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scan.config import ConfigError, builtin_config_names, load_config, parse_override, _merge
from scan.data import DataError
from scan.engine import StageError

USER_ERRORS = (ConfigError, DataError, StageError, FileNotFoundError)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help=f"YAML file or built-in config ({', '.join(builtin_config_names())}); "
                                          "default: digits, or automatic defaults when --data is given")
    p.add_argument("--data", help="image folder, .npz file or data-set folder (sets data.path)")
    p.add_argument("--dataset", help="data-set format/name (sets data.dataset; default auto-detected from --data)")
    p.add_argument("--num-clusters", type=int, help="number of clusters C (sets data.num_clusters)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="use first-level sub-folder names as ground truth for evaluation")
    p.add_argument("--out", "-o", help="run directory (default runs/<name>)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set cluster.epochs=50 (repeatable)")
    p.add_argument("--restart", action="store_true", help="ignore finished stages and checkpoints; start afresh")


def _user_overrides(args) -> dict:
    data: dict = {}
    for text in args.overrides:
        data = _merge(data, parse_override(text))
    shortcuts = {
        ("data", "path"): args.data, ("data", "dataset"): args.dataset, ("data", "num_clusters"): args.num_clusters,
        ("device",): args.device, ("seed",): args.seed,
        ("quiet",): True if args.quiet else None,
        ("data", "labels_from_folders"): True if args.labels_from_folders else None,
    }
    for keys, value in shortcuts.items():
        if value is None:
            continue
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    if args.data and not args.dataset and not args.config:
        data.setdefault("data", {}).setdefault("dataset", "auto")
    return data


def build_config(args):
    """Resolve the configuration; with --data and no --config, pick defaults from the data itself."""
    from scan.pipeline import auto_defaults, load_data
    user = _user_overrides(args)
    if args.config or not args.data:
        return load_config(args.config or "digits", user), None
    cfg = load_config(None, user)
    data = load_data(cfg)
    auto = auto_defaults(cfg, data[0])
    if not cfg.quiet:
        print("scan: no --config given; chose defaults from the data: "
              + ", ".join(f"{k}={v}" for k, v in _flatten(auto)), file=sys.stderr)
    return load_config(None, _merge(auto, user)), data


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def default_run_dir(cfg, args) -> Path:
    if args.out:
        return Path(args.out)
    name = Path(cfg.data.path).stem if cfg.data.path else cfg.data.dataset
    return Path("runs") / f"{name}-seed{cfg.seed}"


def cmd_stages(args, stages) -> int:
    from scan.pipeline import open_run, run_pipeline, summary_line
    cfg, data = build_config(args)
    run = open_run(cfg, default_run_dir(cfg, args), restart=args.restart, data=data)
    metrics = run_pipeline(run, stages)
    if "evaluate" in stages:
        print(summary_line(run, metrics))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scan", description="SCAN: unsupervised image classification")
    sub = parser.add_subparsers(dest="command", required=True)
    from scan.pipeline import STAGES
    p = sub.add_parser("run", help="run (or resume) the whole pipeline: " + " -> ".join(STAGES))
    _add_run_options(p)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run only the {stage} stage (its inputs must exist in the run directory)")
        _add_run_options(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="scan: %(message)s")
    try:
        stages = STAGES if args.command == "run" else (args.command,)
        return cmd_stages(args, stages)
    except USER_ERRORS as e:
        print(f"scan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scan: interrupted; the last finished epoch is checkpointed: rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
