"""Settings chosen from the data when no config is given, and the time they will take.

The built-in configs were tuned on their own data; these defaults must work on images nobody
tuned for. So they are derived from what the optimisation needs, not from one data set:

- the network fits the image size: the stem stride brings the first feature map to about
  16 px (a 28 px image gets stride 2; 5x fewer operations than stride 1 and, measured, no
  worse neighbours), a narrow ResNet on CPU, ResNet-18 on CUDA;
- budgets are counted in images seen, not epochs: a small data set gets more epochs, a large
  one fewer, and the time grows linearly up to 15k images and then stays flat;
- learning rates fit those budgets (Adam 1e-3 for the pretext, 3e-3 for the cluster stage:
  the paper's 1e-4 assumes 50k images x 100 epochs and leaves a few hundred steps at the
  uniform prediction, which is how the old defaults failed silently);
- augmentations that measured well on grey and colour data alike (crop scale 0.5, brightness
  and contrast jitter 0.8 on every view: grey-level statistics are a shortcut otherwise);
- neighbours are mined on the backbone features and PCA-whitened pixels together
  (`mine.features: backbone+pixels`), so a short pretext cannot make them worse than pixels.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scan.algo.candidates import umap_available
from scan.data import detect_format
from scan.data.imagefiles import IMAGE_EXTENSIONS, decode_images, list_files
from scan.data.splits import check_enough_images
from scan.nets.models import build_backbone
from scan.nets.pretrained import LITE_MODELS, LiteBackbone
from scan.train.engine import Runtime, resolve_device
from scan.train.sources import source_class

# images seen per stage on a CPU, as (per-image epochs, floor, ceiling): a few minutes for 5k images
# measured on 2 cores: 20k 28 px images at 800k pretext images took 17 min end to end, over the
# 15 min budget; at 600k the growth is linear up to 15k images and flat beyond
PRETEXT_SEEN = (40, 150_000, 600_000)
CLUSTER_SEEN = (10, 54_000, 150_000)      # anchors seen, each with one neighbour: digits gets its 30 epochs
SELFLABEL_SEEN = (6, 20_000, 120_000)


def _epochs(n: int, budget: tuple[int, int, int], lo: int = 3, hi: int = 500) -> int:
    per_image, floor, ceiling = budget
    seen = int(np.clip(per_image * n, floor, ceiling))
    return int(np.clip(round(seen / n), lo, hi))


def stem_stride(side: int) -> int:
    """Stride of the first convolution that brings the first feature map to ~16 px (1..4)."""
    return int(np.clip(round(side / 16), 1, 4))


def auto_defaults(cfg, train) -> dict:
    """Overrides chosen from the training images when no data-set config is given."""
    check_enough_images(cfg, len(train))
    if source_class(cfg).frozen:
        return {}   # nothing to scale: --pretrained brings the head-only settings (config/builtin/pretrained.yaml)
    n, side = len(train), int(train.images.shape[-1])
    augment = {"crop_min_scale": 0.5, "color_jitter": 0.8, "jitter_prob": 1.0}
    mine = {"features": "backbone+pixels"}
    if resolve_device(cfg.device).type == "cuda":
        return {"model": {"backbone": "resnet18_cifar" if side <= 64 else "resnet18"}, "augment": augment,
                "mine": mine, "cluster": {"lr": 1e-3}}   # 100 epochs of 50k+ images: more steps than on a CPU
    batch = min(256, n)
    return {
        "model": {"backbone": "resnet_small", "width": 24, "blocks": [1, 1, 1], "stem_stride": stem_stride(side)},
        "augment": augment,
        "pretext": {"epochs": _epochs(n, PRETEXT_SEEN), "batch_size": batch, "optimizer": "adam",
                    "lr": 1e-3, "weight_decay": 1e-6},
        "mine": mine,
        # the backbone trains with the heads: on digits 0.93 against 0.87 for heads on a frozen backbone
        "cluster": {"epochs": _epochs(n, CLUSTER_SEEN), "batch_size": min(128, n), "lr": 3e-3, "augment": "simclr"},
        "selflabel": {"epochs": _epochs(n, SELFLABEL_SEEN), "batch_size": batch},
        "refine": {"epochs": _epochs(n, SELFLABEL_SEEN), "batch_size": batch},
    }


# ------------------------------------------------------------------------ photos: pretrained features

# the cluster stage on cached features, measured on 2 idle cores with 10k EfficientNet-Lite0 features: the heads
# 17 s; the UMAP -> k-means candidate (cluster.candidates) 22 s more, plus ~10 s for numba to compile UMAP
HEADS_SECONDS_PER_IMAGE = 1.7e-3
UMAP_SECONDS_PER_IMAGE, UMAP_COMPILE_SECONDS = 2.2e-3, 10.0

PHOTO_BACKBONE = "efficientnet_lite0"   # what a folder of colour photos gets when no config is given
PHOTO_MIN_SIDE = 64       # smaller images (icons, CIFAR-sized crops) keep training from scratch
GREY_SPREAD = 6           # mean max-min over R, G, B (0..255) below which an image counts as grey
PHOTO_SAMPLE = 32         # files looked at to decide


def looks_like_photos(cfg) -> tuple[bool, str | None]:
    """Whether `--data` is a folder of natural colour photos, judged on an even sample of its files:
    most of them in colour and a median shorter side of at least PHOTO_MIN_SIDE px.

    A frozen ImageNet network clusters such photos in a minute where training from scratch takes
    most of an hour on a CPU (and does worse); grey or small images (digits, scans, icons) and
    arrays (.npz) are far from ImageNet, so they keep training from scratch. Returns (verdict, a
    phrase saying what was seen), the phrase None where there is no folder of readable images to judge.
    """
    path = Path(cfg.data.path).expanduser() if cfg.data.path else None
    if cfg.data.dataset not in ("auto", "folder") or path is None or not path.is_dir() \
            or detect_format(path) != "folder":
        return False, None
    files = [f for f in list_files(path) if f.suffix.lower() in IMAGE_EXTENSIONS]
    sample = files[::max(1, len(files) // PHOTO_SAMPLE)][:PHOTO_SAMPLE]
    sides = []
    for file in sample:
        try:
            with Image.open(file) as img:   # reads the header only
                sides.append(min(img.size))
        except Exception:  # unreadable files are skipped here as the loader skips them
            continue
    crops = [c for c in decode_images(sample, 32) if c is not None]
    if not sides or not crops:
        return False, None
    spread = [float((c.max(axis=2).astype(np.int16) - c.min(axis=2)).mean()) for c in crops]
    colour = float(np.mean([v >= GREY_SPREAD for v in spread]))
    side = int(np.median(sides))
    seen = f"{cfg.data.path} holds {len(files)} images, {colour:.0%} in colour, median side {side} px"
    return colour >= 0.5 and side >= PHOTO_MIN_SIDE, seen


# ------------------------------------------------------------------------ time estimates

def network_rate(cfg, channels: int, side: int, device: torch.device) -> float:
    """Images per second of the network the run will time-limit on: the frozen pretrained network's
    forward pass, or the backbone's forward + backward pass when it trains."""
    if source_class(cfg).frozen:
        return embedding_rate(cfg, channels, side, device)
    return training_rate(cfg, channels, side, device)


