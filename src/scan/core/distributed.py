"""Several processes on one or several machines (`torchrun`): who this process is, how it talks
to the others, and the data-parallel wrapper of what trains.

Launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment), `init` joins the
process group: nccl when the run's device is CUDA (each process on cuda:LOCAL_RANK), gloo on the
CPU. Without those variables (or with a world of one) nothing is initialised and every helper
here is the identity: a single process behaves exactly as before this module existed.

The rules the stages follow (why each helper exists):
- data: each rank trains on its slice of every global batch of one seeded permutation
  (`engine.minibatches`), so a configured batch size is the global batch at any scale;
- gradients: DDP averages them over ranks, so every per-rank loss is the mean over the rank's
  own rows; a loss term that needs the whole batch (NT-Xent's negatives, SCAN's mean prediction)
  gathers it with gradients (`all_gather_with_grad`, `sum_with_grad`), whose backward sums the
  gradients of every rank: averaged by DDP, 2 ranks × B/2 give the gradient of 1 process × B;
- artifacts: only rank 0 writes (`scan.core.checkpoint` skips the write elsewhere); `on_main` runs
  rank-0-only work (claiming the run directory, mining, evaluation) and hands its result or its
  error to every rank.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scan.core.errors import ConfigError, RunError

_local_only = [False]   # True inside `on_main`'s rank-0 work: helpers act as one process


# seconds processes started by hand (no torchrun) wait for each other before giving up ($SCAN_JOIN_TIMEOUT)
JOIN_TIMEOUT = 300


def _environment_number(name: str, default: str) -> int:
    """A count torchrun puts in the environment; a ConfigError naming it when it is not one."""
    value = os.environ.get(name, default)
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"environment variable {name}={value!r} must be a whole number >= 0 (torchrun sets it; "
                          f"unset WORLD_SIZE, RANK and LOCAL_RANK to run in one process)")
    return number


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return _environment_number("WORLD_SIZE", "1") > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and not _local_only[0]


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the only process that writes artifacts and prints progress (True in one process)."""
    return rank() == 0


@contextlib.contextmanager
def rank_random(device: torch.device):
    """Inside: random numbers of this rank's own (for augmentation); outside: the stream every rank shares.

    All ranks draw the same permutations from one seeded stream (`engine.minibatches`), so without
    this each rank would also draw the same augmentation parameters: rank r's i-th image would get
    rank 0's i-th crop. Here every rank takes one number from the shared stream (keeping it in step,
    and the run reproducible and resumable from the checkpointed state) and seeds a forked stream
    with it and its rank. One process: nothing changes.
    """
    if world_size() == 1:
        yield
        return
    draw = int(torch.randint(2 ** 62, (1,)))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed((draw + 1_000_003 * rank()) % 2 ** 63)
        yield


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once); returns the device this rank uses.

    nccl for CUDA (device cuda:LOCAL_RANK), gloo otherwise. Without torchrun: `device` unchanged.
    """
    if not launched():
        return device
    rank_, world, local = (_environment_number(name, default) for name, default in
                           (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    if rank_ >= world:
        raise ConfigError(f"environment variable RANK={rank_} must be below WORLD_SIZE={world} (torchrun sets both)")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group(backend)
        else:   # set by hand, not by torchrun: nobody may be coming, so say so and stop waiting in time
            dist.init_process_group(backend, store=_hand_set_store(rank_, world), rank=rank_, world_size=world)
        atexit.register(shutdown)
    return device


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for the duration: what native code writes there (Python's own stderr
    object is untouched, and restored with it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _hand_set_store(rank_: int, world: int) -> dist.Store:
    """The rendezvous of processes started by hand (WORLD_SIZE, RANK, MASTER_ADDR/PORT set without torchrun),
    given up after $SCAN_JOIN_TIMEOUT seconds (default JOIN_TIMEOUT) with one line instead of torch's 30
    silent minutes; once all have joined, collectives keep torch's own timeout."""
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _environment_number("MASTER_PORT", "29500")
    seconds = _environment_number("SCAN_JOIN_TIMEOUT", str(JOIN_TIMEOUT))
    print(f"scan: RANK={rank_} of WORLD_SIZE={world} without torchrun: waiting up to {seconds} s for the other "
          f"{world - 1} process(es) at {address}:{port} (unset WORLD_SIZE and RANK to run in one process)",
          file=sys.stderr, flush=True)
    try:
        with _native_stderr_silenced():   # c10d logs every retry with a C++ stack trace
            return dist.TCPStore(address, port, world, is_master=rank_ == 0, timeout=timedelta(seconds=seconds),
                                 wait_for_workers=True)
    except (RuntimeError, dist.DistError) as e:   # DistStoreError / DistNetworkError: nobody came in time
        raise RunError(f"RANK={rank_} of WORLD_SIZE={world}: the other process(es) did not join {address}:{port} "
                       f"within {seconds} s ({type(e).__name__}); start every rank (or use torchrun), or unset "
                       f"WORLD_SIZE and RANK to run in one process") from None


