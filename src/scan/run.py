"""A run directory opened for work: the resolved config, the data, the device, and the helpers
every stage and every user of a trained run share (fingerprints, loading models, probabilities).

run_dir/
  run.json, run.lock          marker and lock of a run directory (scan.rundir)
  config.yaml                 resolved configuration
  data.json                   data set summary (sizes, classes, normalisation, content hash)
  pretext/backbone.pt         pretext backbone weights            (stage: pretext)
  features/{train,eval}.npy   backbone features                   (stage: pretext)
  features/*_projection.npy   L2-normalised projection outputs    (contrastive pretext; mine.features=projection)
  features/cache.json         key of cached pretrained features   (pretext.method: pretrained; scan.features)
  mine/neighbors.npy          (N_train, K) neighbour indices      (stage: mine)
  cluster/model.pt            clustering model, best head only    (stage: cluster)
  selflabel/model.pt          self-labelled model                 (stage: selflabel)
  refine/model.pt             SPC-refined model (refine.method=spc; stage: refine)
  probs.npy, predictions.npy  final eval-split probabilities / clusters
  metrics.json                metrics and self-checks of every stage (stage: evaluate)

Each stage writes `<stage>/done.json` holding its fingerprint (scan.stage); a rerun skips a
stage whose fingerprint is unchanged and recomputes it (saying why) otherwise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scan.checkpoint import atomic_write_json, load_torch, read_json
from scan.config import Config, ConfigError
from scan.data import ImageDataset, content_hash, has_splits, load_dataset
from scan.engine import Runtime, StageError, resolve_device
from scan.models import Backbone, ClusteringModel, build_backbone
from scan.pretrained import check_pretrained_config
from scan.rundir import check_neighbors, prepare_run_dir, record_config, with_absolute_paths
from scan.stage import fingerprint, model_stages, stage_enabled, stage_names

log = logging.getLogger("scan")


def say(rt: Runtime, message: str) -> None:
    if not rt.quiet:
        tqdm.write(message)


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run the {stage} stage first (scan {stage} --out {path.parent.parent})")
    return path


@dataclass
class Run:
    """Everything a stage needs: configuration, run directory, device and the loaded data."""
    cfg: Config
    run_dir: Path
    rt: Runtime
    train: ImageDataset
    eval: ImageDataset
    info: dict = field(default_factory=dict)

    @property
    def num_clusters(self) -> int:
        return self.info["num_clusters"]

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @cached_property
    def pretext_data(self) -> ImageDataset:
        """The images the pretext stage trains on: data.pretext_split (loaded on first use), else the training split."""
        split = self.cfg.data.pretext_split
        if split is None or split == self.cfg.data.train_split or not has_splits(self.cfg.data.dataset,
                                                                                 self.cfg.data.path):
            return self.train
        data = load_split(self.cfg, split)
        if data.images.shape[1:] != self.train.images.shape[1:]:
            raise ConfigError(f"data.pretext_split '{split}' has images of shape {tuple(data.images.shape[1:])}, "
                              f"the train split {tuple(self.train.images.shape[1:])}")
        return data

    @cached_property
    def pretext_data_hash(self) -> str:
        """Content hash of the pretext stage's images (part of its fingerprint)."""
        return self.info["data_hash"] if self.pretext_data is self.train else content_hash(self.pretext_data.images)

    def fingerprint(self, stage: str) -> str:
        """Hash of a stage's declared configuration and inputs and of the stages it needs (scan.stage)."""
        return fingerprint(self, stage)

    def done(self, stage: str) -> dict | None:
        """The stage's record if it completed with the current fingerprint, else None (and why)."""
        record = read_json(self.path(stage, "done.json"))
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint(stage):
            say(self.rt, f"{stage}: configuration or inputs changed since the last run; recomputing")
            return None
        return record

    def finish(self, stage: str, **extra) -> dict:
        record = {"fingerprint": self.fingerprint(stage), **extra}
        atomic_write_json(self.path(stage, "done.json"), record)
        ckpt = self.path(stage, "checkpoint.pt")
        if ckpt.exists():
            ckpt.unlink()
        return record

    def backbone(self) -> Backbone:
        m = self.cfg.model
        return build_backbone(m.backbone, self.channels, self.info["mean"], self.info["std"],
                              width=m.width, blocks=m.blocks, stem_stride=m.stem_stride)

    @property
    def source(self):
        """Where the clustering model's features come from (scan.sources): images or cached features."""
        from scan.sources import SOURCES, source_name
        return SOURCES.get(source_name(self.cfg))(self)

    def clustering_model(self, num_heads: int) -> ClusteringModel:
        """Untrained heads over the run's feature source."""
        return self.source.new_model(num_heads)


