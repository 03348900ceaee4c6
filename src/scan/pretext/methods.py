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


def reads_strong_augment(name: str) -> bool:
    """Whether the method's views use the strong augmentation (a class attribute `strong_augment`)."""
    return name in METHODS and getattr(METHODS.get(name), "strong_augment", False)


def method_default(value, default):
    """The configured value, or the method's own default where the config leaves it None."""
    return default if value is None else value

