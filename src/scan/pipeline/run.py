"""A run directory opened for work: the resolved config, the data, the device, and the helpers
every stage shares (fingerprints, loading models, probabilities); a finished run is read back by
scan.rundir.trained.

run_dir/
  run.json, run.lock          marker (format, model stages) and lock of a run directory (scan.rundir.directory)
  config.yaml                 resolved configuration
  data.json                   data set summary (sizes, classes, normalisation, content hash)
  pretext/backbone.pt         pretext backbone weights            (stage: pretext)
  features/{train,eval}.npy   backbone features                   (stage: pretext)
  features/*_projection.npy   L2-normalised projection outputs    (contrastive pretext; mine.features=projection)
  features/cache.json         key of cached pretrained features   (pretext.method: pretrained; scan.train.features)
  mine/neighbors.npy          (N_train, K) neighbour indices      (stage: mine)
  cluster/model.pt            clustering model, best head only    (stage: cluster)
  selflabel/model.pt          self-labelled model                 (stage: selflabel)
  refine/model.pt             SPC-refined model (refine.method=spc; stage: refine)
  probs.npy, predictions.npy  final eval-split probabilities / clusters
  metrics.json                metrics and self-checks of every stage (stage: evaluate)

Each stage writes `<stage>/done.json` holding its fingerprint (scan.pipeline.stage); a rerun skips a
stage whose fingerprint is unchanged and recomputes it (saying why) otherwise.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scan.algo.neighbors import neighbor_count
from scan.algo.num_clusters import candidate_range
from scan.config import AUTO, Config
from scan.core import distributed
from scan.core.checkpoint import as_json, atomic_write_json, load_state_dict
from scan.core.errors import ConfigError, StageError
from scan.data import ImageDataset, content_hash, describe_data, has_splits, load_data, load_split
from scan.nets.models import ClusteringModel
from scan.nets.pretrained import check_pretrained_config
from scan.pipeline.stage import fingerprint, model_stages, stage_basis, stage_enabled, stage_names, what_changed
from scan.rundir.directory import (
    check_neighbors,
    check_run_format,
    discard_new_run_dir,
    is_run_dir,
    prepare_run_dir,
    read_record,
    record_config,
    with_absolute_paths,
)
from scan.train.engine import Runtime, resolve_device
from scan.train.features import features_path, read_features
from scan.train.logs import TrainingLog, check_log_writer
from scan.train.mining import MiningInputs
from scan.train.sources import RunContext, load_backbone, source_class

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
class Run(RunContext):
    """Everything a stage needs: configuration, run directory, device and the loaded data."""
    cfg: Config
    run_dir: Path
    rt: Runtime
    train: ImageDataset
    eval: ImageDataset
    info: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)   # {stage: its done.json} as read or written by this process

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
        """Hash of a stage's declared configuration and inputs and of the stages it needs (scan.pipeline.stage)."""
        return fingerprint(self, stage)

    def record(self, stage: str) -> dict | None:
        """The stage's done.json, read from disk once (then kept, and replaced by `finish`); None if absent."""
        if stage not in self.records:
            record = read_record(self.path(stage, "done.json"))
            if record is None:
                return None
            self.records[stage] = record
        return self.records[stage]

    def done(self, stage: str) -> dict | None:
        """The stage's record if it completed with the current fingerprint (saying it is reused),
        else None (saying what changed)."""
        record = self.record(stage)
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
        self.records[stage] = as_json(record)
        ckpt = self.path(stage, "checkpoint.pt")
        if ckpt.exists() and distributed.is_main():
            ckpt.unlink()
        distributed.barrier()   # under torchrun: the next stage reads what rank 0 just wrote
        return record

    def clustering_model(self, num_heads: int) -> ClusteringModel:
        """Untrained heads over the run's feature source."""
        return self.source.new_model(num_heads)


def open_run(cfg: Config, run_dir: Path, restart: bool = False, data=None) -> Run:
    """Check the configuration and load the data (unless given as (train, eval)), then claim the
    run directory (scan.rundir.directory), record the configuration (config.yaml, data.json, per-model
    snapshots) and return the Run. A start that fails leaves no folder it created behind."""
    run_dir = Path(run_dir)
    if source_class(cfg).frozen:
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
    if info["num_clusters"] == AUTO:   # data without labels nor a number: config.yaml says the choose stage runs
        cfg = replace(cfg, data=replace(cfg.data, num_clusters=AUTO))
        candidate_range(len(train), cfg.choose.min_clusters, cfg.choose.max_clusters)   # before the pretext trains
    created, was_run = not run_dir.exists(), is_run_dir(run_dir)
    # rank 0 claims (and locks, for the whole job) the run directory; the others wait for it
    distributed.on_main(lambda: prepare_run_dir(run_dir, restart, stage_names()))
    try:   # from here on the folder is locked by us: what we made in it is ours to take back
        run = Run(cfg, run_dir, rt, train, evaluation, info)
        check_neighbors(run, len(train))
        distributed.on_main(lambda: record_run_config(run))
    except BaseException:
        if main and not was_run:
            discard_new_run_dir(run_dir, created)
        raise
    return run


def record_run_config(run: Run) -> None:
    """config.yaml, data.json and the configuration snapshot of each model the run trains (scan.rundir)."""
    record_config(run, tuple(s for s in model_stages() if stage_enabled(run.cfg, s)))


def mining_inputs(run: Run, split: str, chosen: bool = True) -> MiningInputs:
    """What the miners and mining spaces read for the 'train' or 'eval' images (features/<split>*.npy);
    chosen=False: before the number of clusters is known (the choose stage), which they then lack."""
    data = run.train if split == "train" else run.eval
    features = read_features(run, split)
    projection = features_path(run, split, "_projection")
    return MiningInputs(features, data.images, lambda: load_backbone(run), run.cfg,
                        run.num_clusters if chosen else None, mined_neighbor_count(run) if chosen else None, run.rt,
                        data.labels, lambda m: say(run.rt, m),
                        projection_path=run.path("pretext", "projection.pt"),
                        load_projection=(lambda: read_features(run, split, "_projection")) if projection.is_file() else None)


def mined_neighbor_count(run: Run) -> int:
    """The K the mine stage mines: mine.num_neighbors, at most N_train / 2C."""
    return neighbor_count(run.cfg.mine.num_neighbors, run.info["num_train"], run.num_clusters)


def check_batch_sizes(cfg: Config, world: int) -> None:
    """Each configured batch size is the global batch: W processes must split it evenly."""
    for section in ("pretext", "cluster", "selflabel"):   # refine (SPC) runs whole on every rank
        size = getattr(getattr(cfg, section), "batch_size", None)
        if size is not None and size % world:
            raise ConfigError(f"{section}.batch_size={size} is the global batch and must be divisible by the number "
                              f"of processes ({world}); per-process batch = {section}.batch_size / processes")


def head_probs(run: Run, model: ClusteringModel, split: str, dtype=torch.float32) -> torch.Tensor:
    """(H, N, C) probabilities of every head on the unaugmented 'train' or 'eval' images, on the CPU."""
    return run.source.probs(model, split, dtype)


def load_stage_model(run: Run, stage: str) -> ClusteringModel:
    """A stage's model as it trained, over the run's feature source (images or cached features)."""
    model = run.clustering_model(1)
    model.load_state_dict(load_state_dict(require(run.path(stage, "model.pt"), stage)))
    return model


def trained_stages(run: Run) -> list[str]:
    """Enabled model-producing stages whose model exists, in pipeline order."""
    return [s for s in model_stages() if stage_enabled(run.cfg, s) and run.path(s, "model.pt").exists()]
