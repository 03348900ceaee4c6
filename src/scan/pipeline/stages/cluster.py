"""Stage 3, cluster: heads trained with the SCAN loss so that an image and its neighbours agree;
the head with the lowest loss is kept (after the last epoch on the training neighbours, or with
cluster.head_choice=per_epoch the lowest of every epoch on held-out neighbours), and a training
that never left the uniform prediction is retried at a higher learning rate. With cluster.candidates, the kept
head's partition then competes with recipes on the same features (k-means, UMAP -> k-means): the one with the
highest modularity on the mined kNN graph wins, and the head learns a recipe's win by cross-entropy, so every
later stage starts from it. Writes cluster/model.pt."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from scan.algo.candidates import compute_candidates, pick_partition, umap_available
from scan.algo.checks import cluster_check, report
from scan.algo.losses import scan_loss, scan_loss_over_pairs
from scan.algo.metrics import cluster_to_class
from scan.algo.neighbors import mine_neighbors
from scan.algo.num_clusters import SIZE_PRIORS
from scan.core.checkpoint import atomic_torch_save, seed_everything
from scan.core.distributed import is_main, parallel
from scan.pipeline.run import Run, head_probs, mining_inputs, require, say
from scan.pipeline.stage import Stage, register_stage
from scan.train.best_weights import BestWeights
from scan.train.engine import build_optimizer, minibatches, optimizer_step, run_epochs
from scan.train.features import read_features
from scan.train.mining import mining_space

log = logging.getLogger("scan")

# the cluster stage retries a run whose heads never left the uniform prediction at 10x, then 100x
# the learning rate, never above this bound (Adam on the backbone diverges past it)
RESCUE_LR_FACTORS = (10.0, 100.0)
RESCUE_MAX_LR = 1e-2
# restart r seeds its training with seed + 1 + attempt + r * RESTART_SEED_STEP (restart 0: as without restarts)
RESTART_SEED_STEP = 1000
# the head's fit to a winning recipe's partition seeds its batches with seed + CANDIDATE_SEED_OFFSET
CANDIDATE_SEED_OFFSET = 5


def stage_cluster(run: Run) -> dict:
    """Train `num_heads` clustering heads with the SCAN loss; keep the head with the lowest loss.

    With cluster.restarts = R > 1 the whole training runs R times from different seeds and the
    restart whose kept head has the lowest loss is kept: heads that share an updated backbone
    converge to one partition, so only an independent training can leave a poor one. A training
    whose kept head stayed at the uniform prediction is retried with a higher learning rate
    (`RESCUE_LR_FACTORS`, at most `RESCUE_MAX_LR`); the check and any rescue are recorded in done.json.
    """
    if (record := run.done("cluster")) is not None:
        return record
    c = run.cfg.cluster
    neighbors = torch.from_numpy(np.load(require(run.path("mine", "neighbors.npy"), "mine")))
    start = time.time()
    prior = SIZE_PRIORS.get(c.size_prior)(neighbors.numpy(), run.num_clusters, run.cfg.seed, c.prior_shares)
    prior = None if prior is None else torch.from_numpy(prior)
    heldout = heldout_neighbors(run) if c.head_choice == "per_epoch" else None
    kept, scores = None, []
    for restart in range(c.restarts):
        trial = _train_with_rescue(run, neighbors, heldout, restart, prior)
        scores.append({"restart": restart, "loss": trial["score"], "status": trial["check"]["status"],
                       "consistency": trial["check"]["consistency"]})
        if kept is None or trial["score"] < kept["score"]:
            kept = trial
    model, best, check = kept["model"], kept["best"], kept["check"]
    model.keep_head(best)
    choice = None
    if c.candidates:
        choice = follow_best_candidate(run, model, kept["kept_probs"].argmax(1).numpy(), neighbors.numpy())
    atomic_torch_save(run.path("cluster", "model.pt"), model.state_dict())
    extra = {"seconds": time.time() - start, "head_losses": kept["losses"].tolist(), "best_head": best,
             "history": kept["history"], "head_choice": c.head_choice, "check": report("cluster", check)}
    if prior is not None:
        extra["size_prior"] = prior.tolist()
    if choice is not None:
        extra["candidates"] = choice
    if c.restarts > 1:
        extra["restarts"], extra["kept_restart"] = scores, kept["restart"]
        say(run.rt, f"cluster: restarts 0-{c.restarts - 1} ended at losses "
                    + ", ".join(f"{s['loss']:.4f}" for s in scores) + f"; kept restart {kept['restart']}")
    if kept["lowest"] is not None:
        lowest = kept["lowest"]
        extra["kept"] = {"epoch": lowest.epoch, "head": lowest.detail, "heldout_loss": lowest.score}
    _warn_collapse(run, kept["kept_probs"].argmax(1), "cluster")
    for pattern in ("retry*/checkpoint.pt", "restart*/checkpoint.pt", "fit/checkpoint.pt") if is_main() else ():
        for leftover in run.path("cluster").glob(pattern):
            leftover.unlink()
            if not any(leftover.parent.iterdir()):   # the folder held only the checkpoint
                leftover.parent.rmdir()
    return run.finish("cluster", **extra)


def _train_with_rescue(run: Run, neighbors: torch.Tensor, heldout: torch.Tensor | None, restart: int,
                       prior: torch.Tensor | None) -> dict:
    """One training of the heads (restart `restart`), retried at higher learning rates while the kept
    head stays uniform. Returns the model, its head losses, kept head, check, and the score that
    ranks restarts: the kept head's training loss (final) or its held-out loss (per_epoch)."""
    c = run.cfg.cluster
    lrs = sorted(lr for lr in {c.lr, *(min(c.lr * f, RESCUE_MAX_LR) for f in RESCUE_LR_FACTORS)} if lr >= c.lr)
    tried = []
    for attempt, lr in enumerate(lrs):
        model, history, lowest = _train_heads(run, neighbors, lr, attempt, heldout, restart, prior)
        if lowest is not None:   # per_epoch: back to the weights of the epoch whose head had the lowest loss
            model.load_state_dict(lowest.state)
        # (H, N, C) in float16: 10 heads x 260k ImageNet-200 images would take 2 GB in float32
        probs = head_probs(run, model, "train", dtype=torch.float16)
        losses, consistency, _ = scan_loss_over_pairs(probs, neighbors, c.entropy_weight, prior=prior)
        best = int(losses.argmin()) if lowest is None else lowest.detail
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
    score = float(losses[best]) if lowest is None else lowest.score
    # only the kept head's probabilities travel on: all heads' of two restarts would double the memory
    return {"model": model, "history": history, "lowest": lowest, "kept_probs": probs[best], "losses": losses,
            "best": best, "check": check, "score": score, "restart": restart}


