"""Using a trained run: reopen it, name its clusters and assign images to them.

A run directory is the whole model: `config.yaml` rebuilds the network, `data.json` gives the
input shape and normalisation, `<final stage>/model.pt` holds the weights. New images are
preprocessed exactly like the training data (same decoding, crop, size and channels).

Files written here:
  names.json          {"3": "red cars", ...}                     (scan name)
  train_outputs.pt    probabilities and features of the training images, cached per model
  assignments.csv     path, cluster, cluster_name, confidence, top3 of every training image
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scan.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, read_json
from scan.config import load_config
from scan.data import IMAGE_EXTENSIONS, DataError, ImageDataset, decode_images, load_dataset
from scan.engine import Runtime, predict_in_batches, resolve_device
from scan.models import Classifier
from scan.pipeline import (Run, describe_data, final_stage, head_only_train_outputs, load_clustering_model,
                           load_data)

NAMES_FILE = "names.json"
OUTPUTS_FILE = "train_outputs.pt"
ASSIGNMENTS_FILE = "assignments.csv"
TOP_K = 3


class RunError(ValueError):
    """A user mistake with a trained run (not a run directory, bad cluster name, wrong image shape).

    str(e) is one line naming the file or argument and what was expected.
    """


# ------------------------------------------------------------------------ reopening a run

def open_trained_run(run_dir, device: str = "auto", with_data: bool = False) -> Run:
    """The Run of a finished training directory, rebuilt from its saved config and data summary.

    with_data=False: the training images are not loaded (predict and export need only their
    shape), the Run holds a one-image placeholder. with_data=True: the data are reloaded and must
    be the very images the run was trained on.
    """
    run_dir = Path(run_dir)
    config_file, info = run_dir / "config.yaml", read_json(run_dir / "data.json")
    if not config_file.is_file() or info is None:
        raise RunError(f"{run_dir}: not a scan run directory (no config.yaml/data.json); "
                       f"train one with `scan run --out {run_dir}`")
    cfg = load_config(str(config_file))
    rt = Runtime(resolve_device(device), quiet=True)
    if not with_data:
        placeholder = ImageDataset(torch.zeros((1, *info["image_shape"]), dtype=torch.uint8), None, None)
        return Run(cfg, run_dir, rt, placeholder, placeholder, info)
    train, evaluation = load_data(cfg)
    if describe_data(cfg, train, evaluation)["data_hash"] != info["data_hash"]:
        raise RunError(f"{cfg.data.path or cfg.data.dataset}: the images differ from those {run_dir} was trained "
                       f"on; rerun `scan run` on them first")
    return Run(cfg, run_dir, rt, train, evaluation, info)


def load_classifier(run: Run) -> Classifier:
    """The final stage's model as images -> probabilities, in eval mode on the run's device."""
    model = load_clustering_model(run, final_stage(run))
    return run.rt.prepare(Classifier(model)).eval()


def predict_proba(classifier: Classifier, images: torch.Tensor, rt: Runtime) -> np.ndarray:
    """(N, C) cluster probabilities of uint8 (N, C, H, W) images."""
    return predict_in_batches(classifier, images, rt).numpy()


# ------------------------------------------------------------------------ cluster names

def load_names(run_dir) -> dict[int, str]:
    """{cluster id: name} from names.json; empty when no cluster was named."""
    path = Path(run_dir) / NAMES_FILE
    try:
        names = read_json(path, {})
    except ValueError:
        raise RunError(f"{path}: not valid JSON; fix or delete it and name the clusters again") from None
    return {int(k): str(v) for k, v in names.items()}


def cluster_title(cluster: int, names: dict[int, str]) -> str:
    """The cluster's name, or 'cluster 3' when it has none."""
    return names.get(cluster) or f"cluster {cluster}"


def set_names(run_dir, assignments: list[str]) -> dict[int, str]:
    """Apply 'ID=NAME' assignments ('ID=' removes a name), save names.json, return all names.

    assignments.csv of the training images is rewritten with the new names when it can be
    without reloading the data.
    """
    run = open_trained_run(run_dir)
    count = run.num_clusters
    names = load_names(run_dir)
    for text in assignments:
        key, sep, name = text.partition("=")
        if not sep or not key.strip().isdigit():
            raise RunError(f"'{text}' must look like CLUSTER=NAME, e.g. 3=\"red cars\"")
        cluster = int(key)
        if cluster >= count:
            raise RunError(f"'{text}': {run_dir} has clusters 0..{count - 1}, not {cluster}")
        if name.strip():
            names[cluster] = name.strip()
        else:
            names.pop(cluster, None)
    atomic_write_json(Path(run_dir) / NAMES_FILE, {str(k): v for k, v in sorted(names.items())})
    outputs = cached_train_outputs(run)
    if outputs is not None:   # keep assignments.csv in step (cheap: no data or model needed)
        atomic_write_text(run.path(ASSIGNMENTS_FILE), assignments_csv(outputs.ids, outputs.probs, names))
    return names


# ------------------------------------------------------------------------ images in

