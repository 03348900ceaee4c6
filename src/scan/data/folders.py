"""Loaders of image folders and ImageNet-style trees (decoded lazily, batch by batch); registered in
`scan.data.DATASETS`.

A folder's images are held as data.cache_images says (FOLDER_STORAGE): decoded into one tensor
when they fit in data.max_memory_mb, else decoded once into a file read batch by batch
(scan.data.lazy_images), or decoded on every use with a bounded cache. Every way gives the same
images, in the same order, with the same content hash.
"""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scan.core.registry import Registry
from scan.data.datasets import (
    DataError,
    FolderOptions,
    ImageDataset,
    LoadRequest,
    existing_path,
    register_dataset,
    split_parts,
)
from scan.data.imagefiles import (
    HEIF_EXTENSIONS,
    IMAGE_EXTENSIONS,
    decode_images,
    heif_available,
    list_files,
    pixel_limit_hint,
    probe_images,
    progress,
)
from scan.data.lazy_images import DECODE_CHUNK, LazyImages, decode_once, default_cache_dir, image_bytes

log = logging.getLogger("scan.data")

DEFAULT_IMAGE_SIZE = 64          # side of folder images when no image_size is given
_SKIPPED_SHOWN = 5               # skipped file names listed in the folder warning


# ----------------------------------------------------------------------------- image folders

def _folder_labels(root: Path, files: list[Path], enabled: bool) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from first-level subfolders when enabled, every image is in one, and there are >= 2."""
    tops = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    classes = sorted({t for t in tops if t is not None})
    if not enabled or len(classes) < 2 or None in tops:
        if enabled:   # asked for labels and gets none: say so, the evaluation will have no ground truth
            loose = sum(t is None for t in tops)
            log.warning("%s: --labels-from-folders found %d class subfolder(s) and %d image(s) outside them; labels "
                        "need >= 2 subfolders holding every image, so this run has none", root, len(classes), loose)
        return None, None
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[t] for t in tops], dtype=np.int64), classes


def _warn_skipped(root: Path, skipped: list[Path], total: int) -> None:
    """One warning for all unreadable files, naming the first few (and the plugin HEIC photos need)."""
    shown = ", ".join(str(p.relative_to(root)) for p in skipped[:_SKIPPED_SHOWN])
    more = ", ..." if len(skipped) > _SKIPPED_SHOWN else ""
    heif = any(p.suffix.lower() in HEIF_EXTENSIONS for p in skipped) and not heif_available()
    hint = "; HEIC photos need the pillow-heif plugin: pip install 'scan-clustering[heif]'" if heif else ""
    hint += pixel_limit_hint(skipped)
    log.warning("%s: skipped %d of %d files that are not readable images: %s%s%s",
                root, len(skipped), total, shown, more, hint)


def budget_images(size: int, options: FolderOptions) -> int:
    """How many decoded size x size images fit in data.max_memory_mb (at least one)."""
    return max(1, options.max_memory_mb * 2**20 // image_bytes(size))


# storage(candidate files, side, options) -> (readable files, their images as a tensor or LazyImages)
Storage = Callable[[list[Path], int, FolderOptions], tuple[list[Path], "torch.Tensor | LazyImages"]]
FOLDER_STORAGE: Registry[Storage] = Registry("data.cache_images")


@FOLDER_STORAGE.register("memory")
def _in_memory(files: list[Path], size: int, options: FolderOptions):
    """Every image decoded into one (N, 3, S, S) tensor."""
    try:
        with progress(len(files), "decoding images", options.quiet) as bar:
            decoded = decode_images(files, size, options.workers, bar)
        kept = [(f, img) for f, img in zip(files, decoded) if img is not None]
        images = torch.from_numpy(np.stack([img for _, img in kept]).transpose(0, 3, 1, 2).copy()) if kept else None
    except MemoryError:
        raise DataError(f"out of memory while decoding {len(files)} images at {size}x{size}; lower "
                        f"data.image_size or set data.cache_images=disk") from None
    return [f for f, _ in kept], images


@FOLDER_STORAGE.register("disk")
def _decoded_once(files: list[Path], size: int, options: FolderOptions):
    """Decoded once into a file in data.cache_dir, read batch by batch, reused by every stage and run."""
    chunk = min(DECODE_CHUNK, budget_images(size, options))
    cache_dir = Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir()
    store, readable, digest = decode_once(files, size, cache_dir, options.workers, chunk, options.quiet)
    kept = [f for f, ok in zip(files, readable) if ok]
    images = LazyImages(kept, size, options.workers, store=store, rows=np.flatnonzero(readable), digest=digest)
    images.peak_decoded = min(chunk, len(files))
    return kept, images


@FOLDER_STORAGE.register("none")
def _on_demand(files: list[Path], size: int, options: FolderOptions):
    """Decoded on every use, at most data.max_memory_mb of decoded images kept; only headers are read now."""
    with progress(len(files), "checking images", options.quiet) as bar:
        readable = probe_images(files, options.workers, bar)
    kept = [f for f, ok in zip(files, readable) if ok]
    return kept, LazyImages(kept, size, options.workers, max_cached=budget_images(size, options))


def folder_storage(count: int, size: int, options: FolderOptions) -> str:
    """data.cache_images, with auto resolved: in memory when `count` decoded images fit the budget, else disk."""
    if options.cache_images != "auto":
        return options.cache_images
    return "memory" if count * image_bytes(size) <= options.max_memory_mb * 2**20 else "disk"


@register_dataset("folder")
def load_folder(request: LoadRequest) -> ImageDataset:
    """Images under a folder (recursively), as RGB image_size x image_size crops.

    Labels come from first-level subfolder names (root/<class>/...). There is no split: every
    split returns all images. Non-image and unreadable files are skipped with one warning.
    """
    root = existing_path(request, "image folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder of images or a .npz file)")
    split_parts("image folder", request.split)  # only to reject misspelt split names
    size = request.image_size or DEFAULT_IMAGE_SIZE
    files = list_files(root)
    if not files:
        raise DataError(f"{root}: folder is empty (expected {'/'.join(sorted(IMAGE_EXTENSIONS))} files)")
    candidates = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    storage = folder_storage(len(candidates), size, request.folder)
    log.info("%s: %d images at %dx%d, held as data.cache_images=%s", root, len(candidates), size, size, storage)
    kept, images = FOLDER_STORAGE.get(storage)(candidates, size, request.folder)
    if not kept:
        raise DataError(f"{root}: none of the {len(files)} files is a readable image "
                        f"({'/'.join(sorted(IMAGE_EXTENSIONS))})")
    kept_files = set(kept)
    skipped = [f for f in files if f not in kept_files]
    if skipped:
        _warn_skipped(root, skipped, len(files))
    labels, classes = _folder_labels(root, kept, request.labels_from_folders)
    return ImageDataset(images, labels, classes, paths=[str(f) for f in kept])


# ----------------------------------------------------------------------------- ImageNet (lazy)

IMAGENET_SIDE = 224      # the resolution of the SCAN ImageNet experiments
_IMAGENET_FOLDERS = {"train": "train", "test": "val"}   # the public labelled held-out part is val/


def imagenet_subsets() -> list[str]:
    """Names of the shipped class lists (class_lists/imagenet*.txt): SCAN's imagenet50, imagenet100 and
    imagenet200, and the imagenet10 and imagenet-dogs15 of the many-class variant's tables."""
    return sorted(p.name[:-4] for p in resources.files("scan.data").joinpath("class_lists").iterdir()
                  if p.name.startswith("imagenet") and p.name.endswith(".txt"))