def follow_best_candidate(run: Run, model, ours: np.ndarray, neighbors: np.ndarray) -> dict:
    """Let the kept head's partition `ours` (N,) of the training images compete with the recipes of
    cluster.candidates on the same features; the partition with the highest modularity on the kNN graph
    `neighbors` (N, K) wins (ties: ours). A recipe's win is fitted into the head (`fit_to_partition`).
    Returns the record: every candidate's modularity, the pick, recipes that could not run here, seconds,
    and after a fit the share of training images the head assigns as the recipe does."""
    c = run.cfg.cluster
    start = time.time()
    features = read_features(run, "train")
    recipes, skipped = compute_candidates(c.candidates, features, neighbors, run.num_clusters, run.cfg.seed)
    pick, scores = pick_partition({"ours": ours, **recipes}, neighbors)
    record = {"modularity": {name: round(score, 4) for name, score in scores.items()}, "pick": pick,
              "skipped": skipped, "seconds": time.time() - start}
    if pick != "ours":
        # the recipe's clusters renumbered to match the head's (Hungarian): the head learns what differs, not a
        # permutation of what it already predicts
        target = cluster_to_class(recipes[pick], ours, run.num_clusters, run.num_clusters)[recipes[pick]]
        losses = fit_to_partition(run, model, target)
        fitted = head_probs(run, model, "train")[0].argmax(1).numpy()
        record.update(fit_loss={"first_pass": losses[0], "last_pass": losses[-1], "passes": len(losses)},
                      fit_agreement=round(float((fitted == target).mean()), 4), seconds=time.time() - start)
    unavailable = f" ({', '.join(skipped)} could not run here: pip install 'scan-clustering[umap]')" if skipped else ""
    fitted = f"; the head learnt it ({record['fit_agreement']:.1%} agreement)" if pick != "ours" else ""
    say(run.rt, "cluster: modularity on the kNN graph: " + ", ".join(f"{n} {v:.4f}" for n, v in scores.items())
        + f"; kept {pick}{fitted}{unavailable}")
    return record


