"""Feature cache: embed a data set once with a frozen pretrained backbone, reuse it everywhere.

With `pretext.method: pretrained` the pretext stage only embeds the images; mining, head-only
SCAN training, self-labelling, evaluation and the report all read these files, and the
backbone never runs again:

  features/train.npy        (N_train, D) features of the unaugmented training images
  features/eval.npy         (N_eval, D) features of the unaugmented evaluation images
  features/train_views.npy  (V, N_train, D) float16 features of V augmented views per training
                            image (pretext.cached_views = V; absent when V = 0)
  features/cache.json       the cache key: a hash of the weights, the pre-processing, both
                            splits' pixels and the view settings

The embedding is skipped whenever cache.json holds the current key, even after `--restart`
or a change of any later stage's settings.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from scan.augment import SimCLRAugment
from scan.checkpoint import atomic_save_npy, atomic_write_json, read_json, seed_everything
from scan.engine import StageError, predict_in_batches
from scan.pretrained import build_pretrained, weights_identity

CACHE_VERSION = 1   # bump when pre-processing or file layout change, so old caches are recomputed


def cache_key(run) -> str:
    """Hash of everything the cached features depend on."""
    cfg = run.cfg
    views = cfg.pretext.cached_views
    eval_hash = run.info["data_hash"] if run.eval is run.train else \
        hashlib.sha256(run.eval.images.numpy().tobytes()).hexdigest()[:16]
    parts = [CACHE_VERSION, weights_identity(cfg), run.info["data_hash"], eval_hash, views]
    if views:   # the augmented views also depend on the augmentation and the seed
        parts += [cfg.to_dict()["augment"], cfg.seed]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _views_path(run):
    return run.path("features", "train_views.npy")


def cached(run, key: str) -> dict | None:
    """The cache record when it holds `key` and every file it lists exists, else None."""
    record = read_json(run.path("features", "cache.json"))
    if record is None or record.get("key") != key:
        return None
    needed = [run.path("features", "train.npy"), run.path("features", "eval.npy")]
    if record.get("cached_views"):
        needed.append(_views_path(run))
    return record if all(p.exists() for p in needed) else None


def embed(backbone, images: torch.Tensor, rt, desc: str, augment=None) -> np.ndarray:
    """(N, D) float32 features of uint8 images, batched on the device (images resized there)."""
    # 224 px activations of 256 images take several GB: fine on a GPU, too much for a laptop's memory
    batch_size = 256 if rt.cuda else 32
    fn = backbone if augment is None else (lambda x: backbone(augment(x)))
    return predict_in_batches(fn, images, rt, batch_size=batch_size, desc=desc).numpy()


def cache_features(run) -> dict:
    """The pretext stage of `pretext.method: pretrained`: embed the data (or reuse the cache).

    Returns the stage record: embedding seconds (0 when reused), feature size and whether the
    cache was reused.
    """
    cfg, rt = run.cfg, run.rt
    key = cache_key(run)
    record = cached(run, key)
    if record is not None:
        if not rt.quiet:
            tqdm.write(f"pretext: reusing the cached {cfg.model.backbone} features in {run.path('features')}")
        return {"seconds": 0.0, "method": "pretrained", "reused": True, "embed_seconds": record["seconds"],
                "feature_dim": record["feature_dim"]}
    start = time.time()
    backbone = rt.prepare(build_pretrained(cfg, run.channels, run.info["mean"], run.info["std"])).eval()
    train = embed(backbone, run.train.images, rt, f"embedding ({cfg.model.backbone}, train)")
    # npz files and image folders have one split: evaluate on the very same features
    evaluation = train if run.eval is run.train else embed(backbone, run.eval.images, rt, "embedding (eval)")
    atomic_save_npy(run.path("features", "train.npy"), train)
    atomic_save_npy(run.path("features", "eval.npy"), evaluation)
    views = cfg.pretext.cached_views
    if views:
        seed_everything(cfg.seed)
        augment = SimCLRAugment(cfg.augment, run.image_size, run.channels)
        stacked = np.stack([embed(backbone, run.train.images, rt, f"embedding (view {v + 1}/{views})", augment)
                            for v in range(views)])
        atomic_save_npy(_views_path(run), stacked.astype(np.float16))   # half the disk; heads need no more
    seconds = time.time() - start
    atomic_write_json(run.path("features", "cache.json"),
                      {"key": key, "backbone": cfg.model.backbone, "feature_dim": int(train.shape[1]),
                       "cached_views": views, "seconds": seconds})
    return {"seconds": seconds, "method": "pretrained", "reused": False, "feature_dim": int(train.shape[1])}


def load_features(run, split: str) -> torch.Tensor:
    """(N, D) float32 cached features of the unaugmented 'train' or 'eval' images, on the CPU."""
    path = run.path("features", f"{split}.npy")
    if not path.exists():
        raise StageError(f"{path} is missing: run the pretext stage first (scan pretext --out {run.run_dir})")
    return torch.from_numpy(np.load(path))


def load_views(run) -> torch.Tensor:
    """(1 + V, N, D) float32 training features on the run's device: view 0 unaugmented, then V augmented."""
    stacked = [load_features(run, "train")[None]]
    if run.cfg.pretext.cached_views:
        stacked.append(torch.from_numpy(np.load(_views_path(run))).float())
    return torch.cat(stacked).to(run.rt.device)
