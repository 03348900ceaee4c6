"""Overhead of our training loop: images/s of each training stage as it really runs (the stage's
own code through engine.run_epochs and engine.optimizer_step) against a minimal hand-written
PyTorch loop of the same model, batch, augmentation, loss and optimizer, on a synthetic data set.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/loop_overhead.py \\
        [--images 2048] [--epochs 3] [--clock cpu|wall]

Prints JSON. `ratio` = hand-written images/s ÷ ours (1.00: no overhead; the aim is ≤ 1.10). Each
loop's speed is its fastest epoch after the first (warm-up); the fastest epoch is the one least
disturbed by other jobs on a shared machine. `--clock cpu` (the default) times both loops in CPU
seconds of this process rather than wall seconds: on a machine shared with other jobs, wall time
mostly measures the others (run with OMP_NUM_THREADS=1 so CPU time is one thread's). An image is
one training sample: an image for SimCLR (two views), an anchor with its neighbour for the
cluster stage, an image with its weak and strong view for self-labelling. The per-epoch
checkpoint is not part of the loop's epoch time. The two loops alternate epoch by epoch (the
hand-written one runs at our per-epoch checkpoint), so a change in the load from other jobs
meets both.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import scan.train.engine
from scan.algo.losses import nt_xent, scan_loss, selflabel_loss
from scan.core.checkpoint import read_json
from scan.data import ImageDataset
from scan.nets.augment import StrongAugment, WeakAugment, build_augment
from scan.nets.models import ContrastiveModel
from scan.pipeline import load_config, open_run, run_pipeline
from scan.pipeline.run import load_stage_model
from scan.train.engine import build_optimizer, channels_last_safe, cosine_schedule
from scan.train.sources import load_backbone

STAGES = ("pretext", "cluster", "selflabel")


def synthetic_images(n: int, side: int, classes: int = 10, seed: int = 0) -> ImageDataset:
    """`n` grey uint8 images: `classes` smooth random prototypes, shifted and noisy, so that the
    stages have something to learn (self-labelling needs confident predictions)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(classes, 1, side // 4, side // 4, generator=g), size=(side, side),
                           mode="bilinear", align_corners=False)
    labels = torch.randint(classes, (n,), generator=g)
    x = protos[labels] + 0.15 * torch.randn(n, 1, side, side, generator=g)
    x = torch.stack([torch.roll(im, (int(dy), int(dx)), (1, 2))
                     for im, dy, dx in zip(x, *torch.randint(-2, 3, (2, n), generator=g))])
    return ImageDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), labels.numpy(), None)


def overrides(width: int, epochs: int) -> list[str]:
    return [f"model.width={width}", "model.stem_stride=2", "device=cpu", "quiet=true",
            f"pretext.epochs={epochs}", "pretext.batch_size=256",
            f"cluster.epochs={epochs}", "cluster.batch_size=128", "cluster.num_heads=10",
            f"selflabel.epochs={epochs}", "selflabel.batch_size=256", "selflabel.threshold=0.5",
            "selflabel.min_cluster_keep=0", "mine.num_neighbors=20"]


