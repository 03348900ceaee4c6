"""The one place hashes are made: of settings (stage fingerprints, cache keys), of pixels and of files.

Sixteen hex digits of SHA-256 identify settings and data; a model file is identified by its full
digest (names.json ties cluster names to it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def stable_hash(*parts) -> str:
    """16 hex digits of SHA-256 over the JSON of `parts` (keys sorted; other objects by str())."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bytes_hash(data) -> str:
    """16 hex digits of SHA-256 over the raw bytes of `data`: bytes, a NumPy array or a CPU tensor."""
    if not isinstance(data, (bytes, bytearray)):
        data = np.ascontiguousarray(data.numpy() if hasattr(data, "numpy") else data).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def file_hash(path: Path, length: int | None = 16) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks; the first `length` hex digits (None: all)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length] if length else digest.hexdigest()
