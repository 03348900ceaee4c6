"""Self-checks: every stage says, without labels, whether it learned anything.

A check returns a plain dict stored in the stage's done.json and gathered into metrics.json
under "checks": {"status": "ok" | "rescued" | "warning" | "failed", "message": ..., "fix": ...}.
A status other than ok is also logged, so a run can never report useless clusters silently.
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("scan")

# the cluster heads' consistency term -log <p_i, p_j> equals log C at the uniform prediction: a
# head still above this share of log C after training never left it
UNIFORM_SHARE = 0.9
# a pretext loss that fell by less than this share of its first epoch's value learned nothing
PRETEXT_MIN_DROP = 0.05


def verdict(status: str, message: str, fix: str = "", **facts) -> dict:
    return {"status": status, "message": message, "fix": fix, **facts}


def report(stage: str, check: dict) -> dict:
    """Log a check that is not ok (one line with its fix) and return it."""
    if check["status"] != "ok":
        log.warning("%s check %s: %s%s", stage, check["status"].upper(), check["message"],
                    f" Fix: {check['fix']}" if check.get("fix") else "")
    return check


def pretext_check(history: list[dict]) -> dict:
    """Did the pretext loss fall? Compares the last epoch's mean loss with the highest before it.

    The highest, not the first: a method scored against a queue of past keys (MoCo, BYOL-queue) has
    few negatives while the queue fills, so its first epoch's loss is the lowest of the run.
    """
    losses = [h["loss"] for h in history if "loss" in h]
    if len(losses) < 2:
        return verdict("ok", "too few epochs to judge the pretext loss", epochs=len(losses))
    peak = max(losses[:-1])
    drop = 1 - losses[-1] / peak if peak > 0 else 0.0
    facts = {"peak_loss": peak, "last_loss": losses[-1], "drop": drop}
    if drop < PRETEXT_MIN_DROP:
        return verdict("failed", f"the pretext loss fell only {100 * drop:.1f}% ({peak:.3f} -> {losses[-1]:.3f}): "
                                 "the features are close to those of a random network.",
                       "raise pretext.lr or pretext.epochs (the automatic defaults use Adam 1e-3).", **facts)
    return verdict("ok", f"the pretext loss fell {100 * drop:.0f}%", **facts)


def cluster_check(consistency: float, confidence: float, num_clusters: int) -> dict:
    """Did the kept head leave the uniform prediction?

    consistency: the head's mean -log <p_i, p_j> over the mined pairs (log C when uniform);
    confidence: its mean max probability over the training images (1/C when uniform).
    """
    uniform = math.log(num_clusters)
    facts = {"consistency": consistency, "uniform_consistency": uniform, "confidence": confidence}
    if consistency > UNIFORM_SHARE * uniform:
        return verdict("failed", f"the cluster heads stayed near the uniform prediction (consistency {consistency:.3f}, "
                                 f"log C = {uniform:.3f}; mean confidence {confidence:.3f}, 1/C = "
                                 f"{1 / num_clusters:.3f}): the clusters are close to arbitrary.",
                       "raise cluster.lr or cluster.epochs (the automatic defaults use Adam 1e-3).", **facts)
    return verdict("ok", f"consistency {consistency:.3f} (uniform {uniform:.3f}), mean confidence {confidence:.3f}",
                   **facts)


def selflabel_check(confident: int, merged: dict | None, threshold: float) -> dict:
    if confident == 0:
        return verdict("warning", f"no training image had confidence above selflabel.threshold={threshold}: "
                                  "self-labelling trained nothing and kept the cluster-stage model.",
                       "lower selflabel.threshold (e.g. 0.9) or train the cluster stage longer.", confident=0)
    if merged:
        return verdict("warning", f"self-labelling began merging clusters (cluster {merged['cluster']} shrank from "
                                  f"{merged['cluster_stage_size']} to {merged['size']}) and was stopped; the last "
                                  "epoch that kept every cluster is used.",
                       "its confident samples are not clean enough: try --refine spc instead.", confident=confident)
    return verdict("ok", f"{confident} confident training images", confident=confident)


def size_balance(assignments: np.ndarray, num_clusters: int) -> float:
    """Entropy of the cluster sizes over log C: 1 for equal sizes, 0 when one cluster holds everything."""
    p = np.bincount(np.asarray(assignments), minlength=num_clusters) / max(len(assignments), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(num_clusters))


def baseline_check(ours: dict, pixels: dict) -> dict:
    """Compare our clustering with k-means on raw pixels by their agreement with the mined neighbours."""
    facts = {"neighbor_agreement": ours["neighbor_agreement"],
             "pixels_neighbor_agreement": pixels["neighbor_agreement"]}
    if ours["neighbor_agreement"] <= pixels["neighbor_agreement"]:
        return verdict("warning", f"our clusters agree with the mined neighbours no more than k-means on raw pixels "
                                  f"does ({ours['neighbor_agreement']:.3f} vs {pixels['neighbor_agreement']:.3f}): "
                                  "they are probably no better than that baseline.",
                       "check the pretext and cluster checks above; more pretext epochs usually help.", **facts)
    return verdict("ok", f"neighbour agreement {ours['neighbor_agreement']:.3f} vs k-means on raw pixels "
                         f"{pixels['neighbor_agreement']:.3f}", **facts)
