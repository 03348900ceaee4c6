"""A data set as a run uses it: its training and evaluation splits loaded from the configuration,
and the summary every run records in data.json (sizes, classes, number of clusters, the
normalisation, a content hash of the pixels)."""
from __future__ import annotations

import torch

from scan.config import AUTO, Config
from scan.core.errors import ConfigError
from scan.data.datasets import FolderOptions, ImageDataset, content_hash, has_splits, load_dataset


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


def check_enough_images(cfg: Config, count: int) -> None:
    """Clustering needs two images at the very least (and C for C clusters): say so in those words, before a
    setting derived from the count (a batch size of 1, a range of one cluster) is refused under its own name."""
    if count < 2:
        where = cfg.data.path or cfg.data.dataset
        raise ConfigError(f"{where} holds {count} image(s): too few to cluster; give at least 2 (and at least as "
                          f"many as the number of clusters)")


def describe_data(cfg: Config, train: ImageDataset, evaluation: ImageDataset) -> dict:
    """Summary written to data.json; also decides the number of clusters and the normalisation."""
    x = train.images
    if evaluation.images.shape[1:] != x.shape[1:]:
        raise ConfigError(f"data.eval_split '{cfg.data.eval_split}' has images of shape "
                          f"{tuple(evaluation.images.shape[1:])}, the train split {tuple(x.shape[1:])}")
    check_enough_images(cfg, len(train))
    num_classes = train.num_classes
    # without labels and without a number the choose stage finds one (data.num_clusters=auto)
    num_clusters = cfg.data.num_clusters or num_classes or AUTO
    if num_clusters != AUTO and num_clusters > len(train):
        raise ConfigError(f"data.num_clusters={num_clusters} is larger than the number of images ({len(train)})")
    mean, std = channel_stats(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:10000])
    digest = content_hash(x)
    return {
        "dataset": cfg.data.dataset, "path": cfg.data.path, "num_train": len(train), "num_eval": len(evaluation),
        "image_shape": list(x.shape[1:]), "num_classes": num_classes, "num_clusters": num_clusters,
        "class_names": train.class_names, "has_labels": train.labels is not None,
        "eval_has_labels": evaluation.labels is not None,
        "mean": mean.tolist(), "std": std.clamp_min(1e-3).tolist(),
        "data_hash": digest,
    }
