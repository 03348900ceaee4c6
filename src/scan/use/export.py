"""Export a trained run as one file that runs without the `scan` package.

Every format holds the forward `scan predict` uses (scan.algo.ood.TrustedClassifier), so their
outputs agree to float rounding:

    images  uint8 (B, C, H, W), C and H x W the run's image shape (`image_shape` in the metadata)
    ->  probabilities (B, num_clusters), confidence (B,), ood_score (B,)
        unknown = ood_score > ood_threshold (metadata)

The input is what `scan predict` decodes from a file: Pillow, EXIF orientation applied, RGB,
the shorter side resized (bicubic) to S and centred, S x S (scan.data.imagefiles._decode; the
metadata's `preprocess` says the same). Other sizes are refused rather than silently resized.

Formats (--format), each reading its metadata `scan.json` (image shape, names, threshold):
  torchscript   torch.jit.load(path, _extra_files={"scan.json": ""}); also takes float 0..1 images
  onnx          onnxruntime.InferenceSession(path); onnx.load(path).metadata_props   (`export` extra)
  torch-export  torch.export.load(path, extra_files={"scan.json": ""}).module()      (.pt2)
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from scan.core.checkpoint import atomic_write_bytes
from scan.core.errors import RunError
from scan.core.registry import Registry
from scan.use.inference import load_names, open_trained_run, trusted_classifier

OUTPUTS = ("probabilities", "confidence", "ood_score")
PREPROCESS = ("Pillow: EXIF orientation applied, converted to RGB (grey for 1-channel models: ITU-R 601 luma), "
              "shorter side resized to S with bicubic resampling over the centred square (Image.resize box=), "
              "uint8 (B, C, S, S)")


class _FromUint8(nn.Module):
    """uint8 images of the training size -> the TrustedClassifier's three outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model(images.float() / 255.0)


class _AnyDtypeChecked(nn.Module):
    """TorchScript entry: uint8 (0..255) or float (0..1) batches, of exactly the training shape."""

    def __init__(self, model: nn.Module, shape: list[int]):
        super().__init__()
        self.model = model
        self.shape = shape

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or list(x.shape[1:]) != self.shape:
            raise ValueError("images must be (B, C, H, W) with (C, H, W) = image_shape in scan.json, decoded "
                             "and centre-cropped like `scan predict`")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.model(x)


FORMATS: Registry[tuple[str, Callable]] = Registry("--format")   # name -> (default file name, writer)


def _format(name: str, default_name: str):
    def add(writer):
        FORMATS.add(name, (default_name, writer))
        return writer
    return add


@_format("torchscript", "model.torchscript.pt")
def _torchscript(model: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    # Trace the network (any backbone traces), script only the small dtype and shape check around it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TorchScript is deprecated upstream: onnx is not
        traced = torch.jit.trace(model, example.float() / 255.0)
        scripted = torch.jit.script(_AnyDtypeChecked(traced, list(example.shape[1:])))
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={"scan.json": meta})
    return buffer.getvalue()


def _batch_dim():
    return {"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


@_format("onnx", "model.onnx")
def _onnx(model: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
    except ImportError:
        raise RunError("--format onnx needs the onnx packages: pip install 'scan-clustering[export]'") from None
    quiet = logging.getLogger("torch.onnx")   # its exporter logs each torchvision op it skips
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # raised inside torch's own exporter
            program = torch.onnx.export(_FromUint8(model).eval(), (example,), dynamo=True, input_names=["images"],
                                        output_names=list(OUTPUTS), dynamic_shapes=_batch_dim(), verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"scan.json": meta})
    return proto.SerializeToString()


@_format("torch-export", "model.pt2")
def _torch_export(model: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    program = torch.export.export(_FromUint8(model).eval(), (example,), dynamic_shapes=_batch_dim())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"scan.json": meta})
    return buffer.getvalue()


def default_name(fmt: str) -> str:
    return FORMATS.get(fmt)[0]


def export_run(run_dir, out=None, fmt: str = "torchscript") -> Path:
    """Write the run's final model in format `fmt` to `out` (default `<run_dir>/<default name>`); return the path."""
    if fmt not in FORMATS:
        raise RunError(f"--format {fmt} is not supported; expected one of: {', '.join(FORMATS.names())}")
    file_name, writer = FORMATS.get(fmt)
    path = Path(out) if out else Path(run_dir) / file_name
    if path.is_dir():
        raise RunError(f"--out {path} is a folder; give a file name, e.g. --out {path / file_name}")
    run = open_trained_run(run_dir, device="cpu")   # exported on the CPU so the file loads anywhere
    model = trusted_classifier(run)
    shape = run.info["image_shape"]
    meta = json.dumps({"image_shape": shape, "num_clusters": run.num_clusters,
                       "names": {str(k): v for k, v in load_names(run).items()},
                       "input": "images: uint8 (B, C, H, W) 0..255, (C, H, W) = image_shape", "preprocess": PREPROCESS,
                       "outputs": list(OUTPUTS), "ood_threshold": model.trust.threshold,
                       "unknown": "ood_score > ood_threshold"})
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    with torch.no_grad():
        data = writer(model, example, meta)
    atomic_write_bytes(path, data)   # a full disk or read-only folder: one clear error
    return path