@torch.no_grad()
def embedding_rate(cfg, channels: int, side: int, device: torch.device, batch: int = 8) -> float:
    """Images per second through the frozen network of `pretext.method: pretrained` (untrained
    weights of the same architecture: the time does not depend on them)."""
    m = cfg.model
    if m.backbone in LITE_MODELS:
        net = LiteBackbone(m.backbone).eval()
    else:
        net = build_backbone(m.backbone, channels, width=m.width, blocks=m.blocks, stem_stride=m.stem_stride).eval()
    net = Runtime(device, quiet=True).prepare(net)
    x = torch.rand(batch, channels, side, side, device=device)
    times = []
    for _ in range(3):   # the first pass allocates; the best of the others is the rate
        start = time.perf_counter()
        net(x)
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def training_rate(cfg, channels: int, side: int, device: torch.device, batch: int = 128) -> float:
    """Images per second of one forward + backward pass of the configured backbone, timed on random input."""
    m = cfg.model
    net = build_backbone(m.backbone, channels, width=m.width, blocks=m.blocks, stem_stride=m.stem_stride)
    rt = Runtime(device, quiet=True)
    net = rt.prepare(net)
    x = rt.batch(torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8))
    times = []
    for _ in range(3):   # the first pass allocates; the best of the others is the rate
        start = time.perf_counter()
        net(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def estimate_seconds(cfg, n_train: int, n_eval: int, rate: float) -> dict[str, float]:
    """Seconds per stage: images through the backbone per stage / measured rate.

    A forward pass alone costs about a third of forward + backward; augmentation, the loss and
    the per-epoch bookkeeping add about half again (measured on 2 CPU cores).
    """
    overhead, fwd = 1.5, 1 / 3
    if source_class(cfg).frozen:   # rate: forward passes; every image is embedded once, plus
        views = 1 + cfg.pretext.cached_views   # any cached augmented views; then heads (and recipes) on features
        cluster = HEADS_SECONDS_PER_IMAGE * n_train
        if "umap_kmeans" in cfg.cluster.candidates and umap_available():
            cluster += UMAP_COMPILE_SECONDS + UMAP_SECONDS_PER_IMAGE * n_train
        return {"pretext": overhead * (n_train * views + n_eval) / rate, "cluster": cluster}
    c, s = cfg.cluster, cfg.selflabel
    cluster_pass = fwd if not c.update_backbone else 1.0
    images = {
        "pretext": 2 * n_train * cfg.pretext.epochs + fwd * (n_train + n_eval),
        "cluster": (2 * n_train * c.epochs * cluster_pass + fwd * n_train) * c.restarts,
        "selflabel": (n_train * s.epochs * (1 + 2 * fwd)) if s.enabled else 0,
        "evaluate": fwd * (n_train + 3 * n_eval),
    }
    return {stage: overhead * count / rate for stage, count in images.items()}
