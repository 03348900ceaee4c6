"""Peak memory of choosing the cluster head: the SCAN loss of every head over every mined pair.

The ImageNet-200 setting of the paper configs: H = 10 heads, N = 260,000 images, K = 50
neighbours, C = 200 clusters. The probabilities are held in float16 (1.04 GB) and the loss is
evaluated in chunks, so the peak stays under 2 GB (the old (H, N, K, C) gather needed ~100 GB).
Prints JSON with the peak resident memory (ru_maxrss) and seconds.

    python benchmarks/scan_loss_memory.py [--heads 10 --images 260000 --neighbors 50 --clusters 200]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from scan.algo.losses import scan_loss_over_pairs


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--images", type=int, default=260_000)
    p.add_argument("--neighbors", type=int, default=50)
    p.add_argument("--clusters", type=int, default=200)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    before = peak_gb()
    probs = torch.empty(a.heads, a.images, a.clusters, dtype=torch.float16)
    for h in range(a.heads):   # filled head by head, as the model's batches would fill it
        probs[h] = torch.randn(a.images, a.clusters).softmax(-1)
    neighbors = torch.randint(a.images, (a.images, a.neighbors))
    inputs = peak_gb()
    start = time.time()
    total, consistency, entropy = scan_loss_over_pairs(probs, neighbors, 5.0)
    print(json.dumps({"heads": a.heads, "images": a.images, "neighbors": a.neighbors, "clusters": a.clusters,
                      "probs_gb": probs.numel() * 2 / 2**30, "peak_rss_gb_before": round(before, 3),
                      "peak_rss_gb_inputs": round(inputs, 3), "peak_rss_gb": round(peak_gb(), 3),
                      "seconds": round(time.time() - start, 1), "best_head": int(total.argmin())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
