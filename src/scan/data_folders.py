"""Loaders of image folders (decoded at once) and ImageNet-style trees (decoded lazily, batch by
batch); registered in `scan.data.DATASETS`."""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from scan.data import DataError, ImageDataset, LoadRequest, existing_path, register_dataset, split_parts
from scan.hashing import stable_hash
from scan.imagefiles import IMAGE_EXTENSIONS, decode_images, list_files

log = logging.getLogger("scan.data")

DEFAULT_IMAGE_SIZE = 64          # side of folder images when no image_size is given
_SKIPPED_SHOWN = 5               # skipped file names listed in the folder warning


# ----------------------------------------------------------------------------- image folders

def _folder_labels(root: Path, files: list[Path], enabled: bool) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from first-level subfolders when enabled, every image is in one, and there are >= 2."""
    tops = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    classes = sorted({t for t in tops if t is not None})
    if not enabled or len(classes) < 2 or None in tops:
        if enabled:
            log.info("%s: no labels (need >= 2 class subfolders and no loose images; found %d)", root, len(classes))
        return None, None
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[t] for t in tops], dtype=np.int64), classes


def _warn_skipped(root: Path, skipped: list[Path], total: int) -> None:
    """One warning for all unreadable files, naming the first few."""
    shown = ", ".join(str(p.relative_to(root)) for p in skipped[:_SKIPPED_SHOWN])
    more = ", ..." if len(skipped) > _SKIPPED_SHOWN else ""
    log.warning("%s: skipped %d of %d files that are not readable images: %s%s",
                root, len(skipped), total, shown, more)


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
    try:
        decoded = decode_images(candidates, size)
    except MemoryError:
        raise DataError(f"{root}: out of memory while decoding {len(candidates)} images at {size}x{size}; "
                        f"lower data.image_size or use fewer images") from None
    kept = [(f, img) for f, img in zip(candidates, decoded) if img is not None]
    if not kept:
        raise DataError(f"{root}: none of the {len(files)} files is a readable image "
                        f"({'/'.join(sorted(IMAGE_EXTENSIONS))})")
    kept_files = {f for f, _ in kept}
    skipped = [f for f in files if f not in kept_files]
    if skipped:
        _warn_skipped(root, skipped, len(files))
    labels, classes = _folder_labels(root, [f for f, _ in kept], request.labels_from_folders)
    images = torch.from_numpy(np.stack([img for _, img in kept]).transpose(0, 3, 1, 2).copy())
    return ImageDataset(images, labels, classes, paths=[str(f) for f, _ in kept])


# ----------------------------------------------------------------------------- ImageNet (lazy)

IMAGENET_SIDE = 224      # the resolution of the SCAN ImageNet experiments
_IMAGENET_FOLDERS = {"train": "train", "test": "val"}   # the public labelled held-out part is val/


class LazyImages:
    """Images (N, 3, S, S) uint8 decoded from their files only when indexed.

    Stands in for the image tensor of an `ImageDataset` too large to keep in memory (ImageNet):
    it has the tensor's len/shape/dtype/ndim, and indexing with an int, slice, index array or
    tensor decodes those files with a thread pool into a real uint8 tensor. `.to()` and
    `.contiguous()` return the object itself: each decoded batch moves to the device instead.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: list[Path], size: int):
        self.files = list(files)
        self.size = size
        self.shape = torch.Size((len(self.files), 3, size, size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.arange(len(self))[index]
        files = [self.files[i] for i in np.atleast_1d(rows)]
        decoded = decode_images(files, self.size)
        for file, img in zip(files, decoded):
            if img is None:
                log.warning("%s: unreadable image, used as a black image", file)
        batch = np.stack([np.zeros((self.size, self.size, 3), np.uint8) if img is None else img for img in decoded])
        batch = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())
        return batch[0] if np.ndim(rows) == 0 else batch

    def to(self, *args, **kwargs) -> LazyImages:
        return self

    def contiguous(self, *args, **kwargs) -> LazyImages:
        return self

    def fingerprint(self) -> str:
        """Hash of the file list with sizes and modification times (decoding every image would take hours)."""
        return stable_hash(self.size, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files])


def imagenet_subsets() -> list[str]:
    """Names of the shipped class lists (data_files/imagenet*.txt): imagenet50, imagenet100, imagenet200."""
    return sorted(p.name[:-4] for p in resources.files("scan").joinpath("data_files").iterdir()
                  if p.name.startswith("imagenet") and p.name.endswith(".txt"))


def read_class_list(subset: str) -> list[tuple[str, str]]:
    """(WordNet ID, display name) per class of a shipped subset, in file order (= label order)."""
    text = resources.files("scan").joinpath("data_files", f"{subset}.txt").read_text()
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
    return ImageDataset(LazyImages(files, request.image_size or IMAGENET_SIDE), np.array(labels),
                        [name for _, name in classes], paths=[str(f) for f in files])


@register_dataset("imagenet")
def load_imagenet(request: LoadRequest) -> ImageDataset:
    """Every class folder of an ImageNet-style tree, decoded lazily at 224 px (train, val = val/)."""
    return _imagenet_dataset(request, None)


def _register_imagenet_subsets() -> None:
    for subset in imagenet_subsets():
        def load(request: LoadRequest, subset=subset) -> ImageDataset:
            return _imagenet_dataset(request, read_class_list(subset))
        load.__doc__ = f"The {subset} classes of the SCAN paper from an ImageNet-style tree, decoded lazily."
        register_dataset(subset)(load)


_register_imagenet_subsets()


