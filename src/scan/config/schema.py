"""Typed run configuration: frozen dataclasses loaded from YAML plus dotted overrides.

A misspelt key is an error at load time (with a did-you-mean hint) and every numeric field
with a meaningful range is checked before any work starts, so a typo never turns into a
silently ignored setting hours into a GPU run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

AUTO = "auto"   # data.num_clusters: chosen without labels (the choose stage)


def _range(lo=None, hi=None, lo_open=False, hi_open=False, choices=None, min_len=None, words=None):
    """Field metadata describing the allowed values (checked by `validate`); for a tuple field,
    the bounds apply to every element and min_len to its length; `words`: strings a numeric field
    also takes (e.g. "auto")."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "min_len": min_len,
            "words": words}


def _f(default, **rng):
    return field(default=default, metadata=_range(**rng))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"          # registry name, or "auto" to guess from `path`
    path: str | None = None          # folder / file; None uses the data set's default location
    train_split: str = "train"
    # the pretext stage trains on this split instead (e.g. STL-10's train+unlabeled, as the paper);
    # None: on train_split. Mining, clustering and self-labelling always use train_split
    pretext_split: str | None = None
    eval_split: str = "val"
    # folder images are resized to this; None = native. Upper bounds here and below refuse a typo that would
    # run for hours or exhaust memory before any work starts (3000 px images, a million blocks)
    image_size: int | None = _f(None, lo=4, hi=2048)
    labels_from_folders: bool = False
    # None: the number of ground-truth classes, or "auto" for data without labels; "auto": chosen without
    # labels by the choose stage (scan.algo.num_clusters), in the range of the `choose` section
    num_clusters: int | str | None = _f(None, lo=2, words=(AUTO,))
    # how image folders are held (scan.data.folders.FOLDER_STORAGE): memory = one decoded tensor;
    # disk = decoded once into a uint8 file in cache_dir, read by every stage; none = decoded
    # on every use, at most max_memory_mb of decoded images kept; auto = memory if it fits, else disk
    cache_images: str = _f("auto", choices=("auto", "memory", "disk", "none"))
    max_memory_mb: int = _f(2048, lo=1)     # decoded images held in memory at most (auto, none)
    cache_dir: str | None = None            # folder of the decode-once files; None: ~/.cache/scan ($XDG_CACHE_HOME)
    decode_workers: int = _f(0, lo=0)       # threads decoding images; 0: about one per core


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _f("resnet_small")
    width: int = _f(32, lo=4, hi=1024)               # channels of the first stage (resnet_small only)
    blocks: tuple[int, ...] = _f((1, 1, 1), lo=1, hi=64, min_len=1)   # residual blocks per stage (resnet_small only)
    stem_stride: int = _f(1, lo=1, hi=4)    # resnet_small only
    projection_dim: int = _f(128, lo=2, hi=65536)
    # local backbone weights to start from (our backbone.pt or a torchvision-style ResNet, e.g. MoCo's);
    # wrappers like `module.`, `encoder_q.`, `backbone.` are stripped (models.load_backbone_weights)
    init_checkpoint: str | None = None


@dataclass(frozen=True)
class AugmentConfig:
    crop_min_scale: float = _f(0.2, lo=0.01, hi=1.0)
    flip: bool = True
    color_jitter: float = _f(0.4, lo=0.0, hi=1.0)   # brightness/contrast/saturation strength
    jitter_prob: float = _f(0.8, lo=0.0, hi=1.0)
    grayscale_prob: float = _f(0.2, lo=0.0, hi=1.0)
    strong_num_ops: int = _f(4, lo=0, hi=14)
    cutout_fraction: float = _f(0.5, lo=0.0, hi=1.0)   # cutout side / image side (16/32 in the paper)
    weak_translate: float = _f(0.125, lo=0.0, hi=0.5)  # max shift as a fraction of the side
    # scan.nets.augment.STRENGTHS: scan-cpu (ours: shear/translate ±0.3, enhance 0.05-1.95, shift first, fixed
    # black cutout) | paper (the SCAN authors': ±0.1, 0.05-0.95, no shift, cutout of a random side, mean fill)
    strong_strength: str = "scan-cpu"