def as_image_tensor(x) -> torch.Tensor:
    """An image batch as uint8 (N, C, H, W), C in {1, 3}.

    numpy arrays are channels-last, (N, H, W) or (N, H, W, C); torch tensors channels-first,
    (N, H, W) or (N, C, H, W) (each library's convention). C may be 1, 3 or 4 (alpha dropped);
    floats must be in [0, 1].
    """
    channels_last = not isinstance(x, torch.Tensor)
    t = torch.as_tensor(np.asarray(x)) if channels_last else x.detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and channels_last:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] not in (1, 3, 4):
        layout = "(N, H, W) or (N, H, W, C)" if channels_last else "(N, H, W) or (N, C, H, W)"
        raise RunError(f"images must have shape {layout} with C = 1, 3 or 4, got {tuple(np.shape(x))}")
    t = t[:, :3]
    if t.is_floating_point():
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise RunError("float images must lie in [0, 1]; pass uint8 for 0..255 values")
        t = (t * 255).round()
    elif t.dtype != torch.uint8:
        raise RunError(f"images must be uint8 (0..255) or float in [0, 1], got {t.dtype}")
    return t.to(torch.uint8).contiguous()


def match_shape(images: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Convert grey <-> RGB to the run's channel count; the height and width must already match."""
    channels, size = shape[0], tuple(shape[1:])
    if tuple(images.shape[2:]) != size:
        raise RunError(f"images are {images.shape[2]}x{images.shape[3]} pixels, the model expects "
                       f"{size[0]}x{size[1]}; pass image files or folders to have them resized")
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, the weights Pillow uses for RGB -> L
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def load_image_paths(paths, shape: list[int]) -> ImageDataset:
    """Image files and folders (searched recursively) decoded like the training folder of a run."""
    size = shape[1]
    parts = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist (expected an image file or a folder of images)")
        if path.is_dir():
            parts.append(load_dataset("folder", str(path), image_size=size, labels_from_folders=False))
            continue
        image = decode_images([path], size)[0]
        if image is None:
            raise DataError(f"{path}: not a readable image (expected {'/'.join(sorted(IMAGE_EXTENSIONS))})")
        parts.append(ImageDataset(torch.from_numpy(image.transpose(2, 0, 1).copy())[None], None, None, [str(path)]))
    if not parts:
        raise DataError("no images given: pass image files or folders")
    images = match_shape(torch.cat([p.images for p in parts]), shape)
    return ImageDataset(images, None, None, [f for p in parts for f in p.paths])


# ------------------------------------------------------------------------ assignments out

def assignments_csv(ids: list[str], probs: np.ndarray, names: dict[int, str]) -> str:
    """CSV text with one row per image: path, cluster, cluster_name, confidence, top3 ("3:0.912 1:0.051 ...")."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "cluster", "cluster_name", "confidence", "top3"])
    top = np.argsort(-probs, axis=1)[:, :TOP_K]
    for image_id, p, best in zip(ids, probs, top):
        writer.writerow([image_id, int(best[0]), names.get(int(best[0]), ""), f"{p[best[0]]:.4f}",
                         " ".join(f"{c}:{p[c]:.3f}" for c in best)])
    return buffer.getvalue()


@dataclass
class TrainOutputs:
    """The final model applied to every training image."""
    ids: list[str]              # file paths for folder data, else the image index
    probs: np.ndarray           # (N, C) cluster probabilities
    features: np.ndarray        # (N, D) backbone features (prototypes in the report)


def _model_key(run: Run) -> str:
    """Identifies the final model: its stage and that stage's fingerprint."""
    stage = final_stage(run)
    return f"{stage}:{(read_json(run.path(stage, 'done.json')) or {}).get('fingerprint')}"


def cached_train_outputs(run: Run) -> TrainOutputs | None:
    """The cached outputs when they were computed by the current final model, else None."""
    path = run.path(OUTPUTS_FILE)
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu")
    if saved["key"] != _model_key(run):
        return None
    return TrainOutputs(saved["ids"], saved["probs"].numpy(), saved["features"].numpy())


def train_outputs(run: Run) -> TrainOutputs:
    """Probabilities and features of the training images (the Run must hold its data), cached."""
    cached = cached_train_outputs(run)
    if cached is not None:
        return cached
    if run.head_only:   # from the cached features: the pretrained network need not run again
        probs, features = head_only_train_outputs(run)
    else:
        classifier = load_classifier(run)
        # One pass for both: probabilities (C columns) then backbone features.
        both = predict_in_batches(lambda x: torch.cat([classifier(x), classifier.backbone(x)], 1),
                                  run.train.images, run.rt)
        probs, features = both[:, :run.num_clusters], both[:, run.num_clusters:]
    ids = run.train.paths or [str(i) for i in range(len(run.train))]
    atomic_torch_save(run.path(OUTPUTS_FILE), {"key": _model_key(run), "ids": ids, "probs": probs,
                                               "features": features})
    return TrainOutputs(ids, probs.numpy(), features.numpy())


def write_train_assignments(run: Run) -> Path:
    """assignments.csv for the training images of a finished run (the Run must hold its data)."""
    out = train_outputs(run)
    path = run.path(ASSIGNMENTS_FILE)
    atomic_write_text(path, assignments_csv(out.ids, out.probs, load_names(run.run_dir)))
    return path
