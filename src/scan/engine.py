"""Device, precision, batching, schedules and the resumable epoch loop shared by all stages."""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scan.augment import to_float
from scan.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from scan.config import ConfigError


class StageError(RuntimeError):
    """A stage cannot go on (missing inputs, NaN loss, ...); the message says what to do."""


@dataclass
class Runtime:
    device: torch.device
    quiet: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    channels_last: bool = True

    def prepare(self, model: nn.Module) -> nn.Module:
        # channels-last convolutions are faster on CUDA and, measured here, 1.2-1.5x on AVX2 CPUs too;
        # but the CPU kernels of torch 2.13 corrupt memory for convolutions narrower than 8 channels
        self.channels_last = self.cuda or channels_last_safe(model)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (already on the device) -> float [0, 1] in the layout `prepare` chose."""
        x = to_float(images_uint8.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def channels_last_safe(model: nn.Module) -> bool:
    """Whether channels-last is safe on the CPU: every convolution at least 8 channels wide
    (narrower ones crash torch's CPU backward in that layout: 'corrupted double-linked list')."""
    return all(min(m.in_channels, m.out_channels) >= 8 or m.in_channels <= 3 and m.out_channels >= 8
               for m in model.modules() if isinstance(m, nn.Conv2d))


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
    """Index batches over range(n) from the global torch RNG.

    The last partial batch is dropped in training when at least one full batch exists, so
    batch-norm never sees a batch of one.
    """
    order = torch.randperm(n) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
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


def momentum_schedule(base: float, total_steps: int) -> np.ndarray:
    """Per-step EMA momentum rising from `base` to 1 on a cosine (BYOL):

    m_n = 1 − (1 − m_base)(cos(π n / (N − 1)) + 1) / 2,  n = 0 .. N − 1,  so m_0 = m_base and m_{N−1} = 1.
    """
    n = np.arange(max(total_steps, 1), dtype=np.float64)
    return 1 - (1 - base) * (np.cos(math.pi * n / max(total_steps - 1, 1)) + 1) / 2


def build_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    makers = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                       nesterov=nesterov),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    }
    return makers[name]()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(loss: torch.Tensor, stage: str, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise StageError(f"{stage}: the loss became {loss.item()} in epoch {epoch + 1}; the checkpoint of the last "
                         f"good epoch is kept and a rerun resumes from it. If it recurs, lower {stage}.lr "
                         f"(the stage then starts over).")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: str, epoch: int) -> float:
    """The gradient step of every training loop: finite-loss check, zero grad, backward, step.

    Returns the loss value (a NaN/inf loss raises StageError before any weight changes).
    """
    check_finite(loss, stage, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters take no gradients (an EMA teacher or momentum encoder)."""
    target = copy.deepcopy(model)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online for every parameter (buffers are left alone)."""
    for t, p in zip(target.parameters(), online.parameters()):
        t.lerp_(p.detach(), 1 - momentum)


class EMA:
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1 − d)·θ."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = frozen_copy(model).eval()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_update(self.model, model, self.decay)
        # the averaged model is evaluated, so it takes the live batch-norm statistics
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def write_back(self, model: nn.Module) -> None:
        """θ ← θ_ema: the average replaces the trained parameters, so training continues from it
        (the SCAN authors' self-labelling EMA on ImageNet, selflabel.ema_mode=write_back)."""
        for e, p in zip(self.model.parameters(), model.parameters()):
            p.copy_(e)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


@torch.no_grad()
def predict_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, rt: Runtime,
                       batch_size: int = 512, desc: str | None = None, dtype=torch.float32) -> torch.Tensor:
    """Apply `fn` to uint8 images in batches (no augmentation) and concatenate on the CPU as `dtype`."""
    out = []
    bar = tqdm(range(0, len(images), batch_size), desc=desc, disable=rt.quiet or desc is None, leave=False)
    for i in bar:
        with rt.autocast():
            out.append(fn(rt.batch(images[i:i + batch_size])).to(dtype).cpu())
    return torch.cat(out)


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
            tqdm.write(f"{stage}: resuming from epoch {start + 1}/{epochs}")
    stopped = bool(history and history[-1].get("stop"))
    bar = tqdm(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=stage, disable=rt.quiet,
               unit="step", dynamic_ncols=True)
    with _GracefulStop(), bar:
        for epoch in range(start, epochs):
            if stopped:
                break
            started = time.perf_counter()
            stats = epoch_fn(epoch, lambda: bar.update(1))
            stats["epoch"] = epoch + 1
            stats["seconds"] = time.perf_counter() - started
            if after_epoch is not None and after_epoch(epoch, stats):
                stats["stop"] = stopped = True
            history.append(stats)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if isinstance(v, float) and k != "seconds"},
                            refresh=False)
            started = time.perf_counter()
            atomic_torch_save(path, {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                                     "states": {k: v.state_dict() for k, v in states.items()}, "rng": rng_state()})
            # measured after the save, so only the in-memory history (done.json) carries it
            stats["checkpoint_seconds"] = time.perf_counter() - started
    return history
