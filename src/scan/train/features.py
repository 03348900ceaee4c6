"""Feature cache: embed a data set once with a frozen pretrained backbone, reuse it everywhere.

With `pretext.method: pretrained` the pretext stage only embeds the images; mining, head-only
SCAN training, self-labelling, evaluation and the report all read these files, and the
backbone never runs again:

  features/train.npy        (N_train, D) features of the unaugmented training images
  features/eval.npy         (N_eval, D) features of the unaugmented evaluation images (absent for data
                            without a held-out split, folders and .npz files: they evaluate on train.npy)
  features/train_views.npy  (V, N_train, D) float16 features of V augmented views per training
                            image (pretext.cached_views = V; absent when V = 0)
  features/cache.json       the cache keys: a hash of the weights, the pre-processing and both
                            splits' pixels; another adding the view settings (V, augment, seed)

What the current keys show as cached is never embedded again, even after `--restart` or a
change of any later stage's settings; changing V re-embeds only the views.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scan.core.checkpoint import atomic_save_npy, atomic_write_json, read_json, seed_everything
from scan.core.errors import ArtifactError, StageError, typed
from scan.core.hashing import bytes_hash, stable_hash
from scan.nets.pretrained import build_pretrained, weights_identity
from scan.train.engine import predict_in_batches

CACHE_VERSION = 1   # bump when pre-processing or file layout change, so old caches are recomputed


def cache_keys(run) -> tuple[str, str | None]:
    """Hash of what the unaugmented features depend on, and of what the augmented views add (None: no views).

    Two keys, so that changing pretext.cached_views re-embeds only the views.
    """
    cfg = run.cfg
    eval_hash = run.info["data_hash"] if run.eval is run.train else bytes_hash(run.eval.images)
    base = stable_hash(CACHE_VERSION, weights_identity(cfg), run.info["data_hash"], eval_hash)
    views = cfg.pretext.cached_views
    return base, (stable_hash(base, views, cfg.to_dict()["augment"], cfg.pretext_seed) if views else None)


def _views_path(run):
    return run.path("features", "train_views.npy")


def embed(backbone, images: torch.Tensor, rt, desc: str, augment=None) -> np.ndarray:
    """(N, D) float32 features of uint8 images, batched on the device (images resized there)."""
    # 224 px activations of 256 images take several GB: fine on a GPU, too much for a laptop's memory
    batch_size = 256 if rt.cuda else 32
    fn = backbone if augment is None else (lambda x: backbone(augment(x)))
    return predict_in_batches(fn, images, rt, batch_size=batch_size, desc=desc).numpy()


def features_path(run, split: str, kind: str = "") -> Path:
    """features/<split><kind>.npy ('train' or 'eval'; kind '' or '_projection'). Data without a held-out
    split (npz files, image folders) evaluate on the training images, whose features are stored once."""
    if split == "eval" and run.eval is run.train:
        split = "train"
    return run.path("features", f"{split}{kind}.npy")


def _embed_splits(run, backbone) -> int:
    """Write features/train.npy and eval.npy (unless they are the same images); returns the feature size."""
    train = embed(backbone, run.train.images, run.rt, f"embedding ({run.cfg.model.backbone}, train)")
    atomic_save_npy(features_path(run, "train"), train)
    if run.eval is not run.train:
        atomic_save_npy(features_path(run, "eval"), embed(backbone, run.eval.images, run.rt, "embedding (eval)"))
    return int(train.shape[1])


def _embed_views(run, backbone) -> None:
    """Write features/train_views.npy: pretext.cached_views SimCLR-augmented views of every training image."""
    cfg = run.cfg
    seed_everything(cfg.pretext_seed)
    from scan.nets.augment import SimCLRAugment  # kornia: imported only where views are augmented, not by predict
    augment = SimCLRAugment(cfg.augment, run.image_size, run.channels)
    views = cfg.pretext.cached_views
    stacked = np.stack([embed(backbone, run.train.images, run.rt, f"embedding (view {v + 1}/{views})", augment)
                        for v in range(views)])
    atomic_save_npy(_views_path(run), stacked.astype(np.float16))   # half the disk; heads need no more


def cache_features(run) -> dict:
    """The pretext stage of `pretext.method: pretrained`: embed what the cache lacks, reuse the rest.

    Returns the stage record: seconds spent now, whether everything was reused, and
    embed_seconds, what computing the cached features took in all.
    """
    cfg, rt = run.cfg, run.rt
    base_key, views_key = cache_keys(run)
    record = read_json(run.path("features", "cache.json")) or {}
    have_base = record.get("key") == base_key and all(features_path(run, s).exists() for s in ("train", "eval"))
    have_views = views_key is None or (record.get("views_key") == views_key and _views_path(run).exists())
    start = time.time()
    if have_base and have_views:
        if not rt.quiet:
            tqdm.write(f"pretext: reusing the cached {cfg.model.backbone} features in {run.path('features')}",
                       file=sys.stderr)
    else:
        backbone = rt.prepare(build_pretrained(cfg, run.channels, run.info["mean"], run.info["std"])).eval()
        if not have_base:
            record = {"key": base_key, "backbone": cfg.model.backbone,
                      "feature_dim": _embed_splits(run, backbone), "base_seconds": time.time() - start}
        if not have_views:
            views_start = time.time()
            _embed_views(run, backbone)
            record["views_seconds"] = time.time() - views_start
        record.update(views_key=views_key, cached_views=cfg.pretext.cached_views)
        atomic_write_json(run.path("features", "cache.json"), record)
    embed_seconds = record["base_seconds"] + (record.get("views_seconds", 0.0) if views_key else 0.0)
    return {"seconds": time.time() - start, "method": cfg.pretext.method, "reused": have_base and have_views,
            "embed_seconds": embed_seconds, "feature_dim": record["feature_dim"]}


def read_features(run, split: str, kind: str = "") -> np.ndarray:
    """(N, D) features/<split><kind>.npy of the 'train' or 'eval' images, checked against the run's image
    count: a missing file is a StageError, a damaged one an ArtifactError naming it and the fix."""
    path = features_path(run, split, kind)
    if not path.exists():
        raise StageError(f"{path} is missing: run the pretext stage first (scan pretext --out {typed(run.run_dir)})")
    rows = run.info["num_train"] if split == "train" or run.eval is run.train else run.info["num_eval"]
    try:
        features = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:   # truncated, objects, not an .npy file
        raise ArtifactError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:80]}); rerun with --restart "
                            f"to recompute it") from None
    if features.ndim != 2 or features.shape[0] != rows or features.dtype.kind != "f":
        raise ArtifactError(f"{path} holds {features.dtype} {features.shape}, expected ({rows}, D) floats; rerun "
                            f"with --restart to recompute it")
    return features


def load_features(run, split: str) -> torch.Tensor:
    """(N, D) float32 cached features of the unaugmented 'train' or 'eval' images, on the CPU."""
    return torch.from_numpy(read_features(run, split))


def load_views(run) -> torch.Tensor:
    """(1 + V, N, D) float32 training features on the run's device: view 0 unaugmented, then V augmented."""
    stacked = [load_features(run, "train")[None]]
    if run.cfg.pretext.cached_views:
        stacked.append(torch.from_numpy(np.load(_views_path(run))).float())
    return torch.cat(stacked).to(run.rt.device)
