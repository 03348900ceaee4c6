"""Backbones (a registry of ResNets), the pretext model and the multi-head clustering model.

Every model takes float images in [0, 1] of shape (B, C, H, W); per-channel normalisation
lives inside the backbone as buffers, so a saved or exported model needs no extra
pre-processing step that a user could get wrong.
"""
from __future__ import annotations

import re
from itertools import accumulate
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scan.core.checkpoint import load_torch, strip_prefixes
from scan.core.errors import ArtifactError, ConfigError
from scan.core.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("model.backbone")
register_backbone = BACKBONES.register


def list_backbones() -> list[str]:
    return BACKBONES.names()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A ResNet trunk returning globally average-pooled features (B, feature_dim)."""

    def __init__(self, block, blocks: Sequence[int], widths: Sequence[int], in_channels: int, imagenet_stem: bool,
                 stem_stride: int = 1):
        super().__init__()
        w0 = widths[0]
        if imagenet_stem:   # 7x7/2 conv + max-pool: for 96 px and larger inputs
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:               # 3x3 conv, no pooling: keeps resolution for 8-32 px inputs
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True))
        layers, cin = [], w0
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, w, stride))
                cin = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


class Backbone(nn.Module):
    """Input normalisation + trunk. `forward` maps [0, 1] images to (B, feature_dim) features."""

    def __init__(self, trunk: nn.Module, in_channels: int, mean=None, std=None):
        super().__init__()
        self.trunk = trunk
        self.feature_dim = trunk.feature_dim
        self.in_channels = in_channels
        mean = torch.as_tensor(mean if mean is not None else [0.5] * in_channels, dtype=torch.float32)
        std = torch.as_tensor(std if std is not None else [0.25] * in_channels, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return self.trunk((x - self.mean) / self.std)


@register_backbone("resnet_small")
def resnet_small(in_channels: int, width: int = 32, blocks: Sequence[int] = (1, 1, 1), stem_stride: int = 1,
                 **_) -> nn.Module:
    """A narrow CIFAR-style ResNet for CPU runs: stages of width w, 2w, 4w, ...

    `stem_stride=2` halves the resolution at the stem: 4x cheaper on 28+ px images.
    """
    widths = [width * 2 ** i for i in range(len(blocks))]
    return ResNet(BasicBlock, blocks, widths, in_channels, imagenet_stem=False, stem_stride=stem_stride)


@register_backbone("resnet18_cifar")
def resnet18_cifar(in_channels: int, **_) -> nn.Module:
    """ResNet-18 with a 3x3 stem and no max-pool (the SCAN/SimCLR CIFAR variant)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), in_channels, imagenet_stem=False)


@register_backbone("resnet18")
def resnet18(in_channels: int, **_) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), in_channels, imagenet_stem=True)


@register_backbone("resnet50")
def resnet50(in_channels: int, **_) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), in_channels, imagenet_stem=True)


def build_backbone(name: str, in_channels: int, mean=None, std=None, **kwargs) -> Backbone:
    return Backbone(BACKBONES.get(name)(in_channels=in_channels, **kwargs), in_channels, mean, std)


