"""The two views of the BYOL-with-queue pretext (`pretext.views`), assembled from augment.py's parts.

simclr       ours: both views are a SimCLR crop/flip/jitter/grey (SimCLRAugment), the views of
             our SimCLR and MoCo. RandAugment ops and Cutout on top of the crop (what this was
             before) leave an 8x8 digit so little of itself that the views of one image are no
             closer than those of two (nearest view in pixels: the same image 0.5%, the same
             class 31%, against 7% and 87% for the crop alone), and BYOL-queue, whose target starts
             as a random network, then learns nothing: its loss stays at log(queue size).
randaugment  the many-class paper's views: RandAugment ops alone (StrongAugment: flip, shift,
             ops), Cutout on view b only. No resized crop and no colour jitter or grey.

Both take float images (B, C, H, W) in [0, 1]; a builder returns (view a, view b) modules.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from scan.config import AugmentConfig
from scan.core.registry import Registry
from scan.nets.augment import SimCLRAugment, StrongAugment

ViewsBuilder = Callable[[AugmentConfig, int, int], tuple[nn.Module, nn.Module]]
PRETEXT_VIEWS: Registry[ViewsBuilder] = Registry("pretext.views")


@PRETEXT_VIEWS.register("randaugment")
def randaugment_views(cfg: AugmentConfig, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
    no_cutout = dataclasses.replace(cfg, cutout_fraction=0.0)
    return StrongAugment(no_cutout, image_size), StrongAugment(cfg, image_size)


randaugment_views.uses_strong_augment = True   # reads augment.strong_strength (views_use_strong_augment)


@PRETEXT_VIEWS.register("simclr")
def simclr_views(cfg: AugmentConfig, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
    return SimCLRAugment(cfg, image_size, channels), SimCLRAugment(cfg, image_size, channels)


def views_use_strong_augment(name: str) -> bool:
    """Whether the views `name` are built from StrongAugment, and so read augment.strong_strength."""
    return getattr(PRETEXT_VIEWS.get(name), "uses_strong_augment", False)


def build_views(name: str, cfg: AugmentConfig, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
    return PRETEXT_VIEWS.get(name)(cfg, image_size, channels)
