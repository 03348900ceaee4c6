"""Where a clustering model's features come from: one interface, two sources.

- `images`: training images through the trainable pretext backbone (augmented on the device);
- `cached`: features of a frozen pretrained network, computed once by the pretext stage
  (`pretext.method: pretrained`), with `pretext.cached_views` augmented views for invariance.

The cluster, self-label, refine and evaluate stages and `scan predict` ask the run's source
(`run.source`) for what they need and never branch on which one it is. Adding a source (another
backbone family, features from disk) is one class registered here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from scan.config import AUTO
from scan.core.checkpoint import load_state_dict
from scan.core.errors import StageError, typed
from scan.core.registry import Registry
from scan.nets.heads import FrozenFeatures, attach_network, feature_probs, pair_logits, weak_strong_logits
from scan.nets.models import Backbone, Classifier, ClusteringModel, build_backbone
from scan.nets.pretrained import build_pretrained
from scan.train.engine import predict_in_batches
from scan.train.features import load_features, load_views

SOURCES: Registry[type] = Registry("feature source")


def load_backbone(run) -> Backbone:
    """The backbone the pretext stage trained (pretext/backbone.pt), over the run's normalisation."""
    path = run.path("pretext", "backbone.pt")
    if not path.exists():
        raise StageError(f"{path} is missing: run the pretext stage first (scan pretext)")
    backbone = run.backbone()
    backbone.load_state_dict(load_state_dict(path))
    return backbone


class RunContext:
    """What feature sources and models are built from: a run's folder, configuration and data summary.

    Mixed into the pipeline's Run (a run opened for work) and TrainedRun (a finished one), which hold
    `run_dir`, `cfg` and `info` (data.json)."""

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def num_clusters_known(self) -> bool:
        """False while data.num_clusters=auto waits for the choose stage: until then nothing whose fingerprint
        depends on C (mine, the models) can be checked or recorded."""
        return self.info["num_clusters"] != AUTO or self.record("choose") is not None

    @property
    def num_clusters(self) -> int:
        """C: data.json's, or the choose stage's choice where that says auto (data.num_clusters=auto)."""
        count = self.info["num_clusters"]
        if count != AUTO:
            return count
        record = self.record("choose")
        if record is None:
            raise StageError(f"the number of clusters of {self.run_dir} is chosen by the choose stage, which has not "
                             f"run yet: run it first (scan choose --run-dir {typed(self.run_dir)}, or scan run)")
        return int(record["num_clusters"])

    @property
    def channels(self) -> int:
        return int(self.info["image_shape"][0])

    @property
    def image_size(self) -> int:
        return int(self.info["image_shape"][-1])

    def backbone(self) -> Backbone:
        """An untrained backbone of the configured architecture over the data's normalisation."""
        m = self.cfg.model
        return build_backbone(m.backbone, self.channels, self.info["mean"], self.info["std"],
                              width=m.width, blocks=m.blocks, stem_stride=m.stem_stride)

    @property
    def source(self):
        """Where the clustering model's features come from: images or a frozen network's cached features."""
        return source_class(self.cfg)(self)


def source_class(cfg) -> type:
    """The feature source of a configuration: the one registered under its pretext.method (pretrained:
    a frozen network's cached features), else images through the backbone the pretext stage trains."""
    return SOURCES.get(cfg.pretext.method) if cfg.pretext.method in SOURCES else ImageSource


