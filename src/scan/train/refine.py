"""SPC refinement: fine-tune a clustering model on hierarchical pseudo-labels with mixup.

Each round recomputes the features and probabilities of the training samples, builds the
strong set S (hard labels) and the weak set W (soft labels) with `propagation`, and trains for
⌈epochs / rounds⌉ epochs on L = CE(S, weak augmentation) + λ_M · CE(mixup of S with
strongly augmented W, soft targets). The pseudo-labels are part of the epoch checkpoint, so an
interrupted run resumes with the labels of its round rather than recomputing them from a
half-trained model.

Where we differ from the SPC paper or its code, or it is silent (docs/recipes.md has the table):
- W's labels: soft P_i (`refine.weak_labels: soft`); `hard` (the paper's eq. 10) trains W on
  onehot(argmax P_i). Soft keeps the propagation's doubt about a weak sample in the mixup target.
- Seeding W: the non-confident samples start propagation from their own predictions Q_i (as the
  paper), not from zero, so an isolated sample keeps its network label instead of becoming uniform.
- `refine.form: paper` follows the authors' code: graph max(A, Aᵀ), L2-normalised rows ranked, S fixed
  after the first round (ours: A + Aᵀ, rows summing to one, S rebuilt every round).
- The top-r column: the class propagation gives a sample (`refine.rank_by: propagated`);
  `predicted` ranks it in the network's class argmax Q_i (its S′ label).
- λ_M = 1 (`refine.mix_weight`) and μ = 0.01 (`refine.mu`, γ ≈ 0.99): the usual label
  propagation weight, and an unweighted sum of the two cross-entropies.
With C classes and C·r ≥ 1 the top-r filter removes nothing (S = S′): a warning says so.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scan.algo.losses import spc_loss
from scan.algo.metrics import cluster_to_class
from scan.algo.propagation import PseudoLabels, hierarchical_mixup, hierarchical_pseudo_labels, top_r_filters
from scan.config import AugmentConfig, RefineConfig
from scan.core.distributed import on_main
from scan.nets.augment import StrongAugment, WeakAugment
from scan.nets.heads import feature_logits, feature_probs, random_views
from scan.nets.models import ClusteringModel
from scan.train.engine import Runtime, build_optimizer, optimizer_step, predict_in_batches, run_epochs

log = logging.getLogger("scan")


@dataclass
class Inputs:
    """How refinement reads training samples: images augmented on the fly, or cached features (head-only runs)."""
    weak: Callable[[torch.Tensor], torch.Tensor]     # indices (B,) -> weakly augmented inputs on the device
    strong: Callable[[torch.Tensor], torch.Tensor]   # indices (B,) -> strongly augmented inputs on the device
    logits: Callable[[torch.Tensor], torch.Tensor]   # inputs -> head-0 logits (B, C)
    embed: Callable[[], tuple[np.ndarray, np.ndarray]]   # -> features (N, D), probabilities (N, C), unaugmented


def image_inputs(model: ClusteringModel, images: torch.Tensor, augment: AugmentConfig, rt: Runtime) -> Inputs:
    """Inputs from uint8 training images on rt.device; the graph uses the current backbone's features."""
    image_size = int(images.shape[-1])
    weak_aug, strong_aug = WeakAugment(augment, image_size), StrongAugment(augment, image_size)

    def embed():
        model.eval()

        def both(x):   # one pass gives both: (B, D + C)
            f = model.backbone(x)
            return torch.cat([f.float(), model.heads_from_features(f)[0].float().softmax(-1)], 1)
        out = predict_in_batches(both, images, rt).numpy()
        d = model.backbone.feature_dim
        return out[:, :d], out[:, d:]
    return Inputs(weak=lambda idx: weak_aug(rt.batch(images[idx])),
                  strong=lambda idx: strong_aug(rt.batch(images[idx])),
                  logits=lambda x: model(x)[0], embed=embed)


def feature_inputs(model: ClusteringModel, views: torch.Tensor) -> Inputs:
    """Inputs from cached features (1 + V, N, D) of a frozen network: view 0 is the weak view, a random
    augmented view the strong one. The graph is built on the fixed view-0 features."""
    augmented = views[1:] if len(views) > 1 else views
    features = views[0].float().cpu().numpy()
    return Inputs(weak=lambda idx: views[0, idx.to(views.device)],
                  strong=lambda idx: random_views(augmented, idx),
                  logits=lambda x: feature_logits(model, x)[0],
                  embed=lambda: (features, feature_probs(model, views[0])[0].numpy()))


def pseudo_label_stats(pl: PseudoLabels, probs: np.ndarray, labels: np.ndarray | None,
                       num_classes: int | None) -> dict:
    """Sizes of S′, S and W; with ground truth, the accuracy of their labels.

    Clusters are mapped to classes once, from the model's predictions on the whole training
    set (Hungarian, or majority when overclustering), and that mapping scores every subset.
    """
    weak = ~pl.strong
    stats = {"strong_prime": int(pl.strong_prime.sum()), "strong": int(pl.strong.sum()), "weak": int(weak.sum())}
    if labels is None:
        return stats
    mapping = cluster_to_class(probs.argmax(1), labels, probs.shape[1], num_classes)
    network_ok = mapping[probs.argmax(1)] == labels
    propagated_ok = mapping[pl.labels] == labels
    for name, correct, mask in (("acc_strong_prime", network_ok, pl.strong_prime),
                                ("acc_strong", propagated_ok, pl.strong), ("acc_weak", propagated_ok, weak)):
        stats[name] = float(correct[mask].mean()) if mask.any() else None
    return stats


