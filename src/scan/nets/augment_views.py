"""The two views of the BYOL-with-queue pretext (`pretext.views`), assembled from augment.py's parts.

simclr       ours: each view is a SimCLR crop/flip/jitter/grey followed by RandAugment ops
             (StrongAugment); view b keeps StrongAugment's Cutout, view a has none.
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


@PRETEXT_VIEWS.register("simclr")
def simclr_views(cfg: AugmentConfig, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
    a, b = randaugment_views(cfg, image_size, channels)
    return (nn.Sequential(SimCLRAugment(cfg, image_size, channels), a),
            nn.Sequential(SimCLRAugment(cfg, image_size, channels), b))


def build_views(name: str, cfg: AugmentConfig, image_size: int, channels: int) -> tuple[nn.Module, nn.Module]:
    return PRETEXT_VIEWS.get(name)(cfg, image_size, channels)
