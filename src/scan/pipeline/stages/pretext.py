"""Stage 1, pretext: self-supervised training of the backbone (or, with pretext.method: pretrained,
embedding the images once with a frozen network); writes pretext/backbone.pt and features/*.npy."""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from scan.algo.checks import pretext_check, report
from scan.core.checkpoint import atomic_save_npy, atomic_torch_save, seed_everything
from scan.core.distributed import parallel
from scan.nets.models import Backbone, ContrastiveModel, load_backbone_weights, trained_contrastive
from scan.pipeline.run import Run
from scan.pipeline.stage import Stage, register_stage
from scan.pretext import build_pretext, reads_strong_augment
from scan.train.engine import (
    build_optimizer,
    cosine_schedule,
    minibatches,
    optimizer_step,
    predict_in_batches,
    run_epochs,
    set_lr,
)
from scan.train.features import cache_features, features_path

log = logging.getLogger("scan")


def stage_pretext(run: Run) -> dict:
    """Self-supervised training of the backbone; writes pretext/backbone.pt and features/*.npy."""
    if (record := run.done("pretext")) is not None:
        return record
    if run.source.frozen:   # a frozen network: embed the images once, nothing to train
        return run.finish("pretext", **cache_features(run))
    cfg, rt = run.cfg, run.rt
    p = cfg.pretext
    seed_everything(cfg.pretext_seed)
    backbone = run.backbone()
    if cfg.model.init_checkpoint:
        load_backbone_weights(backbone, cfg.model.init_checkpoint)
    elif p.epochs == 0:
        log.warning("pretext.epochs=0 without model.init_checkpoint: the features are those of a random network")
    data = run.pretext_data   # data.pretext_split (e.g. STL-10's train+unlabeled), else the training split
    method = rt.prepare(build_pretext(p.method, backbone, cfg, run.image_size, run.channels, len(data)))
    optimizer = build_optimizer(method.parameters(), p.optimizer, p.lr, p.weight_decay, p.momentum)
    loss_of = parallel(method, method.loss, cfg.sync_batchnorm)   # DDP under torchrun, method.loss otherwise
    images = data.images.to(rt.device)
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
                loss = loss_of(rt.batch(images[idx]), idx.to(rt.device))
            total += optimizer_step(optimizer, loss, "pretext", epoch)
            method.after_step(step, p.epochs * steps)
            tick()
        return {"loss": total / steps, "lr": float(lrs[min(epoch * steps, len(lrs) - 1)])}

    history = run_epochs("pretext", run.path("pretext"), p.epochs, steps, {"model": method, "opt": optimizer},
                         epoch_fn, run.fingerprint("pretext"), rt)
    backbone = method.backbone
    atomic_torch_save(run.path("pretext", "backbone.pt"), backbone.state_dict())
    contrastive = trained_contrastive(method)
    if contrastive is not None:   # mine.head: mlp starts from the first layer of its projection
        atomic_torch_save(run.path("pretext", "projection.pt"), contrastive.head.state_dict())
    _write_features(run, backbone, contrastive if p.epochs > 0 else None)
    return run.finish("pretext", seconds=time.time() - start, history=history, method=p.method,
                      split=cfg.data.pretext_split or cfg.data.train_split, num_images=len(data),
                      check=report("pretext", pretext_check(history)))


def _write_features(run: Run, backbone: Backbone, projection: ContrastiveModel | None) -> None:
    """features/{train,eval}.npy (pooled backbone features) and, for a trained projection head,
    features/{train,eval}_projection.npy (its L2-normalised output: mine.features=projection); the
    eval files only for data with a held-out split (scan.train.features.features_path)."""
    backbone.eval()
    if projection is not None:
        projection.eval()
    dim = backbone.feature_dim
    splits = (("train", run.train),) + ((("eval", run.eval),) if run.eval is not run.train else ())
    for name, data in splits:
        if projection is None:
            feats = predict_in_batches(backbone, data.images, run.rt, desc=f"features ({name})")
        else:   # one pass: (N, D) backbone features next to the (N, P) projections of the same images
            def features_and_projection(x):
                f = backbone(x)
                return torch.cat([f, F.normalize(projection.head(f), dim=1)], 1)
            both = predict_in_batches(features_and_projection, data.images, run.rt, desc=f"features ({name})")
            feats = both[:, :dim]
            atomic_save_npy(features_path(run, name, "_projection"), both[:, dim:].contiguous().numpy())
        atomic_save_npy(features_path(run, name), feats.contiguous().numpy())


def _ignored_by_pretext(cfg) -> tuple[str, ...]:
    """The run's seed when pretext.seed replaces it, and the strong augmentation's strength unless the
    method augments with it (only self-labelling does for SimCLR/MoCo/RotNet), so that changing them
    does not retrain the pretext."""
    ignored = () if cfg.pretext.seed is None else ("seed",)
    return ignored + (() if reads_strong_augment(cfg.pretext) else ("augment.strong_strength",))


register_stage(Stage("pretext", stage_pretext, sections=("seed", "model", "augment", "pretext"),
                     inputs=lambda run: (run.pretext_data_hash,), ignores=_ignored_by_pretext,
                     description="self-supervised features (SimCLR, MoCo, BYOL-queue, RotNet) or a frozen network"))
