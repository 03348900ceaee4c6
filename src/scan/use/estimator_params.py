"""Config overrides as scikit-learn parameters: `cluster__epochs=5` <-> {"cluster": {"epochs": 5}},
checked against the config's fields (with a did-you-mean) as scikit-learn refuses unknown parameters."""
from __future__ import annotations

import dataclasses
import difflib
from typing import get_type_hints

from scan.config import Config, merge
from scan.core.errors import ConfigError

SECTIONS = tuple(name for name, tp in get_type_hints(Config).items() if dataclasses.is_dataclass(tp))
# Config fields that constructor parameters or `fit(X)` set: an override of them would be ignored.
_OWNED = {("seed",): "seed=", ("device",): "device=", ("quiet",): "quiet=", ("data", "num_clusters"): "n_clusters=",
          ("data", "path"): "the images given to fit(X)"}


def _key_path(key) -> tuple[str, ...]:
    """'cluster__epochs', 'cluster.epochs' -> ('cluster', 'epochs')."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"config override keys must be non-empty strings, got {key!r}")
    return tuple(part for chunk in key.split("__") for part in chunk.split("."))


def _nested(overrides) -> dict:
    """Overrides as a new nested dict: {'cluster__epochs': 5, 'model': {'width': 8}} ->
    {'cluster': {'epochs': 5}, 'model': {'width': 8}}. Flat keys may use '__' or '.'."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict such as {{'cluster': {{'epochs': 5}}}} or "
                          f"{{'cluster__epochs': 5}}, got {overrides!r}")
    out: dict = {}
    for key, value in overrides.items():
        node = _nested(value) if isinstance(value, dict) else value   # fresh dicts: the caller's are never shared
        for part in reversed(_key_path(key)):
            node = {part: node}
        out = merge(out, node)
    return out


_ABSENT = object()


def _lookup(nested: dict, path: tuple[str, ...]):
    """The value at `path` in nested overrides, or _ABSENT."""
    node = nested
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _check_key(path: tuple[str, ...]) -> None:
    """A config field must exist (with a did-you-mean), as scikit-learn refuses an unknown parameter."""
    cls = Config
    for depth, part in enumerate(path):
        where = "__".join(path[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{'__'.join(path)}': {where} is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            hint = difflib.get_close_matches(part, names, n=1)
            did = f" (did you mean '{where + '__' if where else ''}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{'__'.join(path)}'{did}; known keys"
                              f"{' of ' + where if where else ''}: {', '.join(names)}")
        cls = get_type_hints(cls)[part]
