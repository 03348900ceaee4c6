"""A FIFO queue of past keys used as InfoNCE negatives (MoCo, BYOL with a negative queue)."""
from __future__ import annotations

import torch
from torch import nn

from scan.core import distributed


class NegativeQueue(nn.Module):
    """The last `size` L2-normalised keys (size, D), each with the data-set index of its image.

    Buffers, so the queue is saved in checkpoints and moves with the module. A slot that was
    never filled has index −1 and is ignored, so the first steps see fewer negatives rather
    than random vectors.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (K, D), ignore (B, K)) for a batch of images at data-set positions `index` (B,).

        ignore_ij marks empty slots and slot j holding an older key of image i itself: the same
        image is no negative of itself. The keys are a copy, so a later `push` cannot change
        tensors the loss saved for its backward pass.
        """
        ignore = (self.ids[None, :] == index[:, None]) | (self.ids < 0)[None, :]
        return self.keys.clone(), ignore

    @torch.no_grad()
    def push(self, keys: torch.Tensor, index: torch.Tensor) -> None:
        """Enqueue a batch (after the loss has used the queue), overwriting the oldest entries.

        Under torchrun the keys and indices of every rank are enqueued, in rank order (the global
        batch's order), so every rank's queue is the one a single process would hold.
        """
        keys, index = distributed.all_gather_rows(keys.detach()), distributed.all_gather_rows(index)
        size = len(self.ids)
        keys, index = keys[-size:], index[-size:]
        slots = (self.ptr + torch.arange(len(keys), device=self.ids.device)) % size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = index
        self.ptr.copy_((self.ptr + len(keys)) % size)