class ImageSource:
    """Images through the backbone trained by the pretext stage."""
    frozen = False   # the backbone trains (pretext stage, and the cluster stage with cluster.update_backbone)

    def __init__(self, run):
        self.run = run

    def new_model(self, num_heads: int) -> ClusteringModel:
        run = self.run
        return ClusteringModel(run.backbone(), run.num_clusters, num_heads, run.cfg.cluster.head_hidden)

    def start_from_pretext(self, model: ClusteringModel) -> None:
        """Load the pretext backbone's weights into an untrained clustering model."""
        # a second backbone is built first, as it always was: a seeded run draws the same numbers
        model.backbone.load_state_dict(load_backbone(self.run).state_dict())

    def trainable(self, model: ClusteringModel, update_backbone: bool):
        return model.parameters() if update_backbone else model.heads.parameters()

    def pair_logits(self, model: ClusteringModel) -> Callable:
        """SCAN's forward: (anchor idx, neighbour idx) -> (H, 2B, C) logits of augmented views."""
        run = self.run
        cfg, rt, c = run.cfg, run.rt, run.cfg.cluster
        from scan.nets.augment import build_augment  # kornia: imported by training only, not by predict
        augment = build_augment(c.augment, cfg.augment, run.image_size, run.channels)
        images = run.train.images.to(rt.device)

        def logits(idx, nb):
            x = augment(rt.batch(torch.cat([images[idx], images[nb]])))
            with rt.autocast():
                if c.update_backbone:
                    return model(x)
                with torch.no_grad():
                    feats = model.backbone(x)
                return model.heads_from_features(feats)
        return logits

    def weak_strong_logits(self, model: ClusteringModel) -> Callable:
        """Self-labelling's forward: idx -> (weak-view logits without gradient, strong-view logits)."""
        run = self.run
        rt = run.rt
        from scan.nets.augment import StrongAugment, WeakAugment
        weak, strong = WeakAugment(run.cfg.augment, run.image_size), StrongAugment(run.cfg.augment, run.image_size)
        images = run.train.images.to(rt.device)

        def logits(idx):
            x = rt.batch(images[idx])
            with torch.no_grad(), rt.autocast():
                weak_logits = model(weak(x))[0]
            with rt.autocast():
                return weak_logits, model(strong(x))[0]
        return logits

    def refine_inputs(self, model: ClusteringModel):
        from scan.train.refine import image_inputs  # training code: imported only when SPC trains
        run = self.run
        return image_inputs(model, run.train.images.to(run.rt.device), run.cfg.augment, run.rt)

    def probs(self, model: ClusteringModel, split: str, dtype=torch.float32) -> torch.Tensor:
        """(H, N, C) probabilities of every head on the unaugmented 'train' or 'eval' images, on the CPU."""
        model.eval()
        images = (self.run.train if split == "train" else self.run.eval).images
        return predict_in_batches(lambda x: model(x).softmax(-1).transpose(0, 1), images, self.run.rt,
                                  dtype=dtype).transpose(0, 1)

    def image_model(self, model: ClusteringModel) -> ClusteringModel:
        """The model mapping new images to logits (for predict and export)."""
        return model

    def train_outputs(self, model: ClusteringModel) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) probabilities of head 0 and (N, D) backbone features of the training images, one pass."""
        classifier = self.run.rt.prepare(Classifier(model)).eval()

        def probs_and_features(x):   # one backbone pass for both
            features = classifier.backbone(x)
            return torch.cat([torch.softmax(classifier.head(features), dim=1), features], 1)
        both = predict_in_batches(probs_and_features, self.run.train.images, self.run.rt)
        return both[:, :self.run.num_clusters], both[:, self.run.num_clusters:]


@SOURCES.register("pretrained")
class CachedFeatureSource(ImageSource):
    """Cached features of a frozen pretrained network: only the heads train."""
    frozen = True    # the pretext stage embeds the images once (scan.train.features); no network trains

    def new_model(self, num_heads: int) -> ClusteringModel:
        run = self.run
        frozen = FrozenFeatures.fit(load_features(run, "train"))
        return ClusteringModel(frozen, run.num_clusters, num_heads, run.cfg.cluster.head_hidden)

    def start_from_pretext(self, model: ClusteringModel) -> None:
        pass   # the network is frozen: FrozenFeatures already standardises its cached features

    def trainable(self, model: ClusteringModel, update_backbone: bool):
        return model.heads.parameters()

    def pair_logits(self, model: ClusteringModel) -> Callable:
        return pair_logits(model, load_views(self.run))

    def weak_strong_logits(self, model: ClusteringModel) -> Callable:
        return weak_strong_logits(model, load_views(self.run))

    def refine_inputs(self, model: ClusteringModel):
        from scan.train.refine import feature_inputs
        return feature_inputs(model, load_views(self.run))

    def probs(self, model: ClusteringModel, split: str, dtype=torch.float32) -> torch.Tensor:
        return feature_probs(model, load_features(self.run, split), dtype=dtype)

    def train_outputs(self, model: ClusteringModel) -> tuple[torch.Tensor, torch.Tensor]:
        # from the cache: the pretrained network need not run again
        return self.probs(model, "train")[0], load_features(self.run, "train")

    def image_model(self, model: ClusteringModel) -> ClusteringModel:
        run = self.run
        return attach_network(model, build_pretrained(run.cfg, run.channels, run.info["mean"], run.info["std"]))
