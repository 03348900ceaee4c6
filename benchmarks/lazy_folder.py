"""Speed and memory of a folder bigger than the memory budget: list, decode once, then read epochs.

Builds (once) a folder of small generated JPEGs under /tmp, loads it with a memory budget far
below its decoded size, so it takes the decode-once path (data.cache_images=auto -> disk), and
prints JSON: listing time, images/s of the first pass (decoding into the cache file) and of a
cached pass (reopening the folder, then reading every image in shuffled batches as an epoch
does), and the peak resident memory (resource.getrusage) after each phase.

    python benchmarks/lazy_folder.py [--images 20000] [--side 64] [--workers 0] [--budget-mb 64]

The decode-once file is written by appending and read with pread, so it lives in the operating
system's page cache, not in the process: the peak resident memory grows by about one decoding
chunk (1,024 images, fewer under a small budget), not by the folder's decoded size.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scan.data import FolderOptions, LazyImages, load_dataset
from scan.data.imagefiles import list_files

ROOT = Path("/tmp/scan_lazy_folder_bench")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux


def make_folder(root: Path, count: int) -> Path:
    """`count` 96x72 JPEGs in 10 subfolders (smooth colour gradients with noise); reused when present."""
    images = root / f"images{count}"
    if images.is_dir() and sum(1 for _ in images.rglob("*.jpg")) == count:
        return images
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 96)[None, :, None] * np.linspace(0.5, 1, 72)[:, None, None]
    for i in range(count):
        folder = images / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(ramp * colour + rng.normal(0, 12, (72, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return images


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads; 0: the pool's default")
    parser.add_argument("--budget-mb", type=int, default=64, help="data.max_memory_mb")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    folder = make_folder(ROOT, args.images)
    cache = ROOT / "cache"
    for old in cache.glob("images-*"):   # our own decode-once files: the first pass must decode
        old.unlink()
    options = FolderOptions("auto", args.budget_mb, str(cache), args.workers, quiet=False)
    result = {"images": args.images, "side": args.side, "workers": args.workers, "budget_mb": args.budget_mb,
              "decoded_size_mb": round(args.images * 3 * args.side ** 2 / 2**20, 1),
              "peak_rss_mb_before_loading": round(peak_rss_mb(), 1)}

    start = time.perf_counter()
    listed = len(list_files(folder))
    result["list_seconds"] = round(time.perf_counter() - start, 3)
    assert listed == args.images

    start = time.perf_counter()
    first = load_dataset("folder", str(folder), image_size=args.side, folder=options)
    seconds = time.perf_counter() - start
    assert isinstance(first.images, LazyImages) and first.images.store is not None
    result.update(first_pass_seconds=round(seconds, 2), first_pass_images_per_s=round(args.images / seconds),
                  decoded_images_held_at_most=first.images.peak_decoded,
                  peak_rss_mb_after_first_pass=round(peak_rss_mb(), 1))
    del first

    start = time.perf_counter()
    again = load_dataset("folder", str(folder), image_size=args.side, folder=options)
    result["cached_open_seconds"] = round(time.perf_counter() - start, 3)
    order = torch.randperm(len(again), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    checksum = 0
    for i in range(0, len(order), args.batch_size):
        checksum += int(again.images[order[i:i + args.batch_size]][:, 0, 0, 0].sum())
    seconds = time.perf_counter() - start
    result.update(cached_epoch_seconds=round(seconds, 3), cached_epoch_images_per_s=round(args.images / seconds),
                  peak_rss_mb_after_cached_epoch=round(peak_rss_mb(), 1),
                  cache_file_mb=round(sum(f.stat().st_size for f in cache.glob("images-*.npy")) / 2**20, 1))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
