"""Command-line interface: `scan run` chains every stage; each stage is also a subcommand.

The parser is built without importing torch (or anything that does): `scan --help` and
`scan --version` answer at once, and a command imports only what it uses.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from scan import __version__
from scan.config import Config, builtin_config_names, config_yaml
from scan.core.errors import ArtifactError, ConfigError, RunError, StageError, typed

# the pipeline's stages in order: a static copy of the stage registry (scan.pipeline.stage), which imports
# the training code; tests/test_cli.py checks that the two agree
STAGE_NAMES = ("pretext", "choose", "mine", "cluster", "selflabel", "refine", "evaluate")
# options that only some stage subcommands use (`scan run` takes them all)
STAGE_OPTIONS = {"pretext": ("pretrained", "log"), "choose": (), "mine": (), "cluster": ("log",), "selflabel": ("log",),
                 "refine": ("refine", "log"), "evaluate": ()}
ALL_OPTIONS = ("log", "pretrained", "refine")   # what `scan run` takes
LOG_CHOICES = Config.__dataclass_fields__["log"].metadata["choices"]   # the config field `log` (scan.train.logs)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are user mistakes (one line, exit 2); imported only once a command runs."""
    from scan.data import DataError  # imports torch: `scan --help` does not
    return ConfigError, DataError, StageError, RunError, ArtifactError, FileNotFoundError


