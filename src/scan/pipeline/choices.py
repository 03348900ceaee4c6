"""Loading a configuration for work: read and range-checked (scan.config), then every name chosen
from a registry (backbones, pretext methods, miners, data sets, ...) checked against the registry
that holds it, with a did-you-mean, before any data is loaded.

The registries live in the layers below this one, so this is the lowest place that sees them all.
"""
from __future__ import annotations

from scan.algo.candidates import CANDIDATES
from scan.algo.num_clusters import SIZE_PRIORS
from scan.algo.propagation import RANK_COLUMNS, WEAK_LABELS
from scan.config import Config, read_config
from scan.core.errors import ConfigError
from scan.data import DATASETS
from scan.nets.augment import STRENGTHS
from scan.nets.augment_views import PRETEXT_VIEWS
from scan.nets.models import BACKBONES
from scan.nets.pretrained import LITE_MODELS
from scan.pipeline.stages.selflabel import SELECTIONS
from scan.pretext import METHODS
from scan.train.mining import MINERS, MINING_HEADS, MINING_SPACES
from scan.train.sources import source_class


def check_choices(cfg: Config) -> None:
    """Names chosen from registries exist (a ConfigError with a did-you-mean, naming the setting)."""
    frozen = source_class(cfg).frozen   # pretext.method names a feature source (pretrained), not a method
    if not frozen:
        METHODS.check(cfg.pretext.method)
    if not frozen or cfg.model.backbone not in LITE_MODELS:
        BACKBONES.check(cfg.model.backbone)
    if cfg.data.dataset.lower() != "auto":
        DATASETS.check(cfg.data.dataset.lower())
    MINERS.check(cfg.mine.method)
    MINING_SPACES.check(cfg.mine.features)
    SELECTIONS.check(cfg.selflabel.selection)
    WEAK_LABELS.check(cfg.refine.weak_labels)
    RANK_COLUMNS.check(cfg.refine.rank_by)
    PRETEXT_VIEWS.check(cfg.pretext.views)
    MINING_HEADS.check(cfg.mine.head)
    STRENGTHS.check(cfg.augment.strong_strength)
    SIZE_PRIORS.check(cfg.cluster.size_prior)
    for name in cfg.cluster.candidates:
        CANDIDATES.check(name)
    _check_self_pairs(cfg, frozen)


def _check_self_pairs(cfg: Config, frozen: bool) -> None:
    """mine.num_neighbors=0 pairs an image with itself: only two different augmented views make that a lesson."""
    if cfg.mine.num_neighbors:
        return
    if cfg.mine.method != "knn":
        raise ConfigError(f"mine.num_neighbors=0 (self-pairs) works with mine.method=knn, not {cfg.mine.method}")
    if frozen and not cfg.pretext.cached_views:
        raise ConfigError("mine.num_neighbors=0 pairs each image with an augmented view of itself, but cached "
                          "features have no augmented views: set pretext.cached_views (e.g. 4) or a neighbour count")
    if not frozen and cfg.cluster.augment == "none":
        raise ConfigError("mine.num_neighbors=0 pairs each image with an augmented view of itself, but "
                          "cluster.augment=none shows it twice unchanged: choose strong, simclr or weak")


def load_config(source: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A YAML file or built-in config name with dotted overrides, as a checked Config (scan.config.read_config
    plus `check_choices`)."""
    cfg = read_config(source, overrides)
    check_choices(cfg)
    return cfg
