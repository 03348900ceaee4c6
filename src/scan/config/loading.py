"""Loading a configuration: YAML files and built-in configs (with `base:`), dotted overrides,
type coercion, range checks and registry choices, all before any work starts."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from scan.config.schema import Config
from scan.core.errors import ConfigError


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
        if str in args[1:] and isinstance(value, str):   # a number or a word (data.num_clusters: 3 or auto)
            return value
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
    if isinstance(value, float) and not math.isfinite(value):   # NaN passes every comparison below
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if value is None or not meta:
        return
    if isinstance(value, str) and meta.get("words"):
        if value not in meta["words"]:
            raise ConfigError(f"{key} must be a number or one of {', '.join(meta['words'])}, got {value!r}")
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


def flatten(nested: dict, separator: str = ".", prefix: str = ""):
    """{'cluster': {'epochs': 5}} -> ('cluster.epochs', 5) pairs; separator '__' gives scikit-learn's spelling."""
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from flatten(value, separator, f"{prefix}{key}{separator}")
        else:
            yield prefix + key, value


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
    return sorted(p.name[:-5] for p in resources.files("scan.config.builtin").iterdir() if p.name.endswith(".yaml"))


MAX_BASE_DEPTH = 32   # configs built on configs: deeper than this is a loop or a mistake


def read_yaml(source: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(source)
    if not path.exists() and source in builtin_config_names():
        text = resources.files("scan.config.builtin").joinpath(source + ".yaml").read_text()
        name = f"built-in config '{source}'"
    elif path.is_file():
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:   # a picture, or YAML saved as UTF-16 by an editor
            raise ConfigError(f"{name} is not UTF-8 text; a config is a YAML file saved as UTF-8") from None
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
    if len(seen) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{name}: the chain of 'base:' configs is deeper than {MAX_BASE_DEPTH}")
    if base in seen + (source,):
        raise ConfigError(f"{name}: 'base: {base}' refers back to itself")
    return merge(read_yaml(base, seen + (source,)), data)


def read_config(source: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML file or built-in config name, apply dotted overrides, check types and ranges.

    Names chosen from registries (backbones, methods, ...) are checked one layer up, where the
    registries live (scan.pipeline.load_config); the saved config of an existing run was checked
    when the run was made."""
    data = read_yaml(source) if source else {}
    if isinstance(overrides, dict):
        data = merge(data, overrides)
    else:
        for text in overrides or []:
            data = merge(data, parse_override(text))
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_yaml(cfg: Config) -> str:
    """The configuration as the YAML text config.yaml holds (and `scan config show` prints)."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    from scan.core.checkpoint import atomic_write_text  # imports torch: reading a config (`scan --help`) does not
    atomic_write_text(path, config_yaml(cfg))
