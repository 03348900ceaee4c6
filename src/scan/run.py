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
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scan import distributed
from scan.checkpoint import atomic_write_json, load_torch, read_json
from scan.config import Config, ConfigError
from scan.data import FolderOptions, ImageDataset, content_hash, has_splits, load_dataset
from scan.engine import Runtime, StageError, resolve_device
from scan.models import Backbone, ClusteringModel, build_backbone
from scan.pretrained import check_pretrained_config
from scan.logs import TrainingLog, check_log_writer
from scan.rundir import (check_neighbors, check_run_format, discard_new_run_dir, is_run_dir, prepare_run_dir,
                         record_config, stage_basis, what_changed, with_absolute_paths)
from scan.stage import fingerprint, model_stages, stage_enabled, stage_names

log = logging.getLogger("scan")


def say(rt: Runtime, message: str) -> None:
    """A status line: on stderr (stdout carries only results), above any progress bar; --quiet silences it."""
    if not rt.quiet:
        tqdm.write(message, file=sys.stderr)


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run the {stage} stage first (scan {stage} --run-dir {path.parent.parent})")
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
        """The stage's record if it completed with the current fingerprint (saying it is reused),
        else None (saying what changed)."""
        record = read_json(self.path(stage, "done.json"))
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint(stage):
            changed = what_changed(record.get("basis"), stage_basis(self, stage))
            say(self.rt, f"{stage}: changed since the last run: {changed}; recomputing")
            return None
        say(self.rt, f"{stage}: done earlier, reused")
        return record

    def finish(self, stage: str, **extra) -> dict:
        record = {"fingerprint": self.fingerprint(stage), "basis": stage_basis(self, stage), **extra}
        atomic_write_json(self.path(stage, "done.json"), record)
        ckpt = self.path(stage, "checkpoint.pt")
        if ckpt.exists() and distributed.is_main():
            ckpt.unlink()
        distributed.barrier()   # under torchrun: the next stage reads what rank 0 just wrote
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
                        labels_from_folders=d.labels_from_folders, seed=cfg.seed, folder=FolderOptions.from_config(cfg))


def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    train = load_split(cfg, d.train_split)
    same = d.eval_split == d.train_split or not has_splits(d.dataset, d.path)
    evaluation = train if same else load_split(cfg, d.eval_split)
    return train, evaluation


def channel_stats(images, rows: torch.Tensor, max_values: int = 2 ** 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) standard deviation of images[rows] / 255, each (C,).

    At most `max_values` pixels are held as numbers at once (256 MB): 10,000 ImageNet images at
    224 px would take 6 GB as one float tensor. A sample that fits is reduced in one float32 pass,
    as earlier versions did (so their runs keep their exact statistics); a bigger one in chunks
    with exact integer sums.
    """
    chunk = max(1, max_values // images[0].numel())
    if len(rows) <= chunk:
        sample = images[rows].float() / 255
        return sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3))
    total = squares = 0
    for part in rows.split(chunk):
        values = images[part].to(torch.int64)
        total = total + values.sum(dim=(0, 2, 3))
        squares = squares + (values * values).sum(dim=(0, 2, 3))
    count = len(rows) * images[0][0].numel()
    mean = total.double() / count
    var = (squares.double() - count * mean * mean) / (count - 1)
    return (mean / 255).float(), (var.clamp_min(0).sqrt() / 255).float()


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
    mean, std = channel_stats(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:10000])
    digest = content_hash(x)
    return {
        "dataset": cfg.data.dataset, "path": cfg.data.path, "num_train": len(train), "num_eval": len(evaluation),
        "image_shape": list(x.shape[1:]), "num_classes": num_classes, "num_clusters": int(num_clusters),
        "class_names": train.class_names, "has_labels": train.labels is not None,
        "eval_has_labels": evaluation.labels is not None,
        "mean": mean.tolist(), "std": std.clamp_min(1e-3).tolist(),
        "data_hash": digest,
    }


def open_run(cfg: Config, run_dir: Path, restart: bool = False, data=None) -> Run:
    """Check the configuration and load the data (unless given as (train, eval)), then claim the
    run directory (scan.rundir), record the configuration (config.yaml, data.json, per-model
    snapshots) and return the Run. A start that fails leaves no folder it created behind."""
    run_dir = Path(run_dir)
    if cfg.pretext.method == "pretrained":
        check_pretrained_config(cfg)
    check_log_writer(cfg.log)
    check_run_format(run_dir, restart)
    device = distributed.init(resolve_device(cfg.device))   # joins torchrun's process group, if launched by it
    check_batch_sizes(cfg, distributed.world_size())
    cfg = with_absolute_paths(cfg)
    main = distributed.is_main()   # rank 0 reports and writes for all: the others keep errors only
    rt = Runtime(device, quiet=cfg.quiet or not main, compile=cfg.compile,
                 log=TrainingLog(run_dir, cfg.log) if main else None)
    if not main:
        log.setLevel(logging.ERROR)
    train, evaluation = data if data is not None else load_data(cfg)
    info = describe_data(cfg, train, evaluation)
    created, was_run = not run_dir.exists(), is_run_dir(run_dir)
    # rank 0 claims (and locks, for the whole job) the run directory; the others wait for it
    distributed.on_main(lambda: prepare_run_dir(run_dir, restart, stage_names()))
    try:   # from here on the folder is locked by us: what we made in it is ours to take back
        run = Run(cfg, run_dir, rt, train, evaluation, info)
        check_neighbors(run, len(train))
        distributed.on_main(lambda: record_config(run, tuple(s for s in model_stages() if stage_enabled(cfg, s))))
    except BaseException:
        if main and not was_run:
            discard_new_run_dir(run_dir, created)
        raise
    return run


def check_batch_sizes(cfg: Config, world: int) -> None:
    """Each configured batch size is the global batch: W processes must split it evenly."""
    for section in ("pretext", "cluster", "selflabel"):   # refine (SPC) runs whole on every rank
        size = getattr(getattr(cfg, section), "batch_size", None)
        if size is not None and size % world:
            raise ConfigError(f"{section}.batch_size={size} is the global batch and must be divisible by the number "
                              f"of processes ({world}); per-process batch = {section}.batch_size / processes")


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