class RoundLabels:
    """The current round's S (indices, hard labels) and W (indices, soft labels) plus per-round records."""

    def __init__(self):
        self.strong = self.strong_targets = self.weak = self.weak_targets = None
        self.records: list[dict] = []

    def set(self, pl: PseudoLabels, record: dict) -> None:
        targets = torch.from_numpy(pl.targets).float()
        self.strong = torch.from_numpy(np.flatnonzero(pl.strong))
        self.weak = torch.from_numpy(np.flatnonzero(~pl.strong))
        self.strong_targets = torch.from_numpy(pl.labels).long()[self.strong]
        self.weak_targets = targets[self.weak]
        self.records.append(record)

    def keep_strong_set(self, pl: PseudoLabels) -> PseudoLabels:
        """`pl` with this round's S and S labels replaced by the current ones (W: every other sample)."""
        strong = np.zeros(len(pl.strong), dtype=bool)
        strong[self.strong.numpy()] = True
        labels = pl.labels.copy()
        labels[strong] = self.strong_targets.numpy()
        return pl._replace(strong=strong, labels=labels)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def _describe(record: dict) -> str:
    parts = [f"refine round {record['round']}: |S'| = {record['strong_prime']}, |S| = {record['strong']}, "
             f"|W| = {record['weak']}"]
    parts += [f"{name} {record[key]:.3f}" for key, name in (("acc_strong", "pseudo-label acc S"),
                                                             ("acc_weak", "W")) if record.get(key) is not None]
    if not record["strong"]:
        parts.append("no sample is both confident and top-ranked: stopping "
                     "(lower refine.threshold or raise refine.top_fraction)")
    return ", ".join(parts)


def warn_if_top_r_keeps_all(num_classes: int, top_fraction: float) -> None:
    if not top_r_filters(num_classes, top_fraction):
        log.warning(f"refine: {num_classes} clusters x refine.top_fraction={top_fraction:g} >= 1, so the per-class "
                    f"top-r filter keeps every confident sample (S = S'); lower refine.top_fraction below "
                    f"{1 / num_classes:.3g} for it to filter")


def train_spc(model: ClusteringModel, inputs: Inputs, n: int, r: RefineConfig, rt: Runtime, stage_dir: Path,
              fingerprint: str, labels: np.ndarray | None = None,
              num_classes: int | None = None) -> tuple[list[dict], list[dict]]:
    """Refine `model` (single head, on rt.device) in place on `n` training samples read through `inputs`.

    Returns (per-epoch history, per-round records). `labels` (optional) only score the
    pseudo-labels. Training stops early when a round's strong set is empty.
    """
    optimizer = build_optimizer(model.parameters(), r.optimizer, r.lr, r.weight_decay, r.momentum,
                                nesterov=r.nesterov and r.momentum > 0)
    batch_size = min(r.batch_size, n)
    steps = max(1, n // batch_size)          # an epoch draws as many S (and W) samples as there are images
    per_round = max(1, math.ceil(r.epochs / r.rounds))
    state = RoundLabels()
    warn_if_top_r_keeps_all(model.num_clusters, r.top_fraction)

    def relabel(epoch: int) -> None:
        features, probs = inputs.embed()
        # the graph and the propagation: once (rank 0 under torchrun), shared with every rank
        pl = on_main(lambda: hierarchical_pseudo_labels(features, probs, r.threshold, r.top_fraction,
                                                        r.num_neighbors, r.mu, r.cg_iterations, r.weak_labels,
                                                        r.rank_by, r.form))
        if r.form == "paper" and state.records:   # the authors fix S (and its labels) after the first round
            pl = state.keep_strong_set(pl)
        record = {"round": len(state.records) + 1, "epoch": epoch + 1,
                  **pseudo_label_stats(pl, probs, labels, num_classes)}
        state.set(pl, record)
        if not rt.quiet:
            tqdm.write(_describe(record), file=sys.stderr)

    def epoch_fn(epoch, tick):
        if epoch % per_round == 0:
            relabel(epoch)
        if not len(state.strong):
            return {"loss": 0.0}
        model.train()
        sums = np.zeros(3)
        for _ in range(steps):
            # both sets are sampled with replacement: S is usually much smaller than a pass over W
            s = torch.randint(len(state.strong), (batch_size,))
            x_s = inputs.weak(state.strong[s])
            y_s = state.strong_targets[s].to(rt.device)
            if len(state.weak):
                w = torch.randint(len(state.weak), (batch_size,))
                one_hot = F.one_hot(y_s, model.num_clusters).float()
                x_mix, y_mix, _ = hierarchical_mixup(x_s, one_hot, inputs.strong(state.weak[w]),
                                                     state.weak_targets[w].to(rt.device), r.alpha)
            else:
                x_mix, y_mix = x_s[:0], y_s.new_zeros((0, model.num_clusters), dtype=torch.float32)
            with rt.autocast():
                logits = inputs.logits(torch.cat([x_s, x_mix]))
            loss, ce_strong, ce_mixed = spc_loss(logits[:batch_size], y_s, logits[batch_size:], y_mix, r.mix_weight)
            optimizer_step(optimizer, loss, "refine", epoch)
            sums += [loss.item(), ce_strong.item(), ce_mixed.item()]
            tick()
        sums /= steps
        return {"loss": sums[0], "ce_strong": sums[1], "ce_mixed": sums[2]}

    history = run_epochs("refine", stage_dir, r.epochs, steps, {"model": model, "opt": optimizer, "labels": state},
                         epoch_fn, fingerprint, rt, after_epoch=lambda epoch, stats: not len(state.strong))
    return history, state.records
