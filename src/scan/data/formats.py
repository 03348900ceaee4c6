"""Loaders of the benchmark formats: scikit-learn digits, IDX (MNIST family), CIFAR python pickles,
STL-10 binaries and .npz files; each registered under its name in `scan.data.DATASETS`."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from scan.data.datasets import (
    IDX_PREFIX,
    DataError,
    ImageDataset,
    LoadRequest,
    existing_path,
    idx_file,
    read_uint8,
    register_dataset,
    require_dir,
    split_parts,
    stack_parts,
)

log = logging.getLogger("scan.data")

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
MNIST_PATH = "/usr/share/datasets/mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]


# ----------------------------------------------------------------------------- digits

@register_dataset("digits")
def load_digits(request: LoadRequest) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits; fixed stratified 80/20 train/val split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if request.path is not None:
        raise DataError(f"digits is built in and takes no path (got {request.path}); use --dataset auto for files")
    parts = split_parts("digits", request.split)
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    # random_state is fixed, not the run seed, so every run is evaluated on the same held-out images.
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    rows = np.sort(np.concatenate([{"train": train, "test": test}[p] for p in parts]))
    return stack_parts([(images[rows], labels[rows])], DIGIT_CLASSES)


# ----------------------------------------------------------------------------- IDX (MNIST family)

_IDX_MAGIC = {"images": 2051, "labels": 2049}   # 0x0803: uint8 x 3 dims, 0x0801: uint8 x 1 dim


def _read_idx(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file: big-endian magic, one uint32 per dimension, then the uint8 payload."""
    raw = read_uint8(file)
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
    files = {kind: idx_file(root, part, kind) for kind in _IDX_MAGIC}
    for kind, file in files.items():
        if file is None:
            dims = 3 if kind == "images" else 1
            raise DataError(f"{root}: missing {IDX_PREFIX[part]}-{kind}-idx{dims}-ubyte[.gz] (IDX/MNIST format)")
    images = _read_idx(files["images"], _IDX_MAGIC["images"])
    labels = _read_idx(files["labels"], _IDX_MAGIC["labels"])
    if len(images) != len(labels):
        raise DataError(f"{files['labels']}: {len(labels)} labels for {len(images)} images in {files['images']}")
    return images[:, None], labels.astype(np.int64)


def _idx_dataset(request: LoadRequest, title: str, class_names: list[str] | None,
                 default: str | None = None, hint: str = "") -> ImageDataset:
    """Shared body of the IDX loaders: "train" = train-*, "test"/"val" = t10k-*, "all" = both."""
    root = existing_path(request, title, default, hint)
    return stack_parts([_idx_part(root, part) for part in split_parts(title, request.split)], class_names)


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
    folder = require_dir(request, title, subdir, (meta,))
    parts = split_parts(title, request.split)
    meta_file = folder / meta
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _pickled_field(meta_file, _unpickle(meta_file), names_key)]
    return stack_parts([_cifar_batch(f, label_key) for part in parts for f in batches(folder, part)], names)


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
_STL_SPLITS = {"unlabeled": ("unlabeled",)}


def _stl_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray | None]:
    """<part>_X.bin (column-major 3x96x96 per image) and, except for unlabeled, <part>_y.bin (1..10)."""
    file = folder / f"{part}_X.bin"
    raw = read_uint8(file)
    image_bytes = 3 * _STL_SIDE * _STL_SIDE
    if raw.size == 0 or raw.size % image_bytes:
        raise DataError(f"{file}: {raw.size} bytes is not a whole number of 3x96x96 STL-10 images")
    # Each plane is stored column by column (MATLAB order): swap the last two axes to get (H, W).
    images = raw.reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 1, 3, 2)
    if part == "unlabeled":
        return images, None
    labels_file = folder / f"{part}_y.bin"
    labels = read_uint8(labels_file).astype(np.int64) - 1
    if len(labels) != len(images):
        raise DataError(f"{labels_file}: {len(labels)} labels for the {len(images)} images in {file}")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{labels_file}: labels must be 1..10, found {labels.min() + 1}..{labels.max() + 1}")
    return images, labels


@register_dataset("stl10")
def load_stl10(request: LoadRequest) -> ImageDataset:
    """STL-10 binary version: stl10_binary/ or its parent. An extra split "unlabeled"; splits joined
    with '+' are read in that order, each part once ("train+unlabeled": what SCAN's pretext trains
    on); a set with an unlabeled part has no labels."""
    pieces = request.split.split("+")
    parts = tuple(dict.fromkeys(part for piece in pieces for part in split_parts("STL-10", piece, _STL_SPLITS)))
    folder = require_dir(request, "STL-10", "stl10_binary", (f"{parts[0]}_X.bin",))
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else None
    return stack_parts([_stl_part(folder, part) for part in parts], names)


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
    file = existing_path(request, "npz")
    split_parts("npz", request.split)  # only to reject misspelt split names
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
    return stack_parts([(images, labels)], names)


