"""The SCAN stages as functions that read and write plain artifacts in a run directory.

run_dir/
  config.yaml                 resolved configuration
  data.json                   data set summary (sizes, classes, normalisation, content hash)
  pretext/backbone.pt         pretext backbone weights            (stage: pretext)
  features/{train,eval}.npy   backbone features                   (stage: pretext)
  features/cache.json         key of cached pretrained features   (pretext.method: pretrained; scan.features)
  mine/neighbors.npy          (N_train, K) neighbour indices      (stage: mine)
  cluster/model.pt            clustering model, best head only    (stage: cluster)
  selflabel/model.pt          self-labelled model                 (stage: selflabel)
  refine/model.pt             SPC-refined model (refine.method=spc; stage: refine)
  probs.npy, predictions.npy  final eval-split probabilities / clusters
  metrics.json                metrics of every stage              (stage: evaluate)

Each stage writes `<stage>/done.json` holding a fingerprint of its configuration and inputs;
a rerun skips a stage whose fingerprint is unchanged and recomputes it (saying why) otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scan.augment import build_augment, WeakAugment, StrongAugment
from scan.checkpoint import (atomic_save_npy, atomic_torch_save, atomic_write_json, load_torch, read_json,
                             seed_everything)
from scan.config import Config, ConfigError
from scan.data import ImageDataset, content_hash, has_splits, load_dataset
from scan.engine import (EMA, Runtime, StageError, build_optimizer, check_finite, cosine_schedule, minibatches,
                         predict_in_batches, resolve_device, run_epochs, set_lr)
from scan.features import cache_features, load_features, load_views
from scan.heads import FrozenFeatures, attach_network, feature_probs, pair_logits, weak_strong_logits
from scan.baselines import kmeans_assign, pixel_kmeans, unsupervised_scores
from scan.checks import baseline_check, cluster_check, pretext_check, report, selflabel_check
from scan.losses import scan_loss, scan_loss_over_pairs, selflabel_loss
from scan.metrics import evaluate_clustering
from scan.models import Backbone, ClusteringModel, build_backbone, load_backbone_weights
from scan.mining import MiningInputs, mine
from scan.neighbors import neighbor_purity
from scan.refine import feature_inputs, image_inputs, train_spc
from scan.pretext import build_pretext
from scan.pretrained import build_pretrained, check_pretrained_config
from scan.rundir import check_neighbors, prepare_run_dir, record_config, with_absolute_paths

log = logging.getLogger("scan")
STAGES = ("pretext", "mine", "cluster", "selflabel", "refine", "evaluate")
MODEL_STAGES = ("cluster", "selflabel", "refine")   # stages that write <stage>/model.pt


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def say(rt: Runtime, message: str) -> None:
    if not rt.quiet:
        tqdm.write(message)


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

    def fingerprint(self, stage: str) -> str:
        """Hash of a stage's configuration and of everything upstream of it."""
        c = self.cfg.to_dict()
        own = {
            "pretext": (self.info["data_hash"], c["seed"], c["model"], c["augment"], c["pretext"]),
            "mine": (c["mine"], self.num_clusters),
            "cluster": (c["cluster"], c["augment"], self.num_clusters),
            "selflabel": (c["selflabel"], c["augment"]),
            "refine": (c["refine"], c["augment"]),
        }
        upstream = STAGES[:STAGES.index(stage)]
        return _hash(*(own[s] for s in upstream + (stage,) if s in own))

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
    def head_only(self) -> bool:
        """Heads train on cached features of a frozen pretrained network (pretext.method: pretrained)."""
        return self.cfg.pretext.method == "pretrained"

    def clustering_model(self, num_heads: int) -> ClusteringModel:
        """Untrained heads over the backbone, or over the cached features in head-only runs."""
        backbone = FrozenFeatures.fit(load_features(self, "train")) if self.head_only else self.backbone()
        return ClusteringModel(backbone, self.num_clusters, num_heads, self.cfg.cluster.head_hidden)


# ------------------------------------------------------------------------ set-up