def load_split(cfg: Config, split: str) -> ImageDataset:
    d = cfg.data
    return load_dataset(d.dataset, path=d.path, split=split, image_size=d.image_size,
                        labels_from_folders=d.labels_from_folders, seed=cfg.seed)


def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    train = load_split(cfg, d.train_split)
    same = d.eval_split == d.train_split or not has_splits(d.dataset, d.path)
    evaluation = train if same else load_split(cfg, d.eval_split)
    return train, evaluation


def describe_data(cfg: Config, train: ImageDataset, evaluation: ImageDataset) -> dict:
    """Summary written to data.json; also decides the number of clusters and the normalisation."""
    x = train.images
    if evaluation.images.shape[1:] != x.shape[1:]:
        raise ConfigError(f"data.eval_split '{cfg.data.eval_split}' has images of shape "
                          f"{tuple(evaluation.images.shape[1:])}, the train split {tuple(x.shape[1:])}")
    num_classes = train.num_classes
    num_clusters = cfg.data.num_clusters or num_classes
    if num_clusters is None:
        raise ConfigError("the data set has no labels, so the number of clusters is unknown: "
                          "pass --num-clusters C (or data.num_clusters=C)")
    if num_clusters > len(train):
        raise ConfigError(f"data.num_clusters={num_clusters} is larger than the number of images ({len(train)})")
    if cfg.mine.num_neighbors >= len(train):
        raise ConfigError(f"mine.num_neighbors={cfg.mine.num_neighbors} must be smaller than the number of "
                          f"training images ({len(train)})")
    sample = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:10000]].float() / 255
    digest = content_hash(x)
    return {
        "dataset": cfg.data.dataset, "path": cfg.data.path, "num_train": len(train), "num_eval": len(evaluation),
        "image_shape": list(x.shape[1:]), "num_classes": num_classes, "num_clusters": int(num_clusters),
        "class_names": train.class_names, "has_labels": train.labels is not None,
        "eval_has_labels": evaluation.labels is not None,
        "mean": sample.mean(dim=(0, 2, 3)).tolist(), "std": sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
        "data_hash": digest,
    }


def open_run(cfg: Config, run_dir: Path, restart: bool = False, data=None) -> Run:
    """Claim the run directory (scan.rundir), load data (unless given as (train, eval)), record
    the configuration (config.yaml, data.json, per-model snapshots) and return the Run."""
    run_dir = Path(run_dir)
    if cfg.pretext.method == "pretrained":
        check_pretrained_config(cfg)
    prepare_run_dir(run_dir, restart, stage_names())
    cfg = with_absolute_paths(cfg)
    rt = Runtime(resolve_device(cfg.device), quiet=cfg.quiet)
    train, evaluation = data if data is not None else load_data(cfg)
    info = describe_data(cfg, train, evaluation)
    run = Run(cfg, run_dir, rt, train, evaluation, info)
    check_neighbors(run, len(train))
    record_config(run, tuple(s for s in model_stages() if stage_enabled(cfg, s)))
    return run


def load_backbone(run: Run) -> Backbone:
    path = run.path("pretext", "backbone.pt")
    if not path.exists():
        raise StageError(f"{path} is missing: run the pretext stage first (scan pretext)")
    backbone = run.backbone()
    backbone.load_state_dict(load_torch(path))
    return backbone


def head_probs(run: Run, model: ClusteringModel, split: str, dtype=torch.float32) -> torch.Tensor:
    """(H, N, C) probabilities of every head on the unaugmented 'train' or 'eval' images, on the CPU."""
    return run.source.probs(model, split, dtype)


def load_stage_model(run: Run, stage: str) -> ClusteringModel:
    """A stage's model as it trained, over the run's feature source (images or cached features)."""
    model = run.clustering_model(1)
    model.load_state_dict(load_torch(require(run.path(stage, "model.pt"), stage)))
    return model


def load_clustering_model(run: Run, stage: str) -> ClusteringModel:
    """A stage's model mapping images to logits (cached features get their pretrained network attached)."""
    return run.source.image_model(load_stage_model(run, stage))


def trained_stages(run: Run) -> list[str]:
    """Enabled model-producing stages whose model exists, in pipeline order."""
    return [s for s in model_stages() if stage_enabled(run.cfg, s) and run.path(s, "model.pt").exists()]


def final_stage(run: Run) -> str:
    """The stage whose model is the run's result: the one its last evaluation used (metrics.json),
    so using a trained run never needs the stage registry and its training code; before any
    evaluation, the last enabled model stage whose model exists."""
    evaluated = (read_json(run.path("metrics.json")) or {}).get("final_stage")
    if isinstance(evaluated, str) and run.path(evaluated, "model.pt").is_file():
        return evaluated
    return (trained_stages(run) or ["cluster"])[-1]
