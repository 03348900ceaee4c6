"""Stage 4, self-label: fine-tuning on confident pseudo-labels of the weak view with cross-entropy
on a strong view; stops when it starts merging clusters. Writes selflabel/model.pt."""
from __future__ import annotations

import time
from typing import Callable

import torch

from scan.algo.checks import report, selflabel_check
from scan.algo.losses import per_cluster_pseudo_labels, selflabel_loss
from scan.core.checkpoint import atomic_torch_save, seed_everything
from scan.core.distributed import parallel
from scan.core.registry import Registry
from scan.nets.averaging import EMA
from scan.pipeline.run import Run, head_probs, load_stage_model, say
from scan.pipeline.stage import Stage, register_stage
from scan.train.best_weights import BestWeights
from scan.train.engine import build_optimizer, minibatches, optimizer_step, run_epochs

# selflabel.selection: (a function giving the probabilities (N, C) of the unaugmented training images at
# the start of an epoch, config, device) -> the labels of a batch of training indices, (mask, targets), or
# None for the weak view's confident predictions. A function, so a selection that needs no probabilities
# costs no pass over the training images
SELECTIONS: Registry[Callable] = Registry("selflabel.selection")
SELECTIONS.add("threshold", lambda probs_of, s, device: lambda idx: None)   # the paper's: decided in every batch


@SELECTIONS.register("per_cluster")
def per_cluster_selection(probs_of: Callable[[], torch.Tensor], s, device: torch.device) -> Callable:
    """Labels fixed for the epoch: every cluster's most confident members."""
    mask, targets = per_cluster_pseudo_labels(probs_of(), s.per_cluster_fraction)
    mask, targets = mask.to(device), targets.to(device)
    return lambda idx: (mask[idx], targets[idx])


def confidence_and_sizes(probs: torch.Tensor, threshold: float) -> tuple[int, torch.Tensor]:
    """(training images with p_max > threshold, images per cluster by argmax) of probabilities (N, C)."""
    return int((probs.max(1).values > threshold).sum()), torch.bincount(probs.argmax(1), minlength=probs.shape[1])


def shrunk_cluster(sizes: torch.Tensor, reference: torch.Tensor, keep: float) -> int | None:
    """The cluster that shrank most below `keep` x its reference size, or None if none did.

    Clusters already empty in the reference cannot shrink (overclustering leaves some empty).
    """
    ratio = torch.where(reference > 0, sizes.double() / reference.double().clamp_min(1), torch.inf)
    worst = int(ratio.argmin())
    return worst if keep > 0 and ratio[worst] < keep else None


def _ignored_by_selflabel(cfg) -> tuple[str, ...]:
    """Fields that do not change this training: the per-cluster share under the threshold selection, and
    `keep` at its default (runs made before it existed stay valid)."""
    s = cfg.selflabel
    return ((("selflabel.per_cluster_fraction",) if s.selection != "per_cluster" else ())
            + (("selflabel.keep",) if s.keep == "most_confident" else ()))


def stage_selflabel(run: Run) -> dict:
    """Fine-tune on confident pseudo-labels (weak view) with cross-entropy on a strong view."""
    if (record := run.done("selflabel")) is not None:
        return record
    cfg, rt, s = run.cfg, run.rt, run.cfg.selflabel
    seed_everything(cfg.seed + 2)
    model = rt.prepare(load_stage_model(run, "cluster"))
    start = time.time()
    # the training images' probabilities after epoch `epoch` (0: the cluster model), computed once for the
    # merge check and reused by the next epoch's selection (after a resume, that epoch recomputes them)
    latest = {"epoch": 0, "probs": head_probs(run, model, "train")[0]}
    initial, initial_sizes = confidence_and_sizes(latest["probs"], s.threshold)
    if initial == 0:
        atomic_torch_save(run.path("selflabel", "model.pt"), model.state_dict())
        return run.finish("selflabel", seconds=time.time() - start, skipped=True, confident=[0], history=[],
                          check=report("selflabel", selflabel_check(0, None, s.threshold)))
    optimizer = build_optimizer(model.parameters(), s.optimizer, s.lr, s.weight_decay, s.momentum)
    logits_of = parallel(model, run.source.weak_strong_logits(model), cfg.sync_batchnorm)   # DDP under torchrun
    ema = EMA(model, s.ema_decay) if s.ema_decay > 0 else None
    write_back = ema is not None and s.ema_mode == "write_back"
    # separate: the averaged copy is what is evaluated and kept; write_back: the model itself is the average
    evaluated = ema.model if ema and not write_back else model
    # The confident count usually dips when training on strong views starts, so the
    # initial model does not compete: the best trained epoch is kept.
    best = BestWeights(higher=True, model=evaluated, score=-1)   # scores: confident training images
    n = len(run.train)
    batch_size = min(s.batch_size, n)
    steps = len(minibatches(n, batch_size))
    since_best = {"epochs": 0}

    def epoch_fn(epoch, tick):
        def probs_of():
            return latest["probs"] if latest["epoch"] == epoch else head_probs(run, evaluated, "train")[0]
        labels_of = SELECTIONS.get(s.selection)(probs_of, s, rt.device)
        model.train()
        total, used = 0.0, 0
        for idx in minibatches(n, batch_size):
            weak_logits, strong_logits = logits_of(idx)
            loss, count = selflabel_loss(weak_logits, strong_logits, s.threshold, s.class_balance,
                                         labels_of(idx.to(rt.device)))
            total += optimizer_step(optimizer, loss, "selflabel", epoch)
            if ema:
                ema.update(model)
                if write_back:
                    ema.write_back(model)
            used += count
            tick()
        return {"loss": total / steps, "confident_in_batches": float(used)}

    def after_epoch(epoch, stats):
        latest.update(epoch=epoch + 1, probs=head_probs(run, evaluated, "train")[0])
        count, sizes = confidence_and_sizes(latest["probs"], s.threshold)
        stats["confident"] = count
        stats["smallest_cluster"] = int(sizes.min())
        if (k := shrunk_cluster(sizes, initial_sizes, s.min_cluster_keep)) is not None:
            stats["merged"] = {"cluster": k, "size": int(sizes[k]), "cluster_stage_size": int(initial_sizes[k])}
            kept = f"epoch {best.epoch}" if best.epoch else "the cluster-stage model"
            say(rt, f"selflabel: epoch {epoch + 1} shrank cluster {k} from {int(initial_sizes[k])} to {int(sizes[k])} "
                    f"training images (below selflabel.min_cluster_keep={s.min_cluster_keep} of its size): "
                    f"self-labelling is merging clusters, so it stops and keeps {kept}")
            return True
        # most_confident: the count is the score; last: every later epoch wins
        improved = best.offer(evaluated, count if s.keep == "most_confident" else epoch + 1, epoch + 1)
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
                      best_epoch=best.epoch, **({"best_confident": best.score} if s.keep == "most_confident" else {}),
                      merged=merged, history=history, check=report("selflabel", selflabel_check(initial, merged, s.threshold)))


register_stage(Stage("selflabel", stage_selflabel, needs=("cluster",), sections=("seed", "selflabel", "augment"),
                     ignores=_ignored_by_selflabel,
                     enabled=lambda cfg: cfg.selflabel.enabled, writes_model=True,
                     description="confident predictions, strong augmentation, class-balanced cross-entropy"))