def shutdown() -> None:
    """Leave the process group (at exit; a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (any picklable value)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], object]):
    """fn() on rank 0 only, acting as a single process; its result (or its exception) on every rank.

    For work done once (claiming the run directory, mining, metrics): the other ranks wait, then
    return the same value or raise the same error, so no rank hangs in a collective.
    """
    if not active():
        return fn()
    outcome = None
    if rank() == 0:
        _local_only[0] = True
        try:
            outcome = ("ok", fn())
        except Exception as e:   # handed to every rank, then raised everywhere
            outcome = ("error", e)
        finally:
            _local_only[0] = False
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


# ------------------------------------------------------------------------ collectives

def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every rank concatenated in rank order, offset of this rank's rows), differentiable.

    The backward sums every rank's gradient for this rank's rows (torch.distributed.nn). Ranks must
    pass tensors of the same shape (they do: `minibatches` splits every batch evenly).
    """
    if not active():
        return x, 0
    with _quiet_deprecation():
        return torch.cat(dist_nn.all_gather(x)), rank() * len(x)


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank concatenated in rank order, no gradient; rank shards may differ in length."""
    if not active():
        return x
    sizes = [None] * world_size()
    dist.all_gather_object(sizes, len(x))
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=_comm_device(x))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a tensor must be to be sent: nccl moves CUDA tensors only (results gathered on the CPU)."""
    if dist.get_backend() == "nccl" and x.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `x`, differentiable (the backward sums the gradients of every rank)."""
    if not active():
        return x
    with _quiet_deprecation():
        return dist_nn.all_reduce(x)


@contextlib.contextmanager
def _quiet_deprecation():
    """torch 2.13 deprecates torch.distributed.nn's differentiable collectives and DDP's
    broadcast_buffers in favour of private or not yet complete replacements; the public ones are
    kept and their per-call FutureWarning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `x` (a new tensor; no gradient)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def shard(n: int) -> slice:
    """This rank's contiguous share of range(n) (the first n mod W ranks take one more)."""
    size, extra = divmod(n, world_size())
    start = rank() * size + min(rank(), extra)
    return slice(start, start + size + (rank() < extra))


@torch.no_grad()
def broadcast_state(modules) -> None:
    """Rank 0's parameters and buffers on every rank (once an epoch), so that every rank holds
    exactly the state rank 0 checkpoints and a resumed run continues as an uninterrupted one:
    batch-norm statistics are per rank without sync_batchnorm, and a stage trained whole on every
    rank (SPC) could drift on non-deterministic GPU kernels."""
    if not active():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


# ------------------------------------------------------------------------ the model wrapper

class _Forward(nn.Module):
    """`fn(*args)`, a forward pass that uses `model`, as the forward of a module that owns it."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)


def parallel(model: nn.Module, fn: Callable, sync_batchnorm: bool = True) -> Callable:
    """`fn` (a forward pass using `model`) run data-parallel: DDP averages `model`'s gradients over
    the ranks. In one process, `fn` itself.

    The stages keep `model` for everything else (attributes, state_dict, evaluation); only the
    training forward goes through DDP, which is what DDP needs to synchronise the backward.
    With `sync_batchnorm`, batch-norm layers use the statistics of the global batch.
    """
    if not active():
        return fn
    if sync_batchnorm:
        convert_batchnorm(model)
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    # buffers are not broadcast every step: queues are filled identically on every rank and
    # batch-norm statistics are synchronised once per epoch (`broadcast_state`)
    with _quiet_deprecation():   # (the option's new name would still sync the buffers at start)
        return DistributedDataParallel(_Forward(model, fn), device_ids=device_ids, broadcast_buffers=False)


def model_device(model: nn.Module) -> torch.device:
    return next(iter([*model.parameters(), *model.buffers()])).device


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch on any device: in training, the mean and (biased) variance
    of every rank's rows, from differentiable all-reduces of Σx and then Σ(x − mean)². Stands in
    for nn.SyncBatchNorm, which refuses CPU tensors, when the ranks train on CPUs."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims, shape = [d for d in range(x.dim()) if d != 1], [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce_sum(torch.tensor([x.numel() // x.shape[1]], device=x.device)).item()
        mean = sum_with_grad(x.sum(dims)) / n                                    # (C,)
        centred = x - mean.view(shape)
        var = sum_with_grad((centred * centred).sum(dims)) / n                   # (C,) biased, as batch norm
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), factor)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_batchnorm(model: nn.Module) -> None:
    """Replace every batch-norm layer below `model` by one over the global batch, in place and
    sharing its parameters and buffers (optimizers built before keep working)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (GlobalBatchNorm,
                                                                                        nn.SyncBatchNorm)):
            cls = nn.SyncBatchNorm if model_device(child).type == "cuda" else GlobalBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(new, key, value)
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_batchnorm(child)

