"""Typed run configuration: frozen dataclasses loaded from YAML plus dotted overrides.

A misspelt key is an error at load time (with a did-you-mean hint) and every numeric field
with a meaningful range is checked before any work starts, so a typo never turns into a
silently ignored setting hours into a GPU run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


def _range(lo=None, hi=None, lo_open=False, hi_open=False, choices=None, min_len=None):
    """Field metadata describing the allowed values (checked by `validate`); for a tuple field,
    the bounds apply to every element and min_len to its length."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "min_len": min_len}


def _f(default, **rng):
    return field(default=default, metadata=_range(**rng))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"          # registry name, or "auto" to guess from `path`
    path: str | None = None          # folder / file; None uses the data set's default location
    train_split: str = "train"
    eval_split: str = "val"
    image_size: int | None = _f(None, lo=4)   # folder images are resized to this; None = native
    labels_from_folders: bool = False
    num_clusters: int | None = _f(None, lo=2)  # None = number of ground-truth classes


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _f("resnet_small")
    width: int = _f(32, lo=4)               # channels of the first stage (resnet_small only)
    blocks: tuple[int, ...] = _f((1, 1, 1), lo=1, min_len=1)   # residual blocks per stage (resnet_small only)
    stem_stride: int = _f(1, lo=1, hi=4)    # resnet_small only
    projection_dim: int = _f(128, lo=2)
    # local backbone weights to start from (our backbone.pt or a torchvision-style ResNet, e.g. MoCo's);
    # wrappers like `module.`, `encoder_q.`, `backbone.` are stripped (models.load_backbone_weights)
    init_checkpoint: str | None = None


@dataclass(frozen=True)
class AugmentConfig:
    crop_min_scale: float = _f(0.2, lo=0.01, hi=1.0)
    flip: bool = True
    color_jitter: float = _f(0.4, lo=0.0, hi=1.0)   # brightness/contrast/saturation strength
    jitter_prob: float = _f(0.8, lo=0.0, hi=1.0)
    grayscale_prob: float = _f(0.2, lo=0.0, hi=1.0)
    strong_num_ops: int = _f(4, lo=0, hi=14)
    cutout_fraction: float = _f(0.5, lo=0.0, hi=1.0)   # cutout side / image side (16/32 in the paper)
    weak_translate: float = _f(0.125, lo=0.0, hi=0.5)  # max shift as a fraction of the side


