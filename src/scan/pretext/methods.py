"""The registry of pretext methods (`pretext.method`) and what the pretext stage asks of a method."""
from __future__ import annotations

from typing import Callable

from scan.core.registry import Registry

METHODS: Registry[Callable] = Registry("pretext.method")
register_pretext = METHODS.register


def list_pretext_methods() -> list[str]:
    return METHODS.names()


def build_pretext(name: str, backbone, cfg, image_size: int, channels: int, num_samples: int):
    return METHODS.get(name)(backbone, cfg, image_size, channels, num_samples)


def reads_strong_augment(pretext) -> bool:
    """Whether the configured method's views use the strong augmentation: its class attribute
    `strong_augment`, a bool or a function of the pretext section (views chosen by `pretext.views`)."""
    if pretext.method not in METHODS:
        return False
    reads = getattr(METHODS.get(pretext.method), "strong_augment", False)
    return bool(reads(pretext) if callable(reads) else reads)


def method_default(value, default):
    """The configured value, or the method's own default where the config leaves it None."""
    return default if value is None else value