def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    d = cfg.data
    kwargs = dict(path=d.path, image_size=d.image_size, labels_from_folders=d.labels_from_folders, seed=cfg.seed)
    train = load_dataset(d.dataset, split=d.train_split, **kwargs)
    same = d.eval_split == d.train_split or not has_splits(d.dataset, d.path)
    evaluation = train if same else load_dataset(d.dataset, split=d.eval_split, **kwargs)
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
    prepare_run_dir(run_dir, restart, STAGES)
    cfg = with_absolute_paths(cfg)
    rt = Runtime(resolve_device(cfg.device), quiet=cfg.quiet)
    train, evaluation = data if data is not None else load_data(cfg)
    info = describe_data(cfg, train, evaluation)
    run = Run(cfg, run_dir, rt, train, evaluation, info)
    check_neighbors(run, len(train))
    record_config(run, tuple(s for s in MODEL_STAGES if stage_enabled(cfg, s)))
    return run


# ------------------------------------------------------------------------ stage 1: pretext

def stage_pretext(run: Run) -> dict:
    """Self-supervised training of the backbone; writes pretext/backbone.pt and features/*.npy."""
    if (record := run.done("pretext")) is not None:
        return record
    if run.head_only:   # a frozen pretrained network: embed the images once, nothing to train
        return run.finish("pretext", **cache_features(run))
    cfg, rt = run.cfg, run.rt
    p = cfg.pretext
    seed_everything(cfg.seed)
    backbone = run.backbone()
    if cfg.model.init_checkpoint:
        load_backbone_weights(backbone, cfg.model.init_checkpoint)
    elif p.epochs == 0:
        log.warning("pretext.epochs=0 without model.init_checkpoint: the features are those of a random network")
    method = rt.prepare(build_pretext(p.method, backbone, cfg, run.image_size, run.channels, len(run.train)))
    optimizer = build_optimizer(method.parameters(), p.optimizer, p.lr, p.weight_decay, p.momentum)
    images = run.train.images.to(rt.device)
    batch_size = min(p.batch_size, len(images))
    steps = len(minibatches(len(images), batch_size))
    lrs = cosine_schedule(p.lr, p.epochs * steps, p.warmup_epochs * steps)
    start = time.time()

    def epoch_fn(epoch, tick):
        method.train()
        total = 0.0
        for i, idx in enumerate(minibatches(len(images), batch_size)):
            step = epoch * steps + i
            set_lr(optimizer, lrs[step])
            with rt.autocast():
                loss = method.loss(rt.batch(images[idx]), idx.to(rt.device))
            check_finite(loss, "pretext", epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step(step, p.epochs * steps)
            total += loss.item()
            tick()
        return {"loss": total / steps, "lr": float(lrs[min(epoch * steps, len(lrs) - 1)])}

    history = run_epochs("pretext", run.path("pretext"), p.epochs, steps, {"model": method, "opt": optimizer},
                         epoch_fn, run.fingerprint("pretext"), rt)
    backbone = method.backbone
    atomic_torch_save(run.path("pretext", "backbone.pt"), backbone.state_dict())
    _write_features(run, backbone)
    return run.finish("pretext", seconds=time.time() - start, history=history, method=p.method,
                      check=report("pretext", pretext_check(history)))


def _write_features(run: Run, backbone: Backbone) -> None:
    backbone.eval()
    for name, data in (("train", run.train), ("eval", run.eval)):
        feats = predict_in_batches(backbone, data.images, run.rt, desc=f"features ({name})")
        atomic_save_npy(run.path("features", f"{name}.npy"), feats.numpy())


def load_backbone(run: Run) -> Backbone:
    path = run.path("pretext", "backbone.pt")
    if not path.exists():
        raise StageError(f"{path} is missing: run the pretext stage first (scan pretext)")
    backbone = run.backbone()
    backbone.load_state_dict(load_torch(path))
    return backbone


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run the {stage} stage first (scan {stage} --out {path.parent.parent})")
    return path


# ------------------------------------------------------------------------ stage 2: mine

def stage_mine(run: Run) -> dict:
    """Neighbours of every training image in pretext feature space (mine.method: knn | multiview)."""
    if (record := run.done("mine")) is not None:
        return record
    start = time.time()
    features = np.load(_require(run.path("features", "train.npy"), "pretext"))
    neighbors, facts = mine(MiningInputs(features, run.train.images, lambda: load_backbone(run), run.cfg,
                                         run.num_clusters, run.rt, run.train.labels, lambda m: say(run.rt, m)))
    atomic_save_npy(run.path("mine", "neighbors.npy"), neighbors)
    extra = {"seconds": time.time() - start, "method": run.cfg.mine.method, "num_neighbors": int(neighbors.shape[1]),
             **facts}
    if run.train.labels is not None:
        extra["purity"] = neighbor_purity(neighbors, run.train.labels)
        baseline = f" (plain kNN {facts['knn_purity']:.3f})" if "knn_purity" in facts else ""
        say(run.rt, f"mine: {neighbors.shape[1]} neighbours per image, purity {extra['purity']:.3f}{baseline}")
    return run.finish("mine", **extra)


# ------------------------------------------------------------------------ stage 3: cluster

# the cluster stage retries a run whose heads never left the uniform prediction at 10x, then 100x
# the learning rate, never above this bound (Adam on the backbone diverges past it)
RESCUE_LR_FACTORS = (10.0, 100.0)
RESCUE_MAX_LR = 1e-2


def stage_cluster(run: Run) -> dict:
    """Train `num_heads` clustering heads with the SCAN loss; keep the head with the lowest loss.

    A training whose kept head stayed at the uniform prediction is retried with a higher
    learning rate (`RESCUE_LR_FACTORS`, at most `RESCUE_MAX_LR`); the check and any rescue
    are recorded in done.json.
    """
    if (record := run.done("cluster")) is not None:
        return record
    c = run.cfg.cluster
    neighbors = torch.from_numpy(np.load(_require(run.path("mine", "neighbors.npy"), "mine")))
    start = time.time()
    lrs = [c.lr] + sorted({min(c.lr * f, RESCUE_MAX_LR) for f in RESCUE_LR_FACTORS} - {c.lr})
    lrs = [lr for lr in lrs if lr >= c.lr]
    tried = []
    for attempt, lr in enumerate(lrs):
        model, history = _train_heads(run, neighbors, lr, attempt)
        # (H, N, C) in float16: 10 heads x 260k ImageNet-200 images would take 2 GB in float32
        probs = head_probs(run, model, "train", dtype=torch.float16)
        losses, consistency, _ = scan_loss_over_pairs(probs, neighbors, c.entropy_weight)
        best = int(losses.argmin())
        confidence = float(probs[best].max(1).values.float().mean())
        check = cluster_check(float(consistency[best]), confidence, run.num_clusters)
        tried.append({"lr": lr, "status": check["status"], "consistency": float(consistency[best])})
        if check["status"] == "ok":
            break
        if attempt + 1 < len(lrs):
            say(run.rt, f"cluster: the heads did not learn at lr {lr:g} (consistency {float(consistency[best]):.3f}, "
                        f"uniform {check['uniform_consistency']:.3f}); retrying at lr {lrs[attempt + 1]:g}")
    if attempt > 0 and check["status"] == "ok":
        check = {**check, "status": "rescued",
                 "message": f"the heads did not learn at cluster.lr={c.lr:g}; retrained at lr {lr:g}: "
                            + check["message"], "fix": f"set cluster.lr={lr:g} to skip the failed attempts"}
    check["attempts"] = tried
    model.keep_head(best)
    atomic_torch_save(run.path("cluster", "model.pt"), model.state_dict())
    extra = {"seconds": time.time() - start, "head_losses": losses.tolist(), "best_head": best, "history": history,
             "check": report("cluster", check)}
    _warn_collapse(run, probs[best].argmax(1), "cluster")
    for retry in run.path("cluster").glob("retry*/checkpoint.pt"):
        retry.unlink()
    return run.finish("cluster", **extra)


def _train_heads(run: Run, neighbors: torch.Tensor, lr: float, attempt: int):
    """One training of the clustering heads (and backbone, if updated) at learning rate `lr`."""
    cfg, rt, c = run.cfg, run.rt, run.cfg.cluster
    seed_everything(cfg.seed + 1 + attempt)
    model = run.clustering_model(c.num_heads)
    if not run.head_only:
        model.backbone.load_state_dict(load_backbone(run).state_dict())
    model = rt.prepare(model)
    params = model.parameters() if c.update_backbone and not run.head_only else model.heads.parameters()
    optimizer = build_optimizer(params, c.optimizer, lr, c.weight_decay, c.momentum)
    logits_of = pair_logits(model, load_views(run)) if run.head_only else _image_pair_logits(run, model)
    n, k = neighbors.shape
    batch_size = min(c.batch_size, n)
    steps = len(minibatches(n, batch_size))

    def epoch_fn(epoch, tick):
        model.train()
        if not c.update_backbone:
            model.backbone.eval()   # frozen: batch-norm statistics must not drift either
        sums = np.zeros(3)
        for idx in minibatches(n, batch_size):
            nb = neighbors[idx, torch.randint(k, (len(idx),))]
            logits = logits_of(idx, nb)
            total, consistency, h = scan_loss(logits[:, :len(idx)], logits[:, len(idx):], c.entropy_weight)
            loss = total.sum()
            check_finite(loss, "cluster", epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += [total.mean().item(), consistency.mean().item(), h.mean().item()]
            tick()
        sums /= steps
        return {"loss": sums[0], "consistency": sums[1], "entropy": sums[2]}

    # a retry keeps its own checkpoint, so a kill during it resumes the retry, not the failed attempt
    where = run.path("cluster") if attempt == 0 else run.path("cluster", f"retry{attempt}")
    fingerprint = run.fingerprint("cluster") + ("" if attempt == 0 else f"-lr{lr:g}")
    history = run_epochs("cluster", where, c.epochs, steps, {"model": model, "opt": optimizer},
                         epoch_fn, fingerprint, rt)
    return model, history


def _image_pair_logits(run: Run, model: ClusteringModel):
    """SCAN's forward on images: (anchor idx, neighbour idx) -> (H, 2B, C) logits of augmented views."""
    cfg, rt, c = run.cfg, run.rt, run.cfg.cluster
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


def head_probs(run: Run, model: ClusteringModel, split: str, dtype=torch.float32) -> torch.Tensor:
    """(H, N, C) probabilities of every head on the unaugmented 'train' or 'eval' images, on the CPU."""
    model.eval()
    if run.head_only:
        return feature_probs(model, load_features(run, split), dtype=dtype)
    images = (run.train if split == "train" else run.eval).images
    return predict_in_batches(lambda x: model(x).softmax(-1).transpose(0, 1), images, run.rt,
                              dtype=dtype).transpose(0, 1)


def head_only_train_outputs(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) final-stage probabilities and (N, D) cached features of the training images (head-only runs)."""
    return head_probs(run, load_stage_model(run, final_stage(run)), "train")[0], load_features(run, "train")


def _warn_collapse(run: Run, pred: torch.Tensor, stage: str) -> None:
    share = torch.bincount(pred, minlength=run.num_clusters).max().item() / len(pred)
    if share > 0.9:
        log.warning("%s: one cluster holds %.0f%% of the images (collapse); raise cluster.entropy_weight "
                    "(now %s) and rerun", stage, 100 * share, run.cfg.cluster.entropy_weight)


def load_stage_model(run: Run, stage: str) -> ClusteringModel:
    """A stage's model as it trained: over cached features in head-only runs, else over images."""
    model = run.clustering_model(1)
    model.load_state_dict(load_torch(_require(run.path(stage, "model.pt"), stage)))
    return model


def load_clustering_model(run: Run, stage: str) -> ClusteringModel:
    """A stage's model mapping images to logits (a head-only run gets its pretrained network attached)."""
    model = load_stage_model(run, stage)
    if run.head_only:
        attach_network(model, build_pretrained(run.cfg, run.channels, run.info["mean"], run.info["std"]))
    return model


# ------------------------------------------------------------------------ stage 4: self-label

def confidence_and_sizes(run: Run, model: ClusteringModel, threshold: float) -> tuple[int, torch.Tensor]:
    """(training images with p_max > threshold, images per cluster by argmax)."""
    probs = head_probs(run, model, "train")[0]
    return int((probs.max(1).values > threshold).sum()), torch.bincount(probs.argmax(1), minlength=probs.shape[1])


def shrunk_cluster(sizes: torch.Tensor, reference: torch.Tensor, keep: float) -> int | None:
    """The cluster that shrank most below `keep` x its reference size, or None if none did.

    Clusters already empty in the reference cannot shrink (overclustering leaves some empty).
    """
    ratio = torch.where(reference > 0, sizes.double() / reference.double().clamp_min(1), torch.inf)
    worst = int(ratio.argmin())
    return worst if keep > 0 and ratio[worst] < keep else None


class _Best:
    """Weights, confident count and epoch (0: the starting model) of the epoch with the most confident samples."""

    def __init__(self, model, count: int):
        self.count, self.epoch, self.state = count, 0, {k: v.detach().clone() for k, v in model.state_dict().items()}

    def offer(self, model, count: int, epoch: int) -> bool:
        if count > self.count:
            self.count, self.epoch = count, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        return False

    def state_dict(self):
        return {"count": self.count, "epoch": self.epoch, "state": self.state}

    def load_state_dict(self, d):
        self.count, self.epoch, self.state = d["count"], d.get("epoch", 0), d["state"]


def stage_selflabel(run: Run) -> dict:
    """Fine-tune on confident pseudo-labels (weak view) with cross-entropy on a strong view."""
    if (record := run.done("selflabel")) is not None:
        return record
    cfg, rt, s = run.cfg, run.rt, run.cfg.selflabel
    seed_everything(cfg.seed + 2)
    model = rt.prepare(load_stage_model(run, "cluster"))
    start = time.time()
    initial, initial_sizes = confidence_and_sizes(run, model, s.threshold)
    if initial == 0:
        atomic_torch_save(run.path("selflabel", "model.pt"), model.state_dict())
        return run.finish("selflabel", seconds=time.time() - start, skipped=True, confident=[0], history=[],
                          check=report("selflabel", selflabel_check(0, None, s.threshold)))
    optimizer = build_optimizer(model.parameters(), s.optimizer, s.lr, s.weight_decay, s.momentum)
    logits_of = weak_strong_logits(model, load_views(run)) if run.head_only else _image_weak_strong_logits(run, model)
    ema = EMA(model, s.ema_decay) if s.ema_decay > 0 else None
    evaluated = ema.model if ema else model
    # The confident count usually dips when training on strong views starts, so the
    # initial model does not compete: the best trained epoch is kept.
    best = _Best(evaluated, -1)
    n = len(run.train)
    batch_size = min(s.batch_size, n)
    steps = len(minibatches(n, batch_size))
    since_best = {"epochs": 0}

    def epoch_fn(epoch, tick):
        model.train()
        total, used = 0.0, 0
        for idx in minibatches(n, batch_size):
            weak_logits, strong_logits = logits_of(idx)
            loss, count = selflabel_loss(weak_logits, strong_logits, s.threshold, s.class_balance)
            check_finite(loss, "selflabel", epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema:
                ema.update(model)
            total += loss.item()
            used += count
            tick()
        return {"loss": total / steps, "confident_in_batches": float(used)}

    def after_epoch(epoch, stats):
        count, sizes = confidence_and_sizes(run, evaluated, s.threshold)
        stats["confident"] = count
        stats["smallest_cluster"] = int(sizes.min())
        if (k := shrunk_cluster(sizes, initial_sizes, s.min_cluster_keep)) is not None:
            stats["merged"] = {"cluster": k, "size": int(sizes[k]), "cluster_stage_size": int(initial_sizes[k])}
            kept = f"epoch {best.epoch}" if best.epoch else "the cluster-stage model"
            say(rt, f"selflabel: epoch {epoch + 1} shrank cluster {k} from {int(initial_sizes[k])} to {int(sizes[k])} "
                    f"training images (below selflabel.min_cluster_keep={s.min_cluster_keep} of its size): "
                    f"self-labelling is merging clusters, so it stops and keeps {kept}")
            return True
        improved = best.offer(evaluated, count, epoch + 1)
        since_best["epochs"] = 0 if improved else since_best["epochs"] + 1
        return bool(s.patience) and since_best["epochs"] >= s.patience

    states = {"model": model, "opt": optimizer, "best": best}
    if ema:
        states["ema"] = ema
    history = run_epochs("selflabel", run.path("selflabel"), s.epochs, steps, states, epoch_fn,
                         run.fingerprint("selflabel"), rt, after_epoch)
    atomic_torch_save(run.path("selflabel", "model.pt"), best.state)
    merged = next((h["merged"] for h in history if "merged" in h), None)
    return run.finish("selflabel", seconds=time.time() - start, confident=[initial] + [h["confident"] for h in history],
                      best_confident=best.count, best_epoch=best.epoch,
                      merged=merged, history=history, check=report("selflabel", selflabel_check(initial, merged, s.threshold)))


def _image_weak_strong_logits(run: Run, model: ClusteringModel):
    """Self-labelling's forward on images: idx -> (weak-view logits without gradient, strong-view logits)."""
    cfg, rt = run.cfg, run.rt
    weak, strong = WeakAugment(cfg.augment, run.image_size), StrongAugment(cfg.augment, run.image_size)
    images = run.train.images.to(rt.device)

    def logits(idx):
        x = rt.batch(images[idx])
        with torch.no_grad(), rt.autocast():
            weak_logits = model(weak(x))[0]
        with rt.autocast():
            return weak_logits, model(strong(x))[0]
    return logits


# ------------------------------------------------------------------------ optional: SPC refinement

def stage_refine(run: Run) -> dict:
    """SPC refinement (hierarchical pseudo-labels + mixup) of the latest model; writes refine/model.pt.

    Starts from the self-labelled model when self-labelling ran, else from the cluster model.
    """
    cfg, rt = run.cfg, run.rt
    if cfg.refine.method == "none":
        raise StageError("refine.method is 'none': pass --refine spc (to scan evaluate as well) to refine with SPC")
    if (record := run.done("refine")) is not None:
        return record
    source = ([s for s in trained_stages(run) if s != "refine"] or ["cluster"])[-1]
    seed_everything(cfg.seed + 3)
    model = rt.prepare(load_stage_model(run, source))
    inputs = (feature_inputs(model, load_views(run)) if run.head_only
              else image_inputs(model, run.train.images.to(rt.device), cfg.augment, rt))
    start = time.time()
    history, rounds = train_spc(model, inputs, len(run.train), cfg.refine, rt, run.path("refine"),
                                run.fingerprint("refine"), run.train.labels, run.info["num_classes"])
    atomic_torch_save(run.path("refine", "model.pt"), model.state_dict())
    return run.finish("refine", seconds=time.time() - start, source=source, rounds=rounds, history=history)


# ------------------------------------------------------------------------ stage 5: evaluate

def stage_enabled(cfg: Config, stage: str) -> bool:
    """selflabel and refine are optional; every other stage always runs."""
    return {"selflabel": cfg.selflabel.enabled, "refine": cfg.refine.method != "none"}.get(stage, True)


def trained_stages(run: Run) -> list[str]:
    """Enabled model-producing stages whose model exists, in pipeline order."""
    return [s for s in MODEL_STAGES if stage_enabled(run.cfg, s) and run.path(s, "model.pt").exists()]


def final_stage(run: Run) -> str:
    return (trained_stages(run) or ["cluster"])[-1]


def stage_evaluate(run: Run) -> dict:
    """Metrics of the baselines and each trained stage on the eval split, label-free scores against
    k-means on raw pixels, and every stage's self-check; writes metrics.json."""
    rt, k, seed = run.rt, run.num_clusters, run.cfg.seed
    start = time.time()
    metrics: dict = {"split": run.cfg.data.eval_split, "num_eval": len(run.eval), "num_clusters": k}
    labels, classes = run.eval.labels, run.info["num_classes"]
    train_feats = np.load(_require(run.path("features", "train.npy"), "pretext"))
    kmeans_train, kmeans_eval = kmeans_assign(train_feats, np.load(run.path("features", "eval.npy")), k, seed)
    pixels = pixel_kmeans(run.train.images, run.eval.images, k, seed)
    if labels is not None:
        metrics["kmeans"] = evaluate_clustering(kmeans_eval, labels, classes)
        if pixels is not None:
            metrics["kmeans_pixels"] = evaluate_clustering(pixels[1], labels, classes)
    last = None
    for stage in trained_stages(run):
        model = rt.prepare(load_stage_model(run, stage))
        probs = head_probs(run, model, "eval")[0].numpy()
        if labels is not None:
            metrics[stage] = evaluate_clustering(probs, labels, classes)
        last = (stage, probs, model)
    if last is None:
        raise StageError(f"no trained model in {run.run_dir}: run the cluster stage first (scan cluster)")
    metrics["final_stage"], probs, model = last
    atomic_save_npy(run.path("probs.npy"), probs)
    atomic_save_npy(run.path("predictions.npy"), probs.argmax(1))
    metrics.update(_label_free(run, head_probs(run, model, "train")[0].numpy(), kmeans_train, pixels))
    for stage in STAGES[:-1]:
        record = read_json(run.path(stage, "done.json"))
        if record:
            metrics.setdefault("seconds", {})[stage] = record.get("seconds")
            if "purity" in record:
                metrics["neighbor_purity"] = record["purity"]
    metrics.setdefault("seconds", {})["evaluate"] = time.time() - start
    atomic_write_json(run.path("metrics.json"), metrics)
    return metrics


def _label_free(run: Run, train_probs: np.ndarray, kmeans_train: np.ndarray, pixels) -> dict:
    """Scores that need no labels for ours and the baselines (training images), and every stage's check."""
    path = run.path("mine", "neighbors.npy")
    neighbors = np.load(path) if path.exists() else None
    k = run.num_clusters
    scores = {"ours": unsupervised_scores(train_probs.argmax(1), neighbors, k, train_probs),
              "kmeans_features": unsupervised_scores(kmeans_train, neighbors, k)}
    if pixels is not None:
        scores["kmeans_pixels"] = unsupervised_scores(pixels[0], neighbors, k)
    checks = {stage: record["check"] for stage in STAGES[:-1]
              if (record := read_json(run.path(stage, "done.json"))) and "check" in record}
    if neighbors is not None and pixels is not None:
        checks["baseline"] = report("baseline", baseline_check(scores["ours"], scores["kmeans_pixels"]))
    return {"unsupervised": scores, "checks": checks}


STAGE_FUNCTIONS = {"pretext": stage_pretext, "mine": stage_mine, "cluster": stage_cluster,
                   "selflabel": stage_selflabel, "refine": stage_refine, "evaluate": stage_evaluate}


def run_pipeline(run: Run, stages=STAGES) -> dict:
    """Run (or resume) the given stages in order; returns the evaluation metrics.

    Disabled optional stages are skipped in a chain; a stage asked for alone always runs, so
    that it can say how to enable it rather than silently doing nothing.
    """
    result: dict = {}
    for stage in stages:
        if len(stages) > 1 and not stage_enabled(run.cfg, stage):
            continue
        result = STAGE_FUNCTIONS[stage](run)
    return result


def summary_line(run: Run, metrics: dict) -> str:
    parts = []
    for stage in ("kmeans_pixels", "kmeans", "cluster", "selflabel", "refine"):
        if stage in metrics:
            m = metrics[stage]
            parts.append(f"{stage} acc {m['acc']:.3f} nmi {m['nmi']:.3f} ari {m['ari']:.3f}")
    where = f"{metrics['num_eval']} '{metrics['split']}' images, {run.num_clusters} clusters"
    problems = [f"{stage} {c['status']}" for stage, c in metrics.get("checks", {}).items() if c["status"] != "ok"]
    checks = f"; checks: {', '.join(problems)} (see metrics.json)" if problems else "; every self-check ok"
    if not parts:
        return f"clustered {where} without labels{checks}; results in {run.run_dir}"
    return f"{' | '.join(parts)}  ({where}{checks}; results in {run.run_dir})"
