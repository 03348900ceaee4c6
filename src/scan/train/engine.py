"""Device, precision, batching, schedules and the resumable epoch loop shared by all stages."""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scan.core import distributed
from scan.core.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from scan.core.errors import ConfigError, StageError
from scan.nets.models import Backbone
from scan.train.logs import EpochBar, TrainingLog


@dataclass
class Runtime:
    """Device and precision of a run: what every stage asks for autocast, memory layout and batches.

    On CUDA: bf16 autocast, channels-last, uint8 batches copied without blocking the host, and
    (`compile`) the backbones compiled in place by torch.compile. On the CPU, full precision and
    channels-last only where `channels_last_safe`. `autocast_dtype` and `force_channels_last` impose
    the CUDA choices on any device, so the tests run every line of the accelerator path on the CPU.
    """
    device: torch.device
    quiet: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    autocast_dtype: torch.dtype | None = None   # None: bf16 on CUDA, full precision elsewhere
    force_channels_last: bool = False
    channels_last: bool = True   # decided by `prepare` for the model it was given
    log: TrainingLog | None = None   # where run_epochs records each epoch (metrics.csv, TensorBoard)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> torch.dtype | None:
        """The autocast dtype, or None for full precision."""
        return self.autocast_dtype if self.autocast_dtype is not None else (torch.bfloat16 if self.cuda else None)

    def autocast(self):
        """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere unless forced."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device in the memory layout `batch` will use; with `compile`, compile
        its backbones in place (their state_dict keys stay those of the plain model)."""
        # channels-last convolutions are faster on CUDA and, measured here, 1.2-1.5x on AVX2 CPUs too;
        # but the CPU kernels of torch 2.13 corrupt memory for convolutions narrower than 16 channels
        safe = channels_last_safe(model)
        if self.force_channels_last and not (self.cuda or safe):
            raise ValueError("force_channels_last: this model has convolutions narrower than 16 channels, which "
                             "corrupt memory in torch's CPU channels-last kernels; force it on CUDA only")
        self.channels_last = self.cuda or safe
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            compile_backbones(model, self.compile_backend)
        return model

    def batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float [0, 1] on the device, in the layout `prepare` chose.

        Images are copied as uint8 (4x less than float) and converted on the device; a CPU batch
        bound for CUDA is pinned first, so the copy does not block the host.
        """
        if self.cuda and images_uint8.device.type == "cpu":
            images_uint8 = images_uint8.pin_memory()
        x = images_uint8.to(self.device, non_blocking=True).float().div_(255.0)   # uint8 -> [0, 1]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def channels_last_safe(model: nn.Module) -> bool:
    """Whether channels-last is safe on the CPU: every convolution at least 16 channels wide, the stem
    reading 1-3 channels aside. Narrower ones crash torch 2.13's CPU backward in that layout ('corrupted
    double-linked list', 'double free'): width 4 at any size; widths 8 and 12 of resnet_small on images of
    48 px and more (measured: 32 px and below survive, width 16 and up survive at 128 px)."""
    return all(min(m.in_channels, m.out_channels) >= 16 or m.in_channels <= 3 and m.out_channels >= 16
               for m in model.modules() if isinstance(m, nn.Conv2d))


def compile_backbones(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile every backbone inside `model`, in place (nn.Module.compile).

    The backbones carry nearly all the compute of every stage, whatever method calls them (a
    pretext method's `loss`, a clustering model's forward, `model.backbone(x)` for frozen
    features); compiling in place keeps `state_dict` keys unprefixed (no `_orig_mod.`), so
    checkpoints load into uncompiled models and resume either way. A deep copy (EMA, momentum
    encoder) is an ordinary module again.
    """
    for m in model.modules():
        if isinstance(m, Backbone):
            m.compile(backend=backend)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a valid torch device (use auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available here; use --device auto or cpu")
    return device


def minibatches(n: int, batch_size: int, shuffle: bool = True, drop_last: bool = True) -> list[torch.Tensor]:
    """Index batches over range(n) from the global torch RNG: this rank's share of each.

    `batch_size` is the global batch: under torchrun every rank draws the same permutation (the
    ranks' RNGs are seeded alike) and takes its 1/W slice of every batch, so W ranks together
    see exactly the batches one process would. The last partial batch is dropped in training
    when at least one full batch exists, so batch-norm never sees a batch of one.
    """
    order = torch.randperm(n) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    world = distributed.world_size()
    if world > 1:
        if drop_last and len(batches[0]) % world:
            raise ConfigError(f"a batch of {len(batches[0])} cannot be split evenly over {world} processes: "
                              f"make the batch sizes multiples of the number of processes")
        batches = [b.tensor_split(world)[distributed.rank()] for b in batches]
    return batches


def cosine_schedule(base: float, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up to `base`, then cosine decay to `final`."""
    total_steps = max(total_steps, 1)
    steps = np.arange(total_steps, dtype=np.float64)
    warm = min(warmup_steps, total_steps)
    t = np.clip((steps - warm) / max(total_steps - warm, 1), 0, 1)
    values = final + (base - final) * 0.5 * (1 + np.cos(math.pi * t))
    if warm:
        values[:warm] = base * (steps[:warm] + 1) / warm
    return values


def build_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` (sgd | adam | adamw) over `params`.

    `fused` picks the one-kernel update: Adam/AdamW `fused=True` (multi-tensor `foreach` where the
    device has no fused kernel), SGD `foreach=True`. None: when the parameters live on an
    accelerator (CUDA); the CPU keeps the plain per-parameter loop, so seeded CPU numbers stay
    those of earlier versions. True forces it on any device (the tests run it on the CPU).
    """
    params = list(params)
    if fused is None:
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = any(p.device.type != "cpu" for p in tensors)

    multi_tensor = {"foreach": True} if fused else {}

    def make(adam_kernel: dict) -> torch.optim.Optimizer:
        makers = {
            "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           nesterov=nesterov, **multi_tensor),
            "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **adam_kernel),
            "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **adam_kernel),
        }
        return makers[name]()
    try:
        return make({"fused": True} if fused else {})
    except RuntimeError:   # a device without fused Adam kernels: the multi-tensor path instead
        return make(multi_tensor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(loss: float, stage: str, epoch: int) -> None:
    if not math.isfinite(loss):
        raise StageError(f"{stage}: the loss became {loss} in epoch {epoch + 1}; the checkpoint of the last "
                         f"good epoch is kept and a rerun resumes from it. If it recurs, lower {stage}.lr "
                         f"(the stage then starts over).")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: str, epoch: int) -> float:
    """The gradient step of every training loop: finite-loss check, zero grad, backward, step.

    Returns the loss value (a NaN/inf loss raises StageError before any weight changes). Reading
    the value is the step's one wait for the device: the finite check uses it too.
    """
    value = loss.item()
    check_finite(value, stage, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


@torch.no_grad()
def predict_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, rt: Runtime,
                       batch_size: int = 512, desc: str | None = None, dtype=torch.float32) -> torch.Tensor:
    """Apply `fn` to uint8 images in batches (no augmentation) and concatenate on the CPU as `dtype`.

    Under torchrun each rank embeds its contiguous shard and every rank gets all the rows (in order),
    so all ranks must call it together.
    """
    out = []
    part = distributed.shard(len(images))
    bar = tqdm(range(part.start, part.stop, batch_size), desc=desc, disable=rt.quiet or desc is None, leave=False)
    for i in bar:
        with rt.autocast():
            out.append(fn(rt.batch(images[i:min(i + batch_size, part.stop)])).to(dtype).cpu())
    if not out:   # more ranks than images: this rank's share is empty, but it still takes part
        with rt.autocast():
            out.append(fn(rt.batch(images[:0])).to(dtype).cpu())
    return distributed.all_gather_rows(torch.cat(out))


class _GracefulStop:
    """Turn SIGTERM into KeyboardInterrupt so the epoch loop can checkpoint before exiting."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:   # not the main thread
            self.previous = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def run_epochs(stage: str, stage_dir: Path, epochs: int, steps_per_epoch: int, states: dict,
               epoch_fn: Callable[[int, Callable[[], None]], dict], fingerprint: str, rt: Runtime,
               after_epoch: Callable[[int, dict], bool] | None = None) -> list[dict]:
    """Run `epoch_fn(epoch, tick)` for each epoch, checkpointing after every epoch.

    `states` maps names to objects with state_dict/load_state_dict (model, optimizer, EMA ...).
    A checkpoint with the same `fingerprint` is resumed from; RNG states are restored too, so
    a resumed run continues exactly as an uninterrupted one would. `after_epoch(epoch, stats)`
    may return True to stop early. Returns the per-epoch statistics.
    """
    path = Path(stage_dir) / "checkpoint.pt"
    history: list[dict] = []
    start = 0
    ckpt = load_checkpoint(path)
    if ckpt is not None and ckpt.get("fingerprint") == fingerprint:
        for name, obj in states.items():
            obj.load_state_dict(ckpt["states"][name])
        set_rng_state(ckpt["rng"])
        history, start = ckpt["history"], ckpt["epoch"]
        if not rt.quiet and start < epochs:
            tqdm.write(f"{stage}: resuming from epoch {start + 1}/{epochs}", file=sys.stderr)
    stopped = bool(history and history[-1].get("stop"))
    bar = EpochBar(stage, epochs, start, steps_per_epoch, rt.quiet, rt.log)   # also writes metrics.csv (scan.train.logs)
    with _GracefulStop(), bar:
        for epoch in range(start, epochs):
            if stopped:
                break
            started = time.perf_counter()
            stats = epoch_fn(epoch, bar.tick)
            stats["epoch"] = epoch + 1
            stats["seconds"] = time.perf_counter() - started
            # every rank continues from the state rank 0 checkpoints
            distributed.broadcast_state(m if isinstance(m, nn.Module) else m.model for m in states.values()
                                          if isinstance(m, nn.Module) or isinstance(getattr(m, "model", None), nn.Module))
            if after_epoch is not None and after_epoch(epoch, stats):
                stats["stop"] = stopped = True
            history.append(stats)
            started = time.perf_counter()
            atomic_torch_save(path, {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                                     "states": {k: v.state_dict() for k, v in states.items()}, "rng": rng_state()})
            # measured after the save, so only the in-memory history (done.json) carries it
            stats["checkpoint_seconds"] = time.perf_counter() - started
            bar.epoch_done(stats)
    return history