def torchvision_resnet_keys(state: dict) -> dict:
    """Rename a torchvision-style ResNet state dict to the names of our `ResNet` trunk.

    conv1/bn1 → stem.0/stem.1; layerL.B.* → layers.(B + number of blocks in layers 1..L−1).*;
    downsample → shortcut; `fc` and other keys are dropped. Block counts come from the keys.
    """
    blocks: dict[int, int] = {}
    for key in state:
        if m := re.match(r"layer(\d+)\.(\d+)\.", key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    offsets = dict(zip(sorted(blocks), accumulate([0] + [blocks[k] for k in sorted(blocks)])))
    out = {}
    for key, value in state.items():
        if key.startswith(("conv1.", "bn1.")):
            out[("stem.0" if key.startswith("conv1.") else "stem.1") + key[key.index("."):]] = value
        elif m := re.match(r"layer(\d+)\.(\d+)\.(.*)", key):
            out[f"layers.{offsets[int(m[1])] + int(m[2])}.{m[3].replace('downsample.', 'shortcut.')}"] = value
    return out


def load_backbone_weights(backbone: Backbone, path: str) -> None:
    """Initialise `backbone` in place from a local checkpoint (model.init_checkpoint).

    Accepts our pretext/backbone.pt or a torchvision-style ResNet such as MoCo's, bare or under
    'state_dict'/'model', wrapped in any of the prefixes `checkpoint.strip_prefixes` removes
    (`module.`, `encoder_q.`, `backbone.`). Every trunk weight must be present with the right
    shape; normalisation buffers missing from the file keep the data's statistics.
    """
    source = f"model.init_checkpoint={path}"
    if not Path(path).is_file():
        raise ConfigError(f"{source} does not exist")
    try:
        state = load_torch(Path(path))
    except ArtifactError:   # its wording is for a run's own files; this one is the user's
        raise ConfigError(f"{source} is not a PyTorch file of tensors that loads safely (expected a .pt/.pth "
                          f"state dict, e.g. our pretext/backbone.pt or a torchvision ResNet's)") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a state dict of tensors")
    state = strip_prefixes(state)
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")} or torchvision_resnet_keys(state)
    expected = backbone.trunk.state_dict()
    missing = [k for k in expected if k not in trunk]
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} of the {len(expected)} backbone weights, e.g. "
                          f"'{missing[0]}' (check model.backbone)")
    wrong = [k for k in expected if trunk[k].shape != expected[k].shape]
    if wrong:
        raise ConfigError(f"{source}: '{wrong[0]}' has shape {tuple(trunk[wrong[0]].shape)}, the backbone expects "
                          f"{tuple(expected[wrong[0]].shape)} (check model.backbone, width, blocks)")
    backbone.trunk.load_state_dict({k: trunk[k] for k in expected})
    for name in ("mean", "std"):
        if name in state and state[name].shape == getattr(backbone, name).shape:
            getattr(backbone, name).copy_(state[name])


def mlp(din: int, dhidden: int, dout: int, batchnorm: bool = False) -> nn.Sequential:
    mid = [nn.BatchNorm1d(dhidden)] if batchnorm else []
    return nn.Sequential(nn.Linear(din, dhidden), *mid, nn.ReLU(inplace=True), nn.Linear(dhidden, dout))


class ContrastiveModel(nn.Module):
    """Backbone + projection MLP; `forward` returns L2-normalised projections (B, projection_dim)."""

    def __init__(self, backbone: Backbone, projection_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.head = mlp(backbone.feature_dim, backbone.feature_dim, projection_dim)

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)


def trained_contrastive(method: nn.Module) -> ContrastiveModel | None:
    """The contrastive model (backbone + projection MLP) whose backbone a pretext method trains:
    SimCLR's model, MoCo's query encoder, BYOL's online network; None for RotNet."""
    return next((m for m in method.modules() if isinstance(m, ContrastiveModel) and m.backbone is method.backbone),
                None)


def projection_head(method: nn.Module) -> nn.Module | None:
    """The projection MLP of `trained_contrastive(method)` (mine.head: mlp starts from its first layer)."""
    model = trained_contrastive(method)
    return None if model is None else model.head


class ClusteringModel(nn.Module):
    """Backbone + `num_heads` heads over `num_clusters` clusters.

    Heads are linear, or MLPs with `hidden` units when hidden > 0. `forward(x)` returns logits
    (num_heads, B, num_clusters); `heads_from_features` does the same from pre-computed
    features so heads can train without re-running the backbone.
    """

    def __init__(self, backbone: nn.Module, num_clusters: int, num_heads: int = 1, hidden: int = 0):
        super().__init__()
        self.backbone = backbone
        self.num_clusters = num_clusters
        self.num_heads = num_heads
        d = backbone.feature_dim
        self.heads = nn.ModuleList(mlp(d, hidden, num_clusters) if hidden else nn.Linear(d, num_clusters)
                                   for _ in range(num_heads))

    def heads_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if all(isinstance(h, nn.Linear) for h in self.heads):
            # all heads in one (D, H·C) product: H skinny (D, C) ones are several times slower
            weight = torch.cat([h.weight for h in self.heads])
            bias = torch.cat([h.bias for h in self.heads])
            return F.linear(features, weight, bias).view(len(features), len(self.heads), -1).transpose(0, 1)
        return torch.stack([h(features) for h in self.heads])

    def forward(self, x):
        return self.heads_from_features(self.backbone(x))

    def keep_head(self, index: int) -> None:
        """Drop every head except `index` (after the best head has been chosen)."""
        self.heads = nn.ModuleList([self.heads[index]])
        self.num_heads = 1


class Classifier(nn.Module):
    """A single-head model mapping images to cluster probabilities (for predict/export)."""

    def __init__(self, clustering: ClusteringModel):
        super().__init__()
        self.backbone = clustering.backbone
        self.head = clustering.heads[0]

    def forward(self, x):
        return torch.softmax(self.head(self.backbone(x)), dim=1)
