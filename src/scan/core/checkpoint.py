"""Atomic artifact writes, safe loading and training-state checkpoints.

Every file goes to a temporary sibling, is fsynced and then renamed over the target, so a
process killed at any instant leaves either the old or the new file, never a torn one. The
temporary name carries our tag and pid (`.model.pt.scan-1234.9f3a.tmp`) so that a later run
removes only leftovers of dead scan processes, never files it does not own.

PyTorch files are read with `weights_only=True` (tensors and plain Python values only): a
tampered checkpoint cannot run code. Checkpoints therefore hold RNG states as tensors and
plain values, not numpy objects.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scan.core import distributed
from scan.core.errors import ArtifactError

FORMAT_VERSION = 1
TEMP_PATTERN = re.compile(r"^\..+\.scan-(\d+)\.[0-9a-f]+\.tmp$")   # our temporary files; group 1: the pid


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def write_error(path: Path, e: OSError) -> ArtifactError:
    """The one-line error for a failed write, with the remedy for a full disk or a read-only folder."""
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and rerun the same command: finished stages and checkpoints are kept"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; make the folder writable or choose another --out"
    else:
        hint = ""
    return ArtifactError(f"cannot write {path}: {reason}{hint}")


def temp_path(path: Path) -> Path:
    """A fresh temporary sibling of `path` that `TEMP_PATTERN` recognises as ours."""
    return path.parent / f".{path.name}.scan-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary sibling, then a rename). Under torchrun only
    rank 0 writes: the other ranks hold the same values and skip the write."""
    if not distributed.is_main():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        # os.open with 0o666 lets the umask decide the mode, as for any file the user creates
        # (tempfile.mkstemp would force 0600 whatever the umask).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    except OSError as e:
        raise write_error(path, e) from e


def atomic_write_text(path: Path, text: str) -> None:
    # a file name that is not UTF-8 (a lone surrogate in Python) is written escaped, never a crash at the end
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def as_json(obj: Any) -> Any:
    """`obj` as it reads back from the JSON file atomic_write_json writes (lists for tuples, plain numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


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
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(_plain(obj), buf)
    atomic_write_bytes(path, buf.getvalue())


def _plain(obj):
    """`obj` with numpy scalars as Python numbers and numpy arrays as tensors, which
    `weights_only` loading accepts. Containers are rebuilt only when something inside changed,
    so state dicts keep their metadata."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, dict):
        items = {k: _plain(v) for k, v in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else type(obj)(items)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [_plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def rng_state() -> dict:
    """The Python, numpy and torch generator states as tensors and plain values (see `load_torch`)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_torch(path: Path) -> Any:
    """A PyTorch file holding only tensors and plain values; ArtifactError naming it otherwise.

    `weights_only=True` refuses any other pickled object, so a tampered file cannot run code
    (safe since torch 2.6, see pyproject.toml).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        unsafe = next((line for line in lines if "GLOBAL" in line), None)   # torch names the refused global
        if unsafe:
            raise ArtifactError(f"{path}: refused to load it: it holds Python objects that could run code "
                                f"({_one_line(unsafe)}); delete it, or rerun with --restart to recompute "
                                f"it") from None
        detail = next((line for line in lines if line.startswith("Unsupported") or "load key" in line),
                      "not a PyTorch file")
        raise ArtifactError(f"{path} is truncated or corrupt ({_one_line(detail)}); rerun with --restart to "
                            f"recompute it") from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as e:
        reason = _one_line(str(e).split(". ")[0]) or type(e).__name__
        raise ArtifactError(f"{path} is truncated or corrupt ({reason}); rerun with --restart to recompute "
                            f"it") from None


def load_state_dict(path: Path) -> dict:
    """A model's weights (`name -> tensor`) read back with `load_torch`; anything else in the file is an
    ArtifactError naming it (a tensor or a list there would fail inside the model with a raw error)."""
    state = load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path} holds a {type(state).__name__}, not model weights; rerun with --restart to "
                            f"recompute it")
    return state


def load_checkpoint(path: Path) -> dict | None:
    """A training checkpoint written by `atomic_torch_save`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict):
        raise ArtifactError(f"{path} is not a scan checkpoint; rerun with --restart to recompute it")
    return ckpt


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
