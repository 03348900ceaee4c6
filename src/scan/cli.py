"""Command-line interface: `scan run` chains every stage; each stage is also a subcommand."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scan.checkpoint import ArtifactError
from scan.config import ConfigError, builtin_config_names, flatten, load_config, parse_override, _merge, _read_yaml
from scan.data import DataError
from scan.engine import StageError
from scan.inference import RunError
from scan.rundir import CONFIG_FILE, is_run_dir

USER_ERRORS = (ConfigError, DataError, StageError, RunError, ArtifactError, FileNotFoundError)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help=f"YAML file or built-in config ({', '.join(builtin_config_names())}); "
                                          "default: digits, or automatic defaults when --data is given")
    p.add_argument("--data", help="image folder, .npz file or data-set folder (sets data.path)")
    p.add_argument("--dataset", help="data-set format/name (sets data.dataset; default auto-detected from --data)")
    p.add_argument("--num-clusters", type=int, help="number of clusters C (sets data.num_clusters)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="use first-level sub-folder names as ground truth for evaluation")
    p.add_argument("--out", "-o", help="run directory (default runs/<name>); an existing run is continued with "
                                       "its own config.yaml, plus any --config/--set given")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set cluster.epochs=50 (repeatable)")
    p.add_argument("--restart", action="store_true", help="ignore finished stages and checkpoints; start afresh")
    p.add_argument("--pretrained", metavar="NAME|FILE",
                   help="skip pretext training: cluster cached features of a frozen network, efficientnet_lite0|1|2 "
                        "(ImageNet) or a backbone state-dict FILE for model.backbone (applies configs/pretrained.yaml)")
    p.add_argument("--refine", choices=("none", "spc"),
                   help="refinement after self-labelling: spc = hierarchical pseudo-labels (sets refine.method)")


def _user_overrides(args) -> dict:
    data: dict = {}
    for text in args.overrides:
        data = _merge(data, parse_override(text))
    shortcuts = {
        ("data", "path"): args.data, ("data", "dataset"): args.dataset, ("data", "num_clusters"): args.num_clusters,
        ("device",): args.device, ("seed",): args.seed, ("refine", "method"): args.refine,
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
    if args.pretrained:
        data = _merge(_pretrained_overrides(args.pretrained), data)
    return data


def _pretrained_overrides(value: str) -> dict:
    """--pretrained: the built-in `pretrained` settings with a network name or a checkpoint file."""
    from scan.pretrained import LITE_MODELS, list_pretrained
    overlay = _read_yaml("pretrained")
    if value in LITE_MODELS:
        overlay["model"] = {"backbone": value}
        overlay["data"] = {"image_size": LITE_MODELS[value].input_size}   # image folders: read at its resolution
    elif Path(value).is_file():
        overlay["model"] = {"init_checkpoint": value}   # the architecture comes from model.* as usual
    else:
        raise ConfigError(f"--pretrained {value}: neither a pretrained network ({'|'.join(list_pretrained())}) "
                          f"nor an existing state-dict file")
    return overlay


def build_config(args):
    """Resolve the configuration; with --data and no --config, pick defaults from the data itself.

    An existing run (--out RUN) starts from its own config.yaml: a stage subcommand or a rerun
    must continue that run, not replace it with the built-in defaults.
    """
    from scan.defaults import auto_defaults
    from scan.run import load_data
    user = _user_overrides(args)
    if args.out and not args.config and is_run_dir(args.out) and (Path(args.out) / CONFIG_FILE).is_file():
        return load_config(str(Path(args.out) / CONFIG_FILE), user), None
    if args.config or not args.data:
        return load_config(args.config or "digits", user), None
    cfg = load_config(None, user)
    data = load_data(cfg)
    auto = auto_defaults(cfg, data[0])
    resolved = load_config(None, _merge(auto, user))
    if not cfg.quiet and auto:
        print("scan: no --config given; chose defaults from the data: "
              + ", ".join(f"{k}={v}" for k, v in flatten(auto)), file=sys.stderr)
    if not cfg.quiet:
        _print_estimate(resolved, data)
    return resolved, data


def _print_estimate(cfg, data) -> None:
    """Time each stage will take, from a short timing of the backbone on this machine."""
    from scan.defaults import estimate_seconds, training_rate
    from scan.engine import resolve_device
    train, evaluation = data
    shape = train.images.shape
    rate = training_rate(cfg, int(shape[1]), int(shape[-1]), resolve_device(cfg.device))
    seconds = estimate_seconds(cfg, len(train), len(evaluation) if evaluation is not train else 0, rate)
    print("scan: estimated time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
          + f" (total {sum(seconds.values()) / 60:.1f} min; {rate:.0f} images/s through the backbone)",
          file=sys.stderr)


def default_run_dir(cfg, args) -> Path:
    if args.out:
        return Path(args.out)
    name = Path(cfg.data.path).stem if cfg.data.path else cfg.data.dataset
    if cfg.pretext.method == "pretrained":   # next to, not over, a from-scratch run on the same data
        name += f"-{cfg.model.backbone}"
    return Path("runs") / f"{name}-seed{cfg.seed}"


def cmd_stages(args, stages) -> int:
    from scan.pipeline import open_run, run_pipeline, summary_line
    cfg, data = build_config(args)
    run = open_run(cfg, default_run_dir(cfg, args), restart=args.restart, data=data)
    metrics = run_pipeline(run, stages)
    if "evaluate" in stages:
        print(summary_line(run, metrics))
        from scan.inference import write_train_assignments
        from scan.report import write_run_report
        write_train_assignments(run)
        print(f"report: {write_run_report(run)}")
    return 0


# ------------------------------------------------------------------------ using a trained run

def cmd_report(args) -> int:
    from scan.report import write_report
    print(write_report(args.run_dir, args.device))
    return 0


def cmd_name(args) -> int:
    from scan.inference import cluster_title, load_names, set_names
    names = set_names(args.run_dir, args.names) if args.names else load_names(args.run_dir)
    for cluster, name in sorted(names.items()):
        print(f"{cluster}\t{cluster_title(cluster, names)}")
    if args.names:
        print(f"saved; `scan report {args.run_dir}` shows the names in report.html", file=sys.stderr)
    elif not names:
        print(f"no cluster is named yet: scan name {args.run_dir} 0=NAME 1=NAME ...", file=sys.stderr)
    return 0


def _check_out_file(out, example: str) -> None:
    """--out of predict/export names a file to write: refuse a folder before any work is done."""
    if out and Path(out).is_dir():
        raise RunError(f"--out {out} is a folder; give a file name, e.g. --out {Path(out) / example}")


def cmd_predict(args) -> int:
    from scan.checkpoint import atomic_write_text
    from scan.images_in import load_image_paths
    from scan.inference import assignments_csv, load_names, open_trained_run, predict_images
    _check_out_file(args.out, "predictions.csv")
    run = open_trained_run(args.run_dir, args.device)
    images = load_image_paths(args.images, run.info["image_shape"])
    found = predict_images(run, images.images, images.paths)
    table = assignments_csv(found.ids, found.probs, load_names(args.run_dir), found.trust, name_unknown=True)
    if args.out:
        atomic_write_text(Path(args.out), table)
        unknown = int(found.trust.unknown.sum())
        print(f"wrote {len(found.ids)} predictions to {args.out} ({unknown} unknown: like no training image)",
              file=sys.stderr)
    else:
        sys.stdout.write(table)
    return 0


def cmd_export(args) -> int:
    from scan.export import default_name, export_run
    _check_out_file(args.out, default_name(args.format))
    print(export_run(args.run_dir, args.out, args.format))
    return 0


TRAINED_RUN_COMMANDS = ("report", "name", "predict", "export")


def _add_trained_run_commands(sub) -> None:
    """Subcommands that use a finished run directory: report, name, predict, export."""
    from scan.export import FORMATS
    p = sub.add_parser("report", help="write RUN_DIR/report.html, a self-contained gallery of the clusters")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.set_defaults(handler=cmd_report)
    p = sub.add_parser("name", help="name clusters: scan name RUN_DIR 0=cats 3=\"red cars\" (no names: list them)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("names", nargs="*", metavar="ID=NAME", help="cluster id and its name; ID= removes a name")
    p.set_defaults(handler=cmd_name)
    p = sub.add_parser("predict", help="assign new images (files or folders) to the clusters of a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", "-o", help="CSV file to write (default: print the CSV)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.set_defaults(handler=cmd_predict)
    p = sub.add_parser("export", help="save the trained model as one file: images -> cluster probabilities, "
                                      "confidence, ood_score")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="torchscript", choices=FORMATS.names(),
                   help="torchscript (default), onnx (needs the `export` extra) or torch-export (.pt2)")
    p.add_argument("--out", "-o", help="output file (default RUN_DIR/model.torchscript.pt, model.onnx, model.pt2)")
    p.set_defaults(handler=cmd_export)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scan", description="SCAN: unsupervised image classification")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    # using a trained run needs no training code: the stage registry (which imports it) is skipped
    if not (argv and argv[0] in TRAINED_RUN_COMMANDS):
        from scan.pipeline import STAGES
        p = sub.add_parser("run", help="run (or resume) the whole pipeline: " + " -> ".join(STAGES))
        _add_run_options(p)
        for stage in STAGES:
            p = sub.add_parser(stage, help=f"run only the {stage} stage (its inputs must exist in the run directory)")
            _add_run_options(p)
    _add_trained_run_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="scan: %(message)s")
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        stages = STAGES if args.command == "run" else (args.command,)
        return cmd_stages(args, stages)
    except USER_ERRORS as e:
        print("scan: error: " + " ".join(str(e).splitlines()), file=sys.stderr)   # always one line
        return 2
    except MemoryError:
        print("scan: error: out of memory; lower data.image_size or the batch sizes, or use fewer images "
              "(finished stages and checkpoints are kept: rerun to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scan: interrupted; the last finished epoch is checkpointed: rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