def fit_to_partition(run: Run, model, labels: np.ndarray) -> list[float]:
    """Train the kept head (and the backbone, if cluster.update_backbone) by cross-entropy to assign the
    training images as `labels` (N,) does: cluster.candidate_steps batches of their strong view (the
    unaugmented cached features on the frozen path without cached views), in passes over the data that the
    stages' epoch loop checkpoints under cluster/fit/ (progress and metrics.csv as "cluster-fit"). Returns the
    mean loss of every pass."""
    cfg, rt, c = run.cfg, run.rt, run.cfg.cluster
    seed_everything(cfg.seed + CANDIDATE_SEED_OFFSET)
    targets = torch.from_numpy(labels).to(rt.device)
    optimizer = build_optimizer(run.source.trainable(model, c.update_backbone), c.optimizer, c.lr, c.weight_decay,
                                c.momentum)
    logits_of = parallel(model, run.source.weak_strong_logits(model), cfg.sync_batchnorm)   # DDP under torchrun
    n = len(labels)
    batch_size = min(c.batch_size, n)
    per_pass = n // batch_size                # minibatches' count: full batches only
    passes = -(-c.candidate_steps // per_pass)

    def epoch_fn(epoch, tick):
        _train_mode(model, c.update_backbone)
        total, batches = 0.0, minibatches(n, batch_size)[:c.candidate_steps - epoch * per_pass]
        for idx in batches:
            strong_logits = logits_of(idx)[1]
            total += optimizer_step(optimizer, F.cross_entropy(strong_logits.float(), targets[idx.to(rt.device)]),
                                    "cluster", epoch)
            tick()
        return {"loss": total / len(batches)}

    history = run_epochs("cluster-fit", run.path("cluster", "fit"), passes, per_pass,
                         {"model": model, "opt": optimizer}, epoch_fn, run.fingerprint("cluster") + "-fit", rt)
    return [h["loss"] for h in history]


def _candidate_inputs(run: Run) -> tuple:
    """C, and whether umap-learn can compute the umap_kmeans candidate (installing it changes the result)."""
    wants_umap = "umap_kmeans" in run.cfg.cluster.candidates
    return (run.num_clusters,) + (("umap-learn", umap_available()) if wants_umap else ())


def _ignored_by_cluster(cfg) -> tuple[str, ...]:
    """Settings at the values that compute what runs made before they existed computed: one restart is the
    single training the stage always ran, the uniform size prior the plain entropy term it always used, no
    candidates the heads alone; earlier run directories stay valid."""
    c = cfg.cluster
    return ((("cluster.restarts",) if c.restarts == 1 else ())
            + (("cluster.size_prior",) if c.size_prior == "uniform" else ())
            + (("cluster.prior_shares",) if c.size_prior != "given" else ())
            + (("cluster.candidates", "cluster.candidate_steps") if not c.candidates else ()))


def heldout_neighbors(run: Run) -> torch.Tensor:
    """(N_eval, K) nearest neighbours of the eval images among themselves, in the mining space
    (mine.features), K = cluster.heldout_neighbors: the held-out pairs per-epoch head choice scores."""
    inputs = mining_inputs(run, "eval")
    k = min(run.cfg.cluster.heldout_neighbors, len(inputs.features) - 1)
    return torch.from_numpy(mine_neighbors(mining_space(inputs), k))


def _train_heads(run: Run, neighbors: torch.Tensor, lr: float, attempt: int, heldout: torch.Tensor | None,
                 restart: int, prior: torch.Tensor | None):
    """One training of the clustering heads (and backbone, if updated) at learning rate `lr`; with held-out
    neighbours (cluster.head_choice=per_epoch) also the BestWeights over epochs and heads, else None."""
    cfg, rt, c = run.cfg, run.rt, run.cfg.cluster
    seed_everything(cfg.seed + 1 + attempt + RESTART_SEED_STEP * restart)
    source = run.source
    model = run.clustering_model(c.num_heads)
    source.start_from_pretext(model)
    model = rt.prepare(model)
    optimizer = build_optimizer(source.trainable(model, c.update_backbone), c.optimizer, lr, c.weight_decay,
                                c.momentum)
    if not c.update_backbone:
        model.backbone.requires_grad_(False)   # frozen: under torchrun DDP then syncs the heads only
    logits_of = parallel(model, source.pair_logits(model), cfg.sync_batchnorm)   # DDP under torchrun
    n, k = neighbors.shape
    batch_size = min(c.batch_size, n)
    device_prior = None if prior is None else prior.to(rt.device)
    steps = len(minibatches(n, batch_size))

    def epoch_fn(epoch, tick):
        _train_mode(model, c.update_backbone)
        sums = np.zeros(3)
        for idx in minibatches(n, batch_size):
            nb = neighbors[idx, torch.randint(k, (len(idx),))]
            logits = logits_of(idx, nb)
            total, consistency, h = scan_loss(logits[:, :len(idx)], logits[:, len(idx):], c.entropy_weight, device_prior)
            loss = total.sum()
            optimizer_step(optimizer, loss, "cluster", epoch)
            sums += [total.mean().item(), consistency.mean().item(), h.mean().item()]
            tick()
        sums /= steps
        return {"loss": sums[0], "consistency": sums[1], "entropy": sums[2]}

    # a retry or restart keeps its own checkpoint, so a kill during it resumes that training; a finished
    # restart's checkpoint is reloaded without training while later ones run
    name = (f"restart{restart}" if restart else "") + (f"retry{attempt}" if attempt else "")
    where = run.path("cluster", name) if name else run.path("cluster")
    fingerprint = (run.fingerprint("cluster") + (f"-restart{restart}" if restart else "")
                   + (f"-lr{lr:g}" if attempt else ""))
    states = {"model": model, "opt": optimizer}
    after_epoch = None
    if heldout is not None:
        states["lowest"] = lowest = BestWeights()   # the (epoch, head) with the lowest held-out SCAN loss

        def after_epoch(epoch, stats):
            probs = head_probs(run, model, "eval", dtype=torch.float16)
            losses = scan_loss_over_pairs(probs, heldout, c.entropy_weight, prior=prior)[0]
            stats["heldout_losses"] = losses.tolist()
            lowest.offer(model, float(losses.min()), epoch + 1, detail=int(losses.argmin()))
            return False
    history = run_epochs("cluster", where, c.epochs, steps, states, epoch_fn, fingerprint, rt, after_epoch)
    if heldout is None or lowest.state is None:   # no epoch ran (cluster.epochs=0): the final choice
        return model, history, None
    return model, history, lowest


def _train_mode(model, update_backbone: bool) -> None:
    """Training mode for the heads; a frozen backbone stays in eval mode (its batch-norm statistics must not drift)."""
    model.train()
    if not update_backbone:
        model.backbone.eval()


def _warn_collapse(run: Run, pred: torch.Tensor, stage: str) -> None:
    share = torch.bincount(pred, minlength=run.num_clusters).max().item() / len(pred)
    if share > 0.9:
        log.warning("%s: one cluster holds %.0f%% of the images (collapse); raise cluster.entropy_weight "
                    "(now %s) and rerun", stage, 100 * share, run.cfg.cluster.entropy_weight)


register_stage(Stage("cluster", stage_cluster, needs=("mine",), sections=("seed", "cluster", "augment"),
                     inputs=_candidate_inputs, writes_model=True, ignores=_ignored_by_cluster,
                     description="SCAN heads: neighbours agree, entropy keeps every cluster"))