@dataclass(frozen=True)
class TrainingConfig:
    """What every training stage sets: schedule length, batch and optimizer (scan.engine.build_optimizer).
    A stage's section overrides the defaults that differ for it."""
    epochs: int = _f(100, lo=0)
    batch_size: int = _f(128, lo=2)
    optimizer: str = _f("adam", choices=("sgd", "adam", "adamw"))
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = _f(1e-4, lo=0.0)
    momentum: float = _f(0.9, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PretextConfig(TrainingConfig):
    method: str = "simclr"        # a registered pretext method: simclr | moco | byol_queue | rotnet (scan.pretext)
    #                               or pretrained: a frozen network (model.backbone), heads on cached features
    epochs: int = _f(500, lo=0)
    batch_size: int = _f(512, lo=2)
    optimizer: str = _f("sgd", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.4, lo=0.0, lo_open=True)
    temperature: float | None = _f(None, lo=0.0, lo_open=True)   # None: the method's (SimCLR 0.1, MoCo/BYOL 0.2)
    warmup_epochs: int = _f(0, lo=0)
    queue_size: int = _f(65536, lo=1)        # MoCo/BYOL-queue negatives, capped at the data-set size
    ema_momentum: float | None = _f(None, lo=0.0, hi=1.0)   # None: MoCo 0.999 (fixed), BYOL m_base 0.996 (→ 1)
    cached_views: int = _f(0, lo=0)          # pretrained only: also cache features of V augmented views per image


@dataclass(frozen=True)
class MineConfig:
    method: str = "knn"           # the miner registry (scan.mining.MINERS): knn | multiview
    num_neighbors: int = _f(20, lo=1)
    # the space neighbours are searched in (scan.mining.MINING_SPACES): the pretext backbone's features,
    # PCA-whitened raw pixels, or both with equal weight (what the automatic defaults use: it never
    # falls far below the better of the two, and a weak pretext cannot make neighbours worse than pixels)
    features: str = "backbone"    # scan.mining.MINING_SPACES: backbone | pixels | backbone+pixels
    # multiview only: a clustering head trained briefly on plain kNN pairs (frozen backbone) ranks candidates
    head_epochs: int = _f(100, lo=1)
    head_lr: float = _f(1e-2, lo=0.0, lo_open=True)
    head_entropy_weight: float = _f(5.0, lo=0.0)


@dataclass(frozen=True)
class ClusterConfig(TrainingConfig):
    entropy_weight: float = _f(5.0, lo=0.0)
    num_heads: int = _f(10, lo=1)
    update_backbone: bool = True
    augment: str = _f("strong", choices=("strong", "simclr", "weak", "none"))
    head_hidden: int = _f(0, lo=0)           # 0: linear heads; else MLP heads with this many hidden units


@dataclass(frozen=True)
class SelfLabelConfig(TrainingConfig):
    enabled: bool = True
    epochs: int = _f(200, lo=0)
    batch_size: int = _f(1000, lo=2)
    threshold: float = _f(0.99, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    class_balance: bool = True
    ema_decay: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)   # 0 disables the EMA (0.999 in the paper)
    patience: int = _f(0, lo=0)     # stop after this many epochs without more confident samples; 0 = never
    # an epoch that shrinks any cluster below this fraction of its cluster-stage size is merging
    # clusters (confident errors feed on themselves): stop and keep the last epoch that did not; 0 = off
    min_cluster_keep: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class RefineConfig(TrainingConfig):
    """SPC refinement (hierarchical pseudo-labels, label propagation, mixup); the STL-10 setting."""
    method: str = _f("none", choices=("none", "spc"))
    threshold: float = _f(0.95, lo=0.0, hi=1.0, lo_open=True, hi_open=True)   # δ: confidence of the strong set S′
    top_fraction: float = _f(0.03, lo=0.0, hi=1.0, lo_open=True)   # r: per-class share of the data kept in S
    num_neighbors: int = _f(20, lo=1)           # k₂ of the propagation graph
    mu: float = _f(0.01, lo=0.0, lo_open=True)  # propagation weight γ = 1 / (1 + μ)
    cg_iterations: int = _f(20, lo=1)           # conjugate-gradient iterations per propagation
    alpha: float = _f(1.0, lo=0.0, lo_open=True)     # mixup λ ~ Beta(α, α)
    mix_weight: float = _f(1.0, lo=0.0)         # λ_M of the mixup loss term
    rounds: int = _f(1, lo=1)                   # pseudo-labels are rebuilt every ⌈epochs / rounds⌉ epochs
    epochs: int = _f(50, lo=0)
    batch_size: int = _f(256, lo=2)             # for S and for W
    optimizer: str = _f("sgd", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.03, lo=0.0, lo_open=True)
    weight_decay: float = _f(5e-4, lo=0.0)
    nesterov: bool = True


@dataclass(frozen=True)
class Config:
    seed: int = _f(0, lo=0, hi=2**32 - 1)   # the range numpy and scikit-learn generators accept
    device: str = "auto"
    quiet: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overriding

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# YAML 1.1 (PyYAML) reads a float only with a dot: 1e-3 stays a string, 1.0e-3 is a number.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp, key: str):
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the key."""
    if tp in (int, float) and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)
    origin = get_origin(tp)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, get_args(tp)[0], key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            did = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{did}; known keys: {', '.join(names)}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _check_range(key: str, value, meta: dict) -> None:
    if value is None or not meta:
        return
    if isinstance(value, tuple):
        if meta.get("min_len") and len(value) < meta["min_len"]:
            raise ConfigError(f"{key} must hold at least {meta['min_len']} value(s), got {list(value)}")
        for item in value:
            _check_range(key, item, {**meta, "min_len": None})
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None:
        bad = value <= lo if meta.get("lo_open") else value < lo
        if bad:
            raise ConfigError(f"{key} must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value}")
    if hi is not None:
        bad = value >= hi if meta.get("hi_open") else value > hi
        if bad:
            raise ConfigError(f"{key} must be {'<' if meta.get('hi_open') else '<='} {hi}, got {value}")


def validate(cfg, prefix: str = "") -> None:
    """Check every field against the range declared in its metadata."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
        else:
            _check_range(prefix + f.name, value, dict(f.metadata))


def check_choices(cfg: Config) -> None:
    """Names chosen from registries exist (with a did-you-mean), checked before any data is loaded."""
    from scan.data import DATASETS
    from scan.mining import MINERS, MINING_SPACES
    from scan.models import BACKBONES
    from scan.pretext import METHODS
    from scan.pretrained import LITE_MODELS
    if cfg.pretext.method != "pretrained":
        METHODS.check(cfg.pretext.method)
    if cfg.model.backbone not in LITE_MODELS or cfg.pretext.method != "pretrained":
        BACKBONES.check(cfg.model.backbone)
    if cfg.data.dataset.lower() != "auto":
        DATASETS.check(cfg.data.dataset.lower())
    MINERS.check(cfg.mine.method)
    MINING_SPACES.check(cfg.mine.features)


def flatten(nested: dict, separator: str = ".", prefix: str = ""):
    """{'cluster': {'epochs': 5}} -> ('cluster.epochs', 5) pairs; separator '__' gives scikit-learn's spelling."""
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from flatten(value, separator, f"{prefix}{key}{separator}")
        else:
            yield prefix + key, value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """Turn 'cluster.epochs=50' into {'cluster': {'epochs': 50}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def builtin_config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("scan.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(source)
    if not path.exists() and source in builtin_config_names():
        text = resources.files("scan.configs").joinpath(source + ".yaml").read_text()
        name = f"built-in config '{source}'"
    elif path.is_file():
        text, name = path.read_text(), str(path)
    else:
        raise ConfigError(
            f"config '{source}' is neither a YAML file nor a built-in config ({', '.join(builtin_config_names())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{name} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    # `base: other` starts from another config, so a variant states only what differs
    if base in seen + (source,):
        raise ConfigError(f"{name}: 'base: {base}' refers back to itself")
    return _merge(_read_yaml(base, seen + (source,)), data)


def load_config(source: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML file or built-in config name, apply dotted overrides, validate."""
    data = _read_yaml(source) if source else {}
    if isinstance(overrides, dict):
        data = _merge(data, overrides)
    else:
        for text in overrides or []:
            data = _merge(data, parse_override(text))
    cfg = _build(Config, data)
    validate(cfg)
    check_choices(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    check_choices(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    from scan.checkpoint import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
