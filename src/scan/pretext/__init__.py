"""Self-supervised pretext methods, chosen by `pretext.method` through a registry.

A method is an nn.Module built from (backbone, config, image_size, channels, num_samples) that
exposes `.backbone`, `loss(x, index)` for a batch of float images in [0, 1] and their (B,)
positions in the data set (it applies its own augmentations; queue methods use `index` to keep
an image's own stale keys out of its negatives) and `after_step(step, total_steps)` for
momentum/EMA updates. All persistent state (momentum encoders, queues) lives in the module, so
checkpoints capture it.
"""
from __future__ import annotations

from typing import Callable

from scan.core.registry import Registry

METHODS: Registry[Callable] = Registry("pretext.method")
register_pretext = METHODS.register


def list_pretext_methods() -> list[str]:
    return METHODS.names()


def build_pretext(name: str, backbone, cfg, image_size: int, channels: int, num_samples: int):
    return METHODS.get(name)(backbone, cfg, image_size, channels, num_samples)


def reads_strong_augment(name: str) -> bool:
    """Whether the method's views use the strong augmentation (a class attribute `strong_augment`)."""
    return name in METHODS and getattr(METHODS.get(name), "strong_augment", False)


def method_default(value, default):
    """The configured value, or the method's own default where the config leaves it None."""
    return default if value is None else value


from scan.pretext import byol_queue, moco, rotnet, simclr  # noqa: E402,F401  (registers the built-in methods)
