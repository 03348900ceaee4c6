"""Export a trained run as a single TorchScript file: image batch -> cluster probabilities.

The file needs only PyTorch to run (no `scan` package):

    model = torch.jit.load("model.torchscript.pt")
    probs = model(images)      # (B, C, H, W) uint8 0..255 or float 0..1  ->  (B, num_clusters)

Normalisation is inside the model. Cluster names and the expected input shape travel in the
file as `scan.json` (read with `torch.jit.load(path, _extra_files={"scan.json": ""})`).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from scan.checkpoint import atomic_write_bytes
from scan.inference import RunError, load_classifier, load_names, open_trained_run

FORMATS = ("torchscript",)
DEFAULT_NAME = "model.torchscript.pt"


class _AnyDtype(nn.Module):
    """Accept uint8 (0..255) or float (0..1) batches; the wrapped model takes floats."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.model(x)


def export_run(run_dir, out=None, fmt: str = "torchscript") -> Path:
    """Write the run's final model to `out` (default `<run_dir>/model.torchscript.pt`); return the path."""
    if fmt not in FORMATS:
        raise RunError(f"--format {fmt} is not supported; expected one of: {', '.join(FORMATS)}")
    run = open_trained_run(run_dir, device="cpu")   # exported on the CPU so the file loads anywhere
    classifier = load_classifier(run)
    example = torch.rand(2, *run.info["image_shape"])
    # Trace the network (any backbone traces), script only the small dtype branch around it.
    traced = torch.jit.trace(classifier, example)
    scripted = torch.jit.script(_AnyDtype(traced))
    meta = {"image_shape": run.info["image_shape"], "num_clusters": run.num_clusters,
            "names": {str(k): v for k, v in load_names(run_dir).items()}, "input": "NCHW uint8 0..255 or float 0..1"}
    path = Path(out) if out else run.path(DEFAULT_NAME)
    if path.is_dir():
        raise RunError(f"--out {path} is a folder; give a file name, e.g. --out {path / DEFAULT_NAME}")
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={"scan.json": json.dumps(meta)})
    atomic_write_bytes(path, buffer.getvalue())   # a full disk or read-only folder: one clear error
    return path