@dataclass(frozen=True)
class TrainingConfig:
    """What every training stage sets: schedule length, batch and optimizer (scan.train.engine.build_optimizer).
    A stage's section overrides the defaults that differ for it."""
    epochs: int = _f(100, lo=0)
    batch_size: int = _f(128, lo=2)
    optimizer: str = _f("adam", choices=("sgd", "adam", "adamw"))
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = _f(1e-4, lo=0.0)
    momentum: float = _f(0.9, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PretextConfig(TrainingConfig):
    method: str = "simclr"        # a registered pretext method: simclr | moco | byol_queue | rotnet (scan.pretext)
    #                               or pretrained: a frozen network (model.backbone), heads on cached features
    epochs: int = _f(500, lo=0)
    batch_size: int = _f(512, lo=2)
    optimizer: str = _f("sgd", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.4, lo=0.0, lo_open=True)
    temperature: float | None = _f(None, lo=0.0, lo_open=True)   # None: the method's (SimCLR 0.1, MoCo/BYOL 0.2)
    warmup_epochs: int = _f(0, lo=0)
    queue_size: int = _f(65536, lo=1)        # MoCo/BYOL-queue negatives, capped at the data-set size
    ema_momentum: float | None = _f(None, lo=0.0, hi=1.0)   # None: MoCo 0.999 (fixed), BYOL m_base 0.996 (→ 1)
    cached_views: int = _f(0, lo=0, hi=100)          # pretrained only: also cache features of V augmented views per image
    # byol_queue's two views, also embedded by the multiview miner (scan.nets.augment_views.PRETEXT_VIEWS):
    # simclr = the SimCLR crop/flip/jitter/grey for both; randaugment = the many-class paper's RandAugment ops
    # alone, Cutout on view b
    views: str = "simclr"
    # the pretext's own seed; None: the run's `seed`. Set it to keep one trained pretext while the
    # later stages run under several seeds (how the SCAN paper reports the spread of its clustering step)
    seed: int | None = _f(None, lo=0, hi=2**32 - 1)


@dataclass(frozen=True)
class MineConfig:
    method: str = "knn"           # the miner registry (scan.train.mining.MINERS): knn | multiview
    # 0: each image is paired with an augmented view of itself (the SCAN paper's K = 0 ablation)
    num_neighbors: int = _f(20, lo=0)
    # the space neighbours are searched in (scan.train.mining.MINING_SPACES): the pretext backbone's features,
    # PCA-whitened raw pixels, or both with equal weight (what the automatic defaults use: it never
    # falls far below the better of the two, and a weak pretext cannot make neighbours worse than pixels)
    # projection: the L2-normalised output of the contrastive projection head (the authors' choice for SimCLR)
    features: str = "backbone"    # scan.train.mining.MINING_SPACES: backbone | projection | pixels | backbone+pixels
    # multiview only: a clustering head trained briefly on plain kNN pairs (frozen backbone) ranks candidates
    head_epochs: int = _f(100, lo=1)
    head_lr: float = _f(1e-2, lo=0.0, lo_open=True)
    head_entropy_weight: float = _f(5.0, lo=0.0)
    # its form (scan.train.mining.MINING_HEADS): linear, or the many-class paper's MLP whose first layer starts
    # as the pretext projection's first layer (pretext/projection.pt)
    head: str = "linear"


@dataclass(frozen=True)
class ChooseConfig:
    """The range data.num_clusters=auto chooses from (scan.algo.num_clusters.default_range)."""
    min_clusters: int = _f(2, lo=2)
    max_clusters: int | None = _f(None, lo=2)   # None: min(50, images / 20)


@dataclass(frozen=True)
class ClusterConfig(TrainingConfig):
    entropy_weight: float = _f(5.0, lo=0.0)
    # the cluster sizes the entropy term pulls towards (scan.algo.num_clusters.SIZE_PRIORS): uniform = SCAN's
    # entropy; graph = the KL-to-a-prior form with the shares of the kNN graph's spectral partition (long tails);
    # given = the same with cluster.prior_shares, cluster sizes known in advance
    size_prior: str = "uniform"
    prior_shares: tuple[float, ...] = _f((), lo=0.0, lo_open=True)   # size_prior=given: one share per cluster
    num_heads: int = _f(10, lo=1, hi=1000)
    update_backbone: bool = True
    augment: str = _f("strong", choices=("strong", "simclr", "weak", "none"))
    head_hidden: int = _f(0, lo=0, hi=65536)           # 0: linear heads; else MLP heads with this many hidden units
    # which head is kept: final = the lowest SCAN loss on the training neighbours after the last epoch;
    # per_epoch = the authors': every epoch, the total SCAN loss of every head on held-out neighbours
    # (the eval split's own nearest neighbours), keeping the weights of the lowest (epoch, head)
    head_choice: str = _f("final", choices=("final", "per_epoch"))
    heldout_neighbors: int = _f(5, lo=1)     # per_epoch: neighbours per held-out image (the authors' 5)
    # independent trainings from different seeds; the one whose kept head has the lowest loss is kept.
    # Heads sharing an updated backbone end in one partition, so only a restart can leave a poor one
    restarts: int = _f(1, lo=1, hi=100)
    # partitions of the same features that compete with the heads' (scan.algo.candidates: kmeans, umap_kmeans, graph):
    # the one with the highest modularity on the mined kNN graph wins, and a recipe's win is learnt by the kept
    # head with cross-entropy (cluster.candidate_steps batches), so that self-labelling, predict and export follow it
    candidates: tuple[str, ...] = ()
    candidate_steps: int = _f(300, lo=1)


@dataclass(frozen=True)
class SelfLabelConfig(TrainingConfig):
    enabled: bool = True
    epochs: int = _f(200, lo=0)
    batch_size: int = _f(1000, lo=2)
    threshold: float = _f(0.99, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    # which images it trains on (scan.pipeline.stages.selflabel.SELECTIONS): threshold = the paper's, every batch's
    # weak-view predictions above `threshold`; per_cluster = each cluster's ⌈per_cluster_fraction · N / C⌉
    # most confident training images, chosen again at the start of every epoch
    selection: str = "threshold"
    per_cluster_fraction: float = _f(0.5, lo=0.0, hi=1.0, lo_open=True)
    class_balance: bool = True
    ema_decay: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)   # 0 disables the EMA (0.999 in the paper)
    # separate: a separate averaged copy is evaluated and kept; write_back: the average is copied into the
    # trained weights after every step (the authors' form on ImageNet), so training continues from it
    ema_mode: str = _f("separate", choices=("separate", "write_back"))
    patience: int = _f(0, lo=0)     # stop after this many epochs without more confident samples; 0 = never
    # an epoch that shrinks any cluster below this fraction of its cluster-stage size is merging
    # clusters (confident errors feed on themselves): stop and keep the last epoch that did not; 0 = off
    min_cluster_keep: float = _f(0.5, lo=0.0, hi=1.0)
    # which epoch's weights are the result: most_confident = the epoch with the most confident training images
    # (ours); last = the last epoch trained (the authors' code; the paper configs)
    keep: str = _f("most_confident", choices=("most_confident", "last"))


@dataclass(frozen=True)
class RefineConfig(TrainingConfig):
    """SPC refinement (hierarchical pseudo-labels, label propagation, mixup); the STL-10 setting."""
    method: str = _f("none", choices=("none", "spc"))
    threshold: float = _f(0.95, lo=0.0, hi=1.0, lo_open=True, hi_open=True)   # δ: confidence of the strong set S′
    top_fraction: float = _f(0.03, lo=0.0, hi=1.0, lo_open=True)   # r: per-class share of the data kept in S
    num_neighbors: int = _f(20, lo=1)           # k₂ of the propagation graph
    mu: float = _f(0.01, lo=0.0, lo_open=True)  # propagation weight γ = 1 / (1 + μ)
    cg_iterations: int = _f(20, lo=1)           # conjugate-gradient iterations per propagation
    alpha: float = _f(1.0, lo=0.0, lo_open=True)     # mixup λ ~ Beta(α, α)
    mix_weight: float = _f(1.0, lo=0.0)         # λ_M of the mixup loss term
    rounds: int = _f(1, lo=1)                   # pseudo-labels are rebuilt every ⌈epochs / rounds⌉ epochs
    # the paper leaves these open (scan.algo.propagation): W's targets soft P or onehot(argmax P); the column
    # a sample is ranked in by the top-r filter, argmax P (propagated) or argmax Q (predicted)
    weak_labels: str = "soft"
    rank_by: str = "propagated"
    # paper: the SPC authors' code where it differs from ours: graph max(A, Aᵀ) (ours A + Aᵀ), propagated rows
    # L2-normalised before the top-r ranking (ours: summing to one), S fixed after the first round (ours: rebuilt)
    form: str = _f("ours", choices=("ours", "paper"))
    epochs: int = _f(50, lo=0)
    batch_size: int = _f(256, lo=2)             # for S and for W
    optimizer: str = _f("sgd", choices=("sgd", "adam", "adamw"))
    lr: float = _f(0.03, lo=0.0, lo_open=True)
    weight_decay: float = _f(5e-4, lo=0.0)
    nesterov: bool = True


@dataclass(frozen=True)
class Config:
    seed: int = _f(0, lo=0, hi=2**32 - 1)   # the range numpy and scikit-learn generators accept
    device: str = "auto"
    quiet: bool = False
    compile: bool = False   # torch.compile the backbones (worth it on CUDA for long runs; minutes of compiling first)
    # per-epoch training logs besides RUN_DIR/metrics.csv (scan.train.logs): tensorboard also writes event
    # files to RUN_DIR/tensorboard (the optional extra `scan-clustering[tensorboard]`)
    log: str = _f("none", choices=("none", "tensorboard"))
    # under torchrun: batch norm over the global batch (SyncBatchNorm), so statistics mean the same at any scale
    sync_batchnorm: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    choose: ChooseConfig = field(default_factory=ChooseConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def pretext_seed(self) -> int:
        """The seed the pretext stage trains (or embeds augmented views) with."""
        return self.seed if self.pretext.seed is None else self.pretext.seed