def read_class_list(subset: str) -> list[tuple[str, str]]:
    """(WordNet ID, display name) per class of a shipped subset, in file order (= label order)."""
    text = resources.files("scan.data").joinpath("class_lists", f"{subset}.txt").read_text()
    return [tuple(line.split(" ", 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _imagenet_dataset(request: LoadRequest, classes: list[tuple[str, str]] | None) -> ImageDataset:
    """ImageNet-style folders root/{train,val}/<wnid>/*.JPEG, restricted to `classes` (None: every folder)."""
    root = existing_path(request, "ImageNet", hint=" (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    parts = split_parts("ImageNet", request.split)
    if classes is None:
        train = root / "train"
        if not train.is_dir():
            raise DataError(f"{root}: no train/ folder (expected ImageNet-style train/<wnid>/*.JPEG)")
        classes = [(d.name, d.name) for d in sorted(train.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    files, labels = [], []
    for part in parts:
        for label, (wnid, _) in enumerate(classes):
            folder = root / _IMAGENET_FOLDERS[part] / wnid
            if not folder.is_dir():
                raise DataError(f"{folder}: class folder is missing (layout {_IMAGENET_FOLDERS[part]}/<wnid>/*.JPEG)")
            found = [f for f in list_files(folder) if f.suffix.lower() in IMAGE_EXTENSIONS]
            files += found
            labels += [label] * len(found)
    if not files:
        raise DataError(f"{root}: no images in the {len(classes)} class folders of split '{request.split}'")
    # decoded on every use without a cache: random epochs over 1.3M files would rarely hit one
    images = LazyImages(files, request.image_size or IMAGENET_SIDE, request.folder.workers)
    return ImageDataset(images, np.array(labels),
                        [name for _, name in classes], paths=[str(f) for f in files])


@register_dataset("imagenet")
def load_imagenet(request: LoadRequest) -> ImageDataset:
    """Every class folder of an ImageNet-style tree, decoded lazily at 224 px (train, val = val/)."""
    return _imagenet_dataset(request, None)


def _register_imagenet_subsets() -> None:
    for subset in imagenet_subsets():
        def load(request: LoadRequest, subset=subset) -> ImageDataset:
            return _imagenet_dataset(request, read_class_list(subset))
        load.__doc__ = f"The {subset} classes (class_lists/{subset}.txt) of an ImageNet-style tree, decoded lazily."
        register_dataset(subset)(load)


_register_imagenet_subsets()


