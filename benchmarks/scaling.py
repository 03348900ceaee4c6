"""1 vs 2 processes (torch.distributed, gloo on the CPU): training images/s and communication per step
of every training stage's step; prints JSON.

    python benchmarks/scaling.py [--steps 10] [--batch 128] [--size 16]

Each stage's step runs as the stage runs it (sharded global batch, `distributed.parallel` = DDP,
the global-batch losses, real augmentations) on synthetic uint8 images with the small ResNet.
`comm_bytes_per_step` is what one process hands to collectives per step (inputs of all-reduce,
all-gather, all-to-all and broadcast, DDP's gradient buckets included), counted by wrapping
torch.distributed's functions.

On a 2-core CPU two processes cannot be faster than one: each already uses both cores for its
convolutions, so the ratio shows the overhead of splitting the batch and communicating, not the
speed-up one process per GPU gives.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from scan.algo.losses import scan_loss, selflabel_loss
from scan.core import distributed
from scan.nets.augment import StrongAugment, WeakAugment, to_float
from scan.nets.models import ClusteringModel, build_backbone
from scan.pipeline import load_config
from scan.pretext import build_pretext
from scan.train.engine import minibatches, optimizer_step

SENT = {"bytes": 0}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# what one process hands to each collective: all_reduce/broadcast(tensor), all_gather(outputs, input),
# all_to_all(outputs, inputs); DDP's gradient buckets are counted by its communication hook
SENDS = {"all_reduce": lambda args: [args[0]], "broadcast": lambda args: [args[0]],
         "all_gather": lambda args: [args[1]], "all_to_all": lambda args: list(args[1])}


def _count(name):
    original = getattr(dist, name)

    def counted(*args, **kwargs):
        SENT["bytes"] += _nbytes(SENDS[name](args))
        return original(*args, **kwargs)
    setattr(dist, name, counted)


def _counting_hook(state, bucket):
    SENT["bytes"] += _nbytes([bucket.buffer()])
    return default_hooks.allreduce_hook(state, bucket)


def _parallel(model, fn):
    wrapped = distributed.parallel(model, fn)
    if wrapped is not fn:
        wrapped.register_comm_hook(None, _counting_hook)
    return wrapped


def _stage(name: str, size: int, n: int):
    """(model, per-step loss of a batch of indices) built as the stage builds it."""
    cfg = load_config(None, [f"pretext.method={name if name not in ('cluster', 'selflabel') else 'simclr'}"])
    backbone = build_backbone("resnet_small", 1, [0.5], [0.25], width=16, blocks=(1, 1))
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if name not in ("cluster", "selflabel"):
        model = build_pretext(name, backbone, cfg, size, 1, n)
        fn = _parallel(model, model.loss)
        return model, lambda idx: fn(to_float(images[idx]), idx)
    model = ClusteringModel(backbone, 10, num_heads=1 if name == "selflabel" else 5)
    weak, strong = WeakAugment(cfg.augment, size), StrongAugment(cfg.augment, size)
    neighbors = torch.randint(n, (n, 5))
    if name == "cluster":
        fn = _parallel(model, lambda x: model(weak(x)))

        def loss(idx):
            nb = neighbors[idx, torch.randint(5, (len(idx),))]
            logits = fn(to_float(torch.cat([images[idx], images[nb]])))
            return scan_loss(logits[:, :len(idx)], logits[:, len(idx):])[0].sum()
        return model, loss

    def both(x):
        with torch.no_grad():
            w = model(weak(x))[0]
        return w, model(strong(x))[0]
    fn = _parallel(model, both)

    def loss(idx):
        w, s = fn(to_float(images[idx]))
        return selflabel_loss(w, s, 0.5)[0]
    return model, loss


def measure(args) -> dict:
    out = {}
    for name in ("simclr", "moco", "byol_queue", "cluster", "selflabel"):
        torch.manual_seed(0)
        n = args.batch * (args.steps + 2)
        model, loss_of = _stage(name, args.size, n)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        batches = minibatches(n, args.batch)
        for i, idx in enumerate(batches):
            if i == 2:             # two warm-up steps
                distributed.barrier()
                start, SENT["bytes"] = time.perf_counter(), 0
            model.train()
            optimizer_step(optimizer, loss_of(idx), name, 0)
            if hasattr(model, "after_step"):
                model.after_step(i, len(batches))
        distributed.barrier()
        seconds = time.perf_counter() - start
        steps = len(batches) - 2
        out[name] = {"images_per_s": round(steps * args.batch / seconds, 1),
                     "comm_bytes_per_step": int(SENT["bytes"] / steps)}
    return out


def _worker(rank, world, port, args, path):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for name in SENDS:
        _count(name)
    result = measure(args)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--size", type=int, default=16, help="image side")
    args = parser.parse_args()
    one = measure(args)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        path = os.path.join(tmp, "two.json")
        mp.spawn(_worker, args=(2, port, args, path), nprocs=2, join=True)
        with open(path) as f:
            two = json.load(f)
    result = {"cpu_cores": os.cpu_count(), "threads_one_process": torch.get_num_threads(),
              "threads_per_process_of_two": max(1, (os.cpu_count() or 2) // 2), "global_batch": args.batch, "image": [1, args.size, args.size],
              "steps": args.steps, "stages": {name: {"one_process_images_per_s": one[name]["images_per_s"],
                                                     "two_processes_images_per_s": two[name]["images_per_s"],
                                                     "ratio": round(two[name]["images_per_s"]
                                                                    / one[name]["images_per_s"], 2),
                                                     "comm_bytes_per_step_per_process": two[name]["comm_bytes_per_step"]}
                                              for name in one},
              "note": "2 CPU cores: each process already uses the cores, so 2 processes show the cost of splitting "
                      "and communicating, not the per-GPU speed-up"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
