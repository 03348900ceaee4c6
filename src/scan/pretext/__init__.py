"""Self-supervised pretext methods, chosen by `pretext.method` through a registry.

A method is an nn.Module built from (backbone, config, image_size, channels, num_samples) that
exposes `.backbone`, `loss(x, index)` for a batch of float images in [0, 1] and their (B,)
positions in the data set (it applies its own augmentations; queue methods use `index` to keep
an image's own stale keys out of its negatives) and `after_step(step, total_steps)` for
momentum/EMA updates. All persistent state (momentum encoders, queues) lives in the module, so
checkpoints capture it.
"""
# importing the method modules registers them
from scan.pretext import byol_queue, moco, rotnet, simclr  # noqa: F401
from scan.pretext.methods import (
                                  METHODS,
                                  build_pretext,
                                  list_pretext_methods,
                                  method_default,
                                  reads_strong_augment,
                                  register_pretext,
)

__all__ = ["METHODS", "build_pretext", "list_pretext_methods", "method_default", "reads_strong_augment",
           "register_pretext"]
