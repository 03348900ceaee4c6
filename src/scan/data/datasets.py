"""Image data sets: the built-in digits, common benchmark formats, .npz files and image folders.

Every loader returns an `ImageDataset` holding uint8 images as one (N, C, H, W) tensor, so the
rest of the pipeline never deals with file formats. Loaders are looked up by name in a registry
(`register_dataset`); `load_dataset("auto", path)` recognises a format from the files on disk.

User mistakes (missing path, wrong format, corrupt file) raise `DataError` with a one-line
message naming the file and what was expected, never a raw OSError or pickle traceback.
"""
from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from scan.core.hashing import bytes_hash
from scan.core.registry import Registry

if TYPE_CHECKING:
    from scan.data.lazy_images import LazyImages

log = logging.getLogger("scan.data")


# Which on-disk parts make up each split; "val" is an alias of "test" (the held-out part).
_STANDARD_SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}


class DataError(ValueError):
    """User-facing data problem; str(e) is ONE line naming the file/option and what was expected."""

    def __init__(self, message: str):
        # Embedded exception texts may span lines; the CLI prints exactly one line per error.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass
class ImageDataset:
    """Images as one uint8 tensor (N, C, H, W), C = 1 (grey) or 3 (RGB), with optional labels.

    Data sets too large for memory (ImageNet, big image folders) hold a `LazyImages` instead, which
    reads rows on indexing (scan.data.lazy_images).
    """

    images: torch.Tensor | LazyImages
    labels: np.ndarray | None
    class_names: list[str] | None
    paths: list[str] | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must be a uint8 (N, 1|3, H, W) tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        self.images = self.images.contiguous()
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int | None:
        """Number of classes: from the class names, else the largest label + 1, else None."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None

    def subset(self, index) -> ImageDataset:
        """A new data set with the images selected by `index` (ints, bool mask, slice or tensor)."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.atleast_1d(np.arange(len(self))[index])
        return ImageDataset(
            images=self.images[torch.from_numpy(rows)],
            labels=None if self.labels is None else self.labels[rows],
            class_names=None if self.class_names is None else list(self.class_names),
            paths=None if self.paths is None else [self.paths[i] for i in rows],
        )


@dataclass(frozen=True)
class FolderOptions:
    """How image files are decoded and held (the data.cache_images... settings; scan.data.folders).

    Direct callers (scan predict) get one decoded tensor as always; a run passes its config.
    """

    cache_images: str = "memory"
    max_memory_mb: int = 2048
    cache_dir: str | None = None
    workers: int = 0
    quiet: bool = True

    @classmethod
    def from_config(cls, cfg) -> FolderOptions:
        d = cfg.data
        return cls(d.cache_images, d.max_memory_mb, d.cache_dir, d.decode_workers, cfg.quiet)


@dataclass(frozen=True)
class LoadRequest:
    """What a registered loader receives: the user's options, with the path already expanded."""

    path: Path | None
    split: str
    image_size: int | None
    labels_from_folders: bool
    folder: FolderOptions = FolderOptions()


