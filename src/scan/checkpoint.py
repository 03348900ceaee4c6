"""Atomic artifact writes and training-state checkpoints.

Every file goes to a temporary sibling, is fsynced and then renamed over the target, so a
process killed at any instant leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    _atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# Wrappers that prefix a backbone's keys in other tools' checkpoints: DataParallel (`module.`),
# MoCo's query encoder (`encoder_q.`) and our own ContrastiveModel / pretext modules (`backbone.`).
STATE_PREFIXES = ("module.", "encoder_q.", "backbone.")


def strip_prefixes(state: dict, prefixes: tuple[str, ...] = STATE_PREFIXES) -> dict:
    """Remove any chain of leading wrapper prefixes from every key.

    'module.encoder_q.backbone.trunk.stem.0.weight' -> 'trunk.stem.0.weight'. Keys under other
    names (a projection 'head.', MoCo's 'encoder_k.') keep them, so a caller selecting the keys
    of its model ignores them. When two keys strip to the same name the first one is kept.
    """
    out: dict = {}
    for key, value in state.items():
        stripped = key
        while stripped.startswith(prefixes):
            stripped = stripped[next(len(p) for p in prefixes if stripped.startswith(p)):]
        out.setdefault(stripped, value)
    return out