def hand_written(stage: str, run, clock):
    """The plainest loop a PyTorch user would write for `stage`, one epoch per `next()`, yielding
    its seconds: the same model (from the same starting weights), batch, augmentation, loss,
    optimizer and learning-rate schedule as ours."""
    cfg, n = run.cfg, len(run.train)
    images = run.train.images
    side, channels = run.image_size, run.channels
    if stage == "pretext":
        model = ContrastiveModel(run.backbone(), cfg.model.projection_dim)
        augment, section = build_augment("simclr", cfg.augment, side, channels), cfg.pretext
    elif stage == "cluster":
        model = run.clustering_model(cfg.cluster.num_heads)
        model.backbone.load_state_dict(load_backbone(run).state_dict())
        augment, section = build_augment(cfg.cluster.augment, cfg.augment, side, channels), cfg.cluster
        neighbors = torch.from_numpy(np.load(run.path("mine", "neighbors.npy")))
    else:
        model = load_stage_model(run, "cluster")
        weak, strong = WeakAugment(cfg.augment, side), StrongAugment(cfg.augment, side)
        section = cfg.selflabel
    batch = section.batch_size
    channels_last = channels_last_safe(model)   # what our Runtime does on the CPU
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), section.optimizer, section.lr, section.weight_decay, section.momentum)
    steps = n // batch
    lrs = cosine_schedule(section.lr, section.epochs * steps) if stage == "pretext" else None

    def to_input(idx):
        x = images[idx].float() / 255
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    for epoch in range(section.epochs):
        model.train()
        start = clock()
        for i, idx in enumerate(torch.randperm(n)[:steps * batch].view(steps, batch)):
            if lrs is not None:
                for group in opt.param_groups:
                    group["lr"] = lrs[epoch * steps + i]
            if stage == "pretext":
                x = to_input(idx)
                loss = nt_xent(model(augment(x)), model(augment(x)), 0.1)
            elif stage == "cluster":
                nb = neighbors[idx, torch.randint(neighbors.shape[1], (batch,))]
                logits = model(augment(to_input(torch.cat([idx, nb]))))
                loss = scan_loss(logits[:, :batch], logits[:, batch:], cfg.cluster.entropy_weight)[0].sum()
            else:
                x = to_input(idx)
                with torch.no_grad():
                    weak_logits = model(weak(x))[0]
                loss = selflabel_loss(weak_logits, model(strong(x))[0], cfg.selflabel.threshold,
                                      cfg.selflabel.class_balance)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        yield clock() - start


def interleaved(stage: str, run, clock) -> list[float]:
    """Run our `stage` with one epoch of the hand-written loop after each of its epochs (at its
    per-epoch checkpoint), so both loops meet the same load from other jobs; returns the
    hand-written loop's epoch seconds."""
    hand, seconds = hand_written(stage, run, clock), []
    real_save = scan.train.engine.atomic_torch_save

    def save_after_a_hand_epoch(path, obj):
        seconds.extend(itertools.islice(hand, 1))
        real_save(path, obj)
    scan.train.engine.atomic_torch_save = save_after_a_hand_epoch
    try:
        run_pipeline(run, (stage,))
    finally:
        scan.train.engine.atomic_torch_save = real_save
    return seconds


def fastest_after_warmup(seconds: list[float]) -> float:
    return min(seconds[1:] or seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    # the epoch loop times its epochs with time.perf_counter: give it the same clock as the hand-written loop
    scan.train.engine.time = types.SimpleNamespace(perf_counter=clock)
    torch.manual_seed(0)
    train = synthetic_images(args.images, args.side)
    evaluation = synthetic_images(256, args.side, seed=1)
    cfg = load_config("digits", overrides(args.width, args.epochs))
    run = open_run(cfg, Path(tempfile.mkdtemp(prefix="scan-loop-")) / "run", data=(train, evaluation))
    result = {"clock": args.clock, "images": args.images, "side": args.side, "width": args.width,
              "epochs": args.epochs, "threads": torch.get_num_threads(), "stages": {}}
    for stage in STAGES:
        if stage == "cluster":
            run_pipeline(run, ("mine",))
        hand = fastest_after_warmup(interleaved(stage, run, clock))
        history = read_json(run.path(stage, "done.json"))["history"]
        ours = fastest_after_warmup([h["seconds"] for h in history])
        section = getattr(cfg, stage)
        per_epoch = len(train) // section.batch_size * section.batch_size
        result["stages"][stage] = {
            "batch_size": section.batch_size, "images_per_epoch": per_epoch,
            "ours_images_per_s": round(per_epoch / ours, 1), "hand_written_images_per_s": round(per_epoch / hand, 1),
            "ratio": round(hand and ours / hand, 3),
            "epoch_seconds": round(ours, 3)}
        print(f"{stage}: {result['stages'][stage]}", file=sys.stderr)
    result["max_ratio"] = max(s["ratio"] for s in result["stages"].values())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