def _num_clusters(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def _add_config_options(p: argparse.ArgumentParser, extra: tuple[str, ...]) -> None:
    """Options that resolve the configuration (every stage, `run` and `config show`)."""
    p.add_argument("--config", "-c", help=f"YAML file or built-in config ({', '.join(builtin_config_names())}); "
                                          "default: digits, or automatic defaults when --data is given")
    p.add_argument("--data", help="image folder, .npz file or data-set folder (sets data.path)")
    p.add_argument("--dataset", help="data-set format/name (sets data.dataset; default auto-detected from --data)")
    p.add_argument("--num-clusters", type=_num_clusters, metavar="C|auto",
                   help="number of clusters C, or auto: chosen without labels (sets data.num_clusters; default: "
                        "the number of classes, auto for data without labels)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="use first-level sub-folder names as ground truth for evaluation")
    p.add_argument("--run-dir", "--out", "-o", dest="run_dir", metavar="RUN_DIR",
                   help="run directory (default runs/<name>); an existing run is continued with its own "
                        "config.yaml, plus any --config/--set given (--out is the older spelling)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set cluster.epochs=50 (repeatable)")
    if "pretrained" in extra:
        p.add_argument("--pretrained", metavar="NAME|FILE|none",
                       help="skip pretext training: cluster cached features of a frozen network, "
                            "efficientnet_lite0|1|2 (ImageNet) or a backbone state-dict FILE for model.backbone "
                            "(applies config/builtin/pretrained.yaml); a folder of colour photos gets efficientnet_lite0 "
                            "unless --config is given; none (or --from-scratch) trains the network from scratch")
        p.add_argument("--from-scratch", action="store_true",
                       help="train the network from scratch even on a folder of photos (same as --pretrained none)")
    if "refine" in extra:
        p.add_argument("--refine", choices=("none", "spc"),
                       help="refinement after self-labelling: spc = hierarchical pseudo-labels (sets refine.method)")
    if "log" in extra:
        p.add_argument("--log", choices=LOG_CHOICES,
                       help="also write TensorBoard event files to RUN_DIR/tensorboard (sets log; needs "
                            "pip install 'scan-clustering[tensorboard]'); RUN_DIR/metrics.csv is always written")


def _add_run_options(p: argparse.ArgumentParser, extra: tuple[str, ...] = ALL_OPTIONS) -> None:
    _add_config_options(p, extra)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones (sets compile: true)")
    p.add_argument("--restart", action="store_true", help="ignore finished stages and checkpoints; start afresh")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip report.html after evaluate, e.g. for many runs on a cluster (`scan report RUN_DIR` "
                        "writes it later); assignments.csv is still written")


def default_run_dir(cfg, args) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    name = Path(cfg.data.path).stem if cfg.data.path else cfg.data.dataset
    from scan.train.sources import source_class
    if source_class(cfg).frozen:   # next to, not over, a from-scratch run on the same data
        name += f"-{cfg.model.backbone}"
    return Path("runs") / f"{name}-seed{cfg.seed}"


def cmd_stages(args, stages) -> int:
    """Status goes to stderr; the result (summary line, report path) to stdout."""
    from scan.pipeline import open_run, run_pipeline, summary_line
    from scan.pipeline.resolve import build_config
    cfg, data = build_config(args)
    run = open_run(cfg, default_run_dir(cfg, args), restart=args.restart, data=data)
    metrics = run_pipeline(run, stages)
    if "evaluate" in stages:
        print(summary_line(run, metrics))
        from scan.report import write_run_report
        from scan.use.inference import finished_run, write_train_assignments
        trained = finished_run(run, metrics)
        write_train_assignments(trained)
        if args.report:
            print(f"report: {write_run_report(trained)}")
    return 0


def cmd_config_show(args) -> int:
    """The resolved configuration as YAML, without running anything (and without creating a folder)."""
    from scan.pipeline.resolve import build_config
    cfg, _ = build_config(args)
    sys.stdout.write(config_yaml(cfg))
    return 0


# ------------------------------------------------------------------------ using a trained run

def cmd_report(args) -> int:
    from scan.report import write_report
    print(write_report(args.run_dir, args.device))
    return 0


def cmd_name(args) -> int:
    from scan.use.inference import cluster_title, load_names, open_trained_run, set_names
    run = open_trained_run(args.run_dir, "cpu")
    names = set_names(run, args.names) if args.names else load_names(run)
    for cluster, name in sorted(names.items()):
        print(f"{cluster}\t{cluster_title(cluster, names)}")
    if args.names:
        print(f"saved; `scan report {typed(args.run_dir)}` shows the names in report.html", file=sys.stderr)
    elif not names:
        print(f"no cluster is named yet: scan name {typed(args.run_dir)} 0=NAME 1=NAME ...", file=sys.stderr)
    return 0


def _check_out_file(args, example: str, inputs=()) -> None:
    """--out of predict/export names a new file to write, checked before any work is done: not a folder,
    not a file of the run directory or an input, and an existing file only with --overwrite."""
    if not args.out:
        return
    out = Path(args.out)
    if out.is_dir():
        raise RunError(f"--out {out} is a folder; give a file name, e.g. --out {out / example}")
    # realpath, not Path.resolve: a link loop among the inputs must not crash the check
    target, run_dir = Path(os.path.realpath(out)), Path(os.path.realpath(args.run_dir))
    if run_dir in target.parents:
        raise RunError(f"--out {out} is inside the run directory {args.run_dir}, whose files scan manages; "
                       f"write it elsewhere")
    if any(Path(os.path.realpath(p)) == target for p in inputs):
        raise RunError(f"--out {out} is one of the images to predict; give another file name")
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    if out.exists() and not args.overwrite:
        raise RunError(f"--out {out} exists: pass --overwrite to replace it, or give another file name")


def cmd_predict(args) -> int:
    from scan.core.checkpoint import atomic_write_text
    from scan.use.images_in import load_image_paths
    from scan.use.inference import assignments_csv, load_names, open_trained_run, predict_images
    _check_out_file(args, "predictions.csv", args.images)
    run = open_trained_run(args.run_dir, args.device)
    images = load_image_paths(args.images, run.info["image_shape"])
    found = predict_images(run, images.images, images.paths)
    table = assignments_csv(found.ids, found.probs, load_names(run), found.trust, name_unknown=True)
    if args.out:
        atomic_write_text(Path(args.out), table)
        unknown = int(found.trust.unknown.sum())
        print(f"wrote {len(found.ids)} predictions to {args.out} ({unknown} unknown: like no training image)",
              file=sys.stderr)
    else:
        sys.stdout.write(table)
    return 0


def cmd_recluster(args) -> int:
    from scan.pipeline import summary_line
    from scan.pipeline.recluster import recluster
    from scan.report import write_run_report
    from scan.use.inference import finished_run, write_train_assignments
    sets = [*args.overrides, *(f"{k}={v}" for k, v in (("device", args.device), ("quiet", args.quiet or None)) if v)]
    run, metrics = recluster(args.run_dir, args.num_clusters, args.out, sets)
    print(summary_line(run, metrics))
    trained = finished_run(run, metrics)
    write_train_assignments(trained)
    print(f"report: {write_run_report(trained)}")
    return 0


def cmd_export(args) -> int:
    from scan.use.export import default_name, export_run
    _check_out_file(args, default_name(args.format))
    print(export_run(args.run_dir, args.out, args.format))
    return 0


TRAINED_RUN_COMMANDS = ("report", "name", "predict", "export")


def _export_formats(chosen: str | None) -> tuple[str, ...]:
    """scan.use.export imports torch: its formats are read only when `scan export` is the command
    (the other commands never parse the export options; its help line needs none)."""
    if chosen != "export":
        return ("",)
    from scan.use.export import FORMATS
    return tuple(FORMATS.names())


def _add_trained_run_commands(sub, chosen: str | None = None) -> None:
    """Subcommands that use a finished run directory: report, name, predict, recluster, export."""
    formats = _export_formats(chosen)
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.set_defaults(handler=cmd_predict)
    p = sub.add_parser("recluster", help="a finer or coarser partition of a finished run in a new run directory, "
                                         "reusing its pretext, features and neighbours (seconds, no pretext)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--num-clusters", type=int, required=True, metavar="C", help="the number of clusters")
    p.add_argument("--out", "-o", help="the new run directory (default RUN_DIR-cC, beside RUN_DIR)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of RUN_DIR's config.yaml (repeatable)")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")
    p.set_defaults(handler=cmd_recluster)
    p = sub.add_parser("export", help="save the trained model as one file: images -> cluster probabilities, "
                                      "confidence, ood_score")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="torchscript", choices=formats,
                   help="torchscript (default), onnx (needs the `export` extra) or torch-export (.pt2)")
    p.add_argument("--out", "-o", help="output file (default RUN_DIR/model.torchscript.pt, model.onnx, model.pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(handler=cmd_export)


def _add_pipeline_commands(sub, chosen: str | None) -> None:
    """`run`, one subcommand per stage (with the options that stage uses) and `config show`.

    Only the chosen command gets its options: the others need just their one-line help.
    """
    commands = {"run": ("run (or resume) the whole pipeline: " + " -> ".join(STAGE_NAMES), ALL_OPTIONS)}
    for stage in STAGE_NAMES:
        commands[stage] = (f"run only the {stage} stage (its inputs must exist in the run directory)",
                           STAGE_OPTIONS[stage])
    for name, (text, extra) in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            _add_run_options(p, extra)
    p = sub.add_parser("config", help="show the resolved configuration (scan config show ...) without running")
    if chosen == "config":
        shows = p.add_subparsers(dest="action", required=True)
        show = shows.add_parser("show", help="print the configuration a `scan run` with these options would use, "
                                             "as YAML (with --data and no --config: the defaults chosen from the data)")
        _add_config_options(show, ALL_OPTIONS)
        show.set_defaults(handler=cmd_config_show, estimate=False)   # nothing runs: no time to estimate


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scan", description="SCAN: unsupervised image classification")
    parser.add_argument("--version", action="version", version=f"scan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and not argv[0].startswith("-") else None
    _add_pipeline_commands(sub, chosen)
    _add_trained_run_commands(sub, chosen)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="scan: %(message)s")
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        stages = STAGE_NAMES if args.command == "run" else (args.command,)
        return cmd_stages(args, stages)
    except MemoryError:
        print("scan: error: out of memory; lower data.image_size or the batch sizes, or use fewer images "
              "(finished stages and checkpoints are kept: rerun to resume)", file=sys.stderr)
        return 2
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print("scan: error: " + " ".join(str(e).splitlines()), file=sys.stderr)   # always one line
        return 2
    except KeyboardInterrupt:
        print("scan: interrupted; the last finished epoch is checkpointed: rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