Loader = Callable[[LoadRequest], ImageDataset]
DATASETS: Registry[Loader] = Registry("data.dataset")
register_dataset = DATASETS.register   # decorator adding a loader under a name


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset` (besides "auto")."""
    return DATASETS.names()


def load_dataset(name: str, path: str | None = None, split: str = "train", image_size: int | None = None,
                 labels_from_folders: bool = True, seed: int = 0, folder: FolderOptions | None = None) -> ImageDataset:
    """Load data set `name` (a registry name, or "auto" to recognise the format of `path`).

    split: "train", "val"/"test" (held-out part) or "all"; stl10 adds "unlabeled" and
    "train+unlabeled". npz files and image folders have no split: every split is all images.
    image_size: side of folder images after resize + centre crop (default 64); other formats keep
    their native size. folder: how image files are decoded and held (FolderOptions; one tensor by
    default). seed: accepted so callers can pass the run seed; every loader is deterministic
    (digits uses a fixed split) so that the held-out set never changes between runs.
    """
    del seed  # see docstring: splits must not depend on the run seed
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    request = LoadRequest(Path(path).expanduser() if path is not None else None, split, image_size,
                          labels_from_folders, folder or FolderOptions())
    key = name.lower()
    if key == "auto":
        key = detect_format(request.path)
        log.info("%s: recognised as '%s' data", request.path, key)
    if key not in DATASETS:   # a DataError (not a ConfigError): the name may come from the files on disk
        raise DataError(f"unknown dataset '{name}'; expected one of: auto, {', '.join(list_datasets())}")
    return DATASETS.get(key)(request)


# ----------------------------------------------------------------------------- shared helpers

def existing_path(request: LoadRequest, title: str, default: str | None = None, hint: str = "") -> Path:
    """The request's path (or the loader's default location); DataError when it does not exist."""
    path = request.path if request.path is not None else (Path(default) if default else None)
    if path is None:
        raise DataError(f"{title} needs a data location: pass --data PATH")
    if not path.exists():
        raise DataError(f"{path} does not exist (expected {title} data){hint}")
    return path


def split_parts(title: str, split: str, extra: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The on-disk parts that make up `split`; DataError for a split the format does not have."""
    parts = {**_STANDARD_SPLITS, **(extra or {})}
    key = "test" if split == "val" else split
    if key not in parts:
        raise DataError(f"{title} has no split '{split}'; expected one of: val, {', '.join(parts)}")
    return parts[key]


def stack_parts(parts: list[tuple[np.ndarray, np.ndarray | None]], class_names: list[str] | None) -> ImageDataset:
    """Concatenate (images NCHW, labels) parts; labels are None if any part is unlabeled."""
    images = np.concatenate([images for images, _ in parts])  # copies: result is writable and contiguous
    labels = None
    if all(part_labels is not None for _, part_labels in parts):
        labels = np.concatenate([part_labels for _, part_labels in parts]).astype(np.int64)
    return ImageDataset(torch.from_numpy(images), labels, class_names)


def read_uint8(file: Path) -> np.ndarray:
    """Whole file (gunzipped when it ends in .gz) as a flat uint8 array."""
    try:
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8)
        return np.fromfile(file, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{file}: file is missing") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{file}: cannot read file ({e})") from e


IDX_PREFIX = {"train": "train", "test": "t10k"}


def idx_file(root: Path, part: str, kind: str) -> Path | None:
    """The IDX file for part/kind under any of the usual spellings (-idx3-ubyte, .idx3-ubyte, .gz)."""
    dims = 3 if kind == "images" else 1
    stem = f"{IDX_PREFIX[part]}-{kind}"
    for name in (f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"):
        for suffix in ("", ".gz"):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None


def locate_dir(root: Path, subdir: str, markers: tuple[str, ...]) -> Path | None:
    """`root` or `root/subdir`, whichever holds all marker files (users point at either)."""
    for candidate in (root, root / subdir):
        if all((candidate / m).is_file() for m in markers):
            return candidate
    return None


def require_dir(request: LoadRequest, title: str, subdir: str, markers: tuple[str, ...]) -> Path:
    """The folder holding the format's files, or a DataError saying which files were expected."""
    root = existing_path(request, title)
    found = locate_dir(root, subdir, markers)
    if found is None:
        raise DataError(f"{root}: not a {title} folder (expected {', '.join(markers)} in it or in {subdir}/)")
    return found


def content_hash(images) -> str:
    """16 hex digits identifying a data set's images: of the pixels, or of the files for lazy images."""
    if hasattr(images, "fingerprint"):   # LazyImages (scan.data.folders): hashing the pixels would decode every file
        return images.fingerprint()
    return bytes_hash(images)


# ----------------------------------------------------------------------------- format detection

SPLITLESS_FORMATS = frozenset({"folder", "npz"})


def has_splits(name: str, path: str | None) -> bool:
    """False for formats whose every split is the same images (so they are read once, not per split)."""
    if name == "auto":
        name = detect_format(Path(path) if path else None)
    return name not in SPLITLESS_FORMATS


def detect_format(path: Path | None) -> str:
    """Registry name for the data at `path`: a known benchmark layout, an image folder or a .npz."""
    if path is None:
        raise DataError("dataset 'auto' needs a data location: pass --data PATH")
    if not path.exists():
        raise DataError(f"{path} does not exist (expected an image folder, a data-set folder or a .npz file)")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise DataError(f"{path}: unsupported file (expected a folder of images, a data-set folder or a .npz file)")
    layouts = [("stl10", "stl10_binary", ("train_X.bin",)), ("cifar10", "cifar-10-batches-py", ("batches.meta",)),
               ("cifar100-20", "cifar-100-python", ("meta", "train"))]
    for name, subdir, markers in layouts:
        if locate_dir(path, subdir, markers) is not None:
            return name
    if idx_file(path, "train", "images") or idx_file(path, "test", "images"):
        return "idx"
    return "folder"

