"""Size and generation time of the HTML report for 1,000 and 100,000 images.

Runs the real report code (scan.report.render_report) on synthetic runs: smooth photo-like
64x64 colour images (random low-frequency colour fields, so WebP compresses them about as well as
small photos), features drawn around one centre per cluster, and file paths in a folder. Prints
JSON: for each size, the bytes of every file written (report.html and the member pages),
their total, the largest file, the seconds taken to write them, and the seconds headless Chromium
takes to open report.html and the largest file (beyond its start-up; null without Chromium).

    python benchmarks/report_size.py [--sizes 1000 100000] [--clusters 10]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scan.report import ReportData, render_report, write_files

IMAGE_SIDE = 64
FEATURE_DIM = 512


def synthetic_images(n: int, seed: int, side: int = IMAGE_SIDE) -> torch.Tensor:
    """(n, 3, side, side) uint8: 4x4 random colours blown up smoothly, plus a little grain."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((n, 3, side, side), dtype=torch.uint8)
    for start in range(0, n, 4096):   # in blocks: 100,000 float images at once would need 5 GB
        m = min(4096, n - start)
        coarse = torch.rand((m, 3, 4, 4), generator=g)
        smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
        grain = 0.03 * torch.randn((m, 3, side, side), generator=g)
        out[start:start + m] = ((smooth + grain).clamp(0, 1) * 255).to(torch.uint8)
    return out


def synthetic_data(n: int, k: int = 10, seed: int = 0, folder: str = "/photos") -> ReportData:
    """A made-up finished run of n images in k clusters, with paths, features and probabilities."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    centres = rng.normal(size=(k, FEATURE_DIM)).astype(np.float32)
    features = centres[truth] + 1.5 * rng.normal(size=(n, FEATURE_DIM)).astype(np.float32)
    logits = 2.5 * features @ centres.T / FEATURE_DIM ** 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ids = [f"{folder}/kind {truth[i]}/IMG_{i:06d}.jpg" for i in range(n)]
    return ReportData(source=folder, run_dir="/runs/synthetic", images=synthetic_images(n, seed), ids=ids,
                      probs=probs.astype(np.float32), features=features, seed=seed,
                      summary={"images": f"{n:,}", "clusters": str(k)},
                      evaluated_on=f"all {n:,} images (in-sample: there is no held-out split)",
                      labels=truth, class_names=[f"kind {c}" for c in range(k)], eval_pred=probs.argmax(1),
                      eval_labels=truth, curves={"cluster": list(np.linspace(-1.0, -2.2, 30))}, entropy_weight=5.0,
                      neighbors=rng.integers(0, n, (n, 5)))


def open_seconds(page: Path, profile: Path) -> float | None:
    """Wall seconds for headless Chromium to load `page` and run its script, less an empty page's (start-up)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    blank = page.with_name("blank.html")
    blank.write_text("<!doctype html><title>blank</title>")

    def load(target: Path) -> float:
        start = time.perf_counter()
        subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
                        "--dump-dom", target.as_uri()], capture_output=True, check=True, timeout=300)
        return time.perf_counter() - start

    load(blank)   # the first start warms the profile
    seconds = load(page) - load(blank)
    blank.unlink()
    return round(seconds, 2)


def measure(n: int, k: int) -> dict:
    data = synthetic_data(n, k)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_files(Path(tmp), render_report(data))
        seconds = time.perf_counter() - start
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(Path(tmp).rglob("*.html"))}
        largest = max(sizes, key=sizes.get)
        opening = {name: open_seconds(Path(tmp) / name, Path(tmp) / "profile")
                   for name in dict.fromkeys(["report.html", largest])}
    return {"images": n, "clusters": k, "seconds": round(seconds, 1), "files": len(sizes),
            "total_bytes": sum(sizes.values()), "report_html_bytes": sizes["report.html"],
            "largest_file_bytes": sizes[largest], "chromium_open_seconds": opening, "bytes_per_file": sizes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--per-file", action="store_true", help="list the bytes of every file")
    args = parser.parse_args(argv)
    results = [measure(n, args.clusters) for n in args.sizes]
    if not args.per_file:
        for r in results:
            if r["files"] > 5:
                r["bytes_per_file"] = f"{r['files']} files, see --per-file"
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
