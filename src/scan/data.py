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
import pickle
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scan.hashing import bytes_hash, stable_hash
from scan.registry import Registry
from scan.imagefiles import IMAGE_EXTENSIONS, decode_images, list_files

log = logging.getLogger("scan.data")

DEFAULT_IMAGE_SIZE = 64          # side of folder images when no image_size is given
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
MNIST_PATH = "/usr/share/datasets/mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]

# Which on-disk parts make up each split; "val" is an alias of "test" (the held-out part).
_STANDARD_SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}
_SKIPPED_SHOWN = 5               # skipped file names listed in the folder warning


class DataError(ValueError):
    """User-facing data problem; str(e) is ONE line naming the file/option and what was expected."""

    def __init__(self, message: str):
        # Embedded exception texts may span lines; the CLI prints exactly one line per error.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass
class ImageDataset:
    """Images as one uint8 tensor (N, C, H, W), C = 1 (grey) or 3 (RGB), with optional labels.

    Data sets too large for memory (ImageNet) hold a `LazyImages` instead, which decodes on indexing.
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
class LoadRequest:
    """What a registered loader receives: the user's options, with the path already expanded."""

    path: Path | None
    split: str
    image_size: int | None
    labels_from_folders: bool


Loader = Callable[[LoadRequest], ImageDataset]
DATASETS: Registry[Loader] = Registry("data.dataset")
register_dataset = DATASETS.register   # decorator adding a loader under a name


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset` (besides "auto")."""
    return DATASETS.names()


def load_dataset(name: str, path: str | None = None, split: str = "train", image_size: int | None = None,
                 labels_from_folders: bool = True, seed: int = 0) -> ImageDataset:
    """Load data set `name` (a registry name, or "auto" to recognise the format of `path`).

    split: "train", "val"/"test" (held-out part) or "all"; stl10 adds "unlabeled" and
    "train+unlabeled". npz files and image folders have no split: every split is all images.
    image_size: side of folder images after resize + centre crop (default 64); other formats keep
    their native size. seed: accepted so callers can pass the run seed; every loader is
    deterministic (digits uses a fixed split) so that the held-out set never changes between runs.
    """
    del seed  # see docstring: splits must not depend on the run seed
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    request = LoadRequest(Path(path).expanduser() if path is not None else None, split, image_size,
                          labels_from_folders)
    key = name.lower()
    if key == "auto":
        key = detect_format(request.path)
        log.info("%s: recognised as '%s' data", request.path, key)
    if key not in DATASETS:   # a DataError (not a ConfigError): the name may come from the files on disk
        raise DataError(f"unknown dataset '{name}'; expected one of: auto, {', '.join(list_datasets())}")
    return DATASETS.get(key)(request)


# ----------------------------------------------------------------------------- shared helpers

def _existing_path(request: LoadRequest, title: str, default: str | None = None, hint: str = "") -> Path:
    """The request's path (or the loader's default location); DataError when it does not exist."""
    path = request.path if request.path is not None else (Path(default) if default else None)
    if path is None:
        raise DataError(f"{title} needs a data location: pass --data PATH")
    if not path.exists():
        raise DataError(f"{path} does not exist (expected {title} data){hint}")
    return path


def _split_parts(title: str, split: str, extra: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The on-disk parts that make up `split`; DataError for a split the format does not have."""
    parts = {**_STANDARD_SPLITS, **(extra or {})}
    key = "test" if split == "val" else split
    if key not in parts:
        raise DataError(f"{title} has no split '{split}'; expected one of: val, {', '.join(parts)}")
    return parts[key]


def _stack(parts: list[tuple[np.ndarray, np.ndarray | None]], class_names: list[str] | None) -> ImageDataset:
    """Concatenate (images NCHW, labels) parts; labels are None if any part is unlabeled."""
    images = np.concatenate([images for images, _ in parts])  # copies: result is writable and contiguous
    labels = None
    if all(part_labels is not None for _, part_labels in parts):
        labels = np.concatenate([part_labels for _, part_labels in parts]).astype(np.int64)
    return ImageDataset(torch.from_numpy(images), labels, class_names)


def _read_uint8(file: Path) -> np.ndarray:
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


def _locate_dir(root: Path, subdir: str, markers: tuple[str, ...]) -> Path | None:
    """`root` or `root/subdir`, whichever holds all marker files (users point at either)."""
    for candidate in (root, root / subdir):
        if all((candidate / m).is_file() for m in markers):
            return candidate
    return None


def _require_dir(request: LoadRequest, title: str, subdir: str, markers: tuple[str, ...]) -> Path:
    """The folder holding the format's files, or a DataError saying which files were expected."""
    root = _existing_path(request, title)
    found = _locate_dir(root, subdir, markers)
    if found is None:
        raise DataError(f"{root}: not a {title} folder (expected {', '.join(markers)} in it or in {subdir}/)")
    return found


# ----------------------------------------------------------------------------- digits

@register_dataset("digits")
def load_digits(request: LoadRequest) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits; fixed stratified 80/20 train/val split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if request.path is not None:
        raise DataError(f"digits is built in and takes no path (got {request.path}); use --dataset auto for files")
    parts = _split_parts("digits", request.split)
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # random_state is fixed, not the run seed, so every run is evaluated on the same held-out images.
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    rows = np.sort(np.concatenate([{"train": train, "test": test}[p] for p in parts]))
    return _stack([(images[rows], labels[rows])], DIGIT_CLASSES)


# ----------------------------------------------------------------------------- IDX (MNIST family)

_IDX_MAGIC = {"images": 2051, "labels": 2049}   # 0x0803: uint8 x 3 dims, 0x0801: uint8 x 1 dim
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _idx_file(root: Path, part: str, kind: str) -> Path | None:
    """The IDX file for part/kind under any of the usual spellings (-idx3-ubyte, .idx3-ubyte, .gz)."""
    dims = 3 if kind == "images" else 1
    stem = f"{_IDX_PREFIX[part]}-{kind}"
    for name in (f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"):
        for suffix in ("", ".gz"):
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
    return None


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file: big-endian magic, one uint32 per dimension, then the uint8 payload."""
    raw = _read_uint8(file)
    found = int.from_bytes(raw[:4].tobytes(), "big")
    if found != magic:
        raise DataError(f"{file}: not an IDX file of this kind (magic number {found}, expected {magic})")
    header = 4 + 4 * (magic & 0xFF)  # the low byte of the magic number is the number of dimensions
    if len(raw) < header:
        raise DataError(f"{file}: truncated IDX file ({len(raw)} bytes, shorter than its header)")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header].tobytes(), dtype=">u4"))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{file}: truncated or corrupt IDX file ({len(raw)} bytes, header says {expected})")
    return raw[header:].reshape(dims)


def _idx_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) and labels of the train or t10k files in `root`."""
    files = {kind: _idx_file(root, part, kind) for kind in _IDX_MAGIC}
    for kind, file in files.items():
        if file is None:
            dims = 3 if kind == "images" else 1
            raise DataError(f"{root}: missing {_IDX_PREFIX[part]}-{kind}-idx{dims}-ubyte[.gz] (IDX/MNIST format)")
    images = _read_idx(files["images"], _IDX_MAGIC["images"])
    labels = _read_idx(files["labels"], _IDX_MAGIC["labels"])
    if len(images) != len(labels):
        raise DataError(f"{files['labels']}: {len(labels)} labels for {len(images)} images in {files['images']}")
    return images[:, None], labels.astype(np.int64)


def _idx_dataset(request: LoadRequest, title: str, class_names: list[str] | None,
                 default: str | None = None, hint: str = "") -> ImageDataset:
    """Shared body of the IDX loaders: "train" = train-*, "test"/"val" = t10k-*, "all" = both."""
    root = _existing_path(request, title, default, hint)
    return _stack([_idx_part(root, part) for part in _split_parts(title, request.split)], class_names)


@register_dataset("idx")
def load_idx(request: LoadRequest) -> ImageDataset:
    """Any folder of MNIST-style IDX files; class names are the label numbers."""
    return _idx_dataset(request, "IDX", None)


@register_dataset("mnist")
def load_mnist(request: LoadRequest) -> ImageDataset:
    """MNIST IDX files, by default from /usr/share/datasets/mnist."""
    return _idx_dataset(request, "MNIST", DIGIT_CLASSES, MNIST_PATH,
                        "; download the four MNIST IDX files and pass --data PATH")


@register_dataset("fashion-mnist")
def load_fashion_mnist(request: LoadRequest) -> ImageDataset:
    """Fashion-MNIST IDX files, by default from the Debian package dataset-fashion-mnist."""
    return _idx_dataset(request, "Fashion-MNIST", FASHION_MNIST_CLASSES, FASHION_MNIST_PATH,
                        "; run `apt-get install dataset-fashion-mnist` or pass --data PATH")


# ----------------------------------------------------------------------------- CIFAR (python pickles)

# CIFAR batches are pickles; only the globals a numpy array needs may be loaded, so a malicious
# file cannot run code. numpy >= 2 renamed numpy.core to numpy._core; both spellings are accepted.
_PICKLE_GLOBALS = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
                   ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                   ("numpy._core.numeric", "_frombuffer")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str):
        modern = module.replace("numpy.core.", "numpy._core.", 1)
        if (modern, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        try:
            return super().find_class(modern, name)
        except ImportError:  # numpy < 2 has only numpy.core
            return super().find_class(module, name)


def _unpickle(file: Path) -> dict:
    """A CIFAR pickle (Python-2 era, hence encoding="bytes": keys come back as bytes)."""
    try:
        with open(file, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{file}: file is missing") from None
    except Exception as e:  # a corrupt pickle can fail with almost any exception type
        raise DataError(f"{file}: not a readable CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(content, dict):
        raise DataError(f"{file}: expected a pickled dict, found {type(content).__name__}")
    return content


def _pickled_field(file: Path, content: dict, key: bytes):
    """content[key], or a DataError naming the file and the missing key."""
    if key not in content:
        raise DataError(f"{file}: missing key {key!r} (found {sorted(content)})")
    return content[key]


def _cifar_batch(file: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One batch: rows of 3072 bytes (R, G, B planes of 32x32) -> (N, 3, 32, 32) and labels."""
    content = _unpickle(file)
    data = np.asarray(_pickled_field(file, content, b"data"))
    labels = np.asarray(_pickled_field(file, content, label_key))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{file}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise DataError(f"{file}: {labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_dataset(request: LoadRequest, title: str, subdir: str, meta: str, names_key: bytes,
                   label_key: bytes, batches: Callable[[Path, str], list[Path]]) -> ImageDataset:
    """Shared body of the CIFAR loaders; `batches(folder, part)` lists the pickles of a part."""
    folder = _require_dir(request, title, subdir, (meta,))
    parts = _split_parts(title, request.split)
    meta_file = folder / meta
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _pickled_field(meta_file, _unpickle(meta_file), names_key)]
    return _stack([_cifar_batch(f, label_key) for part in parts for f in batches(folder, part)], names)


def _cifar10_batches(folder: Path, part: str) -> list[Path]:
    """data_batch_1..5 (any present, in numeric order) for train; test_batch for test."""
    if part == "test":
        return [folder / "test_batch"]
    numbered = {int(p.name[len("data_batch_"):]): p for p in folder.glob("data_batch_*")
                if p.name[len("data_batch_"):].isdigit()}
    found = [numbered[k] for k in sorted(numbered)]
    if not found:
        raise DataError(f"{folder}: no data_batch_1..5 files (CIFAR-10 python format)")
    return found


@register_dataset("cifar10")
def load_cifar10(request: LoadRequest) -> ImageDataset:
    """CIFAR-10 python version: cifar-10-batches-py/ or its parent."""
    return _cifar_dataset(request, "CIFAR-10", "cifar-10-batches-py", "batches.meta", b"label_names",
                          b"labels", _cifar10_batches)


@register_dataset("cifar100-20")
def load_cifar100_20(request: LoadRequest) -> ImageDataset:
    """CIFAR-100 python version with its 20 coarse superclasses as labels (as in the SCAN paper)."""
    return _cifar_dataset(request, "CIFAR-100", "cifar-100-python", "meta", b"coarse_label_names",
                          b"coarse_labels", lambda folder, part: [folder / part])


# ----------------------------------------------------------------------------- STL-10 (binary)

_STL_SIDE = 96
_STL_SPLITS = {"unlabeled": ("unlabeled",), "train+unlabeled": ("train", "unlabeled")}


def _stl_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray | None]:
    """<part>_X.bin (column-major 3x96x96 per image) and, except for unlabeled, <part>_y.bin (1..10)."""
    file = folder / f"{part}_X.bin"
    raw = _read_uint8(file)
    image_bytes = 3 * _STL_SIDE * _STL_SIDE
    if raw.size == 0 or raw.size % image_bytes:
        raise DataError(f"{file}: {raw.size} bytes is not a whole number of 3x96x96 STL-10 images")
    # Each plane is stored column by column (MATLAB order): swap the last two axes to get (H, W).
    images = raw.reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 1, 3, 2)
    if part == "unlabeled":
        return images, None
    labels_file = folder / f"{part}_y.bin"
    labels = _read_uint8(labels_file).astype(np.int64) - 1
    if len(labels) != len(images):
        raise DataError(f"{labels_file}: {len(labels)} labels for the {len(images)} images in {file}")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{labels_file}: labels must be 1..10, found {labels.min() + 1}..{labels.max() + 1}")
    return images, labels


@register_dataset("stl10")
def load_stl10(request: LoadRequest) -> ImageDataset:
    """STL-10 binary version: stl10_binary/ or its parent. Extra splits "unlabeled" and
    "train+unlabeled" (what SCAN trains on) have no labels."""
    parts = _split_parts("STL-10", request.split, _STL_SPLITS)
    folder = _require_dir(request, "STL-10", "stl10_binary", (f"{parts[0]}_X.bin",))
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else None
    return _stack([_stl_part(folder, part) for part in parts], names)


# ----------------------------------------------------------------------------- npz

def _npz_images(file: Path, images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) with C in 1, 3, 4 (alpha dropped) -> (N, C, H, W) uint8."""
    if images.dtype != np.uint8:
        raise DataError(f"{file}: 'images' must be uint8 (0..255), found {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        return images[..., :3].transpose(0, 3, 1, 2)
    raise DataError(f"{file}: 'images' has shape {images.shape}, expected (N, H, W) or (N, H, W, C) with C 1, 3 or 4")


def _npz_labels(file: Path, labels: np.ndarray, count: int, names: list[str] | None) -> np.ndarray:
    """Validated integer labels, one per image, within the class names when those are given."""
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"{file}: 'labels' must be a 1-D integer array, found {labels.dtype} {labels.shape}")
    if len(labels) != count:
        raise DataError(f"{file}: 'labels' has length {len(labels)} but 'images' has {count} images")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{file}: 'labels' must be class indices >= 0, found {labels.min()}")
    if len(labels) and names is not None and labels.max() >= len(names):
        raise DataError(f"{file}: label {labels.max()} has no entry in 'class_names' ({len(names)} names)")
    return labels


@register_dataset("npz")
def load_npz(request: LoadRequest) -> ImageDataset:
    """A .npz with 'images' and optional 'labels' and 'class_names'. There is no split: every
    split returns all images (a separate evaluation set needs its own file)."""
    file = _existing_path(request, "npz")
    _split_parts("npz", request.split)  # only to reject misspelt split names
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except AttributeError:  # np.load returned a bare array: a .npy, not a .npz archive
        raise DataError(f"{file}: expected a .npz archive with an 'images' array, found a single array") from None
    except Exception as e:  # BadZipFile, ValueError (object arrays, pickles), OSError, ...
        raise DataError(f"{file}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if "images" not in arrays:
        raise DataError(f"{file}: no 'images' array (found {', '.join(arrays) or 'nothing'})")
    images = _npz_images(file, arrays["images"])
    if not len(images):
        raise DataError(f"{file}: 'images' holds no images")
    names = None
    if "class_names" in arrays:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in arrays["class_names"].tolist()]
    labels = _npz_labels(file, arrays["labels"], len(images), names) if "labels" in arrays else None
    return _stack([(images, labels)], names)


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
    root = _existing_path(request, "image folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder of images or a .npz file)")
    _split_parts("image folder", request.split)  # only to reject misspelt split names
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


def content_hash(images: torch.Tensor | LazyImages) -> str:
    """16 hex digits identifying a data set's images: of the pixels, or of the files for lazy images."""
    if isinstance(images, LazyImages):
        return images.fingerprint()
    return bytes_hash(images)


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
    root = _existing_path(request, "ImageNet", hint=" (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    parts = _split_parts("ImageNet", request.split)
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
        if _locate_dir(path, subdir, markers) is not None:
            return name
    if _idx_file(path, "train", "images") or _idx_file(path, "test", "images"):
        return "idx"
    return "folder"
