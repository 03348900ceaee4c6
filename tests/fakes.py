"""Writers of tiny data sets in the exact on-disk formats of the real ones."""
import gzip
import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_pickle(path: Path, obj) -> None:
    # Protocol 2 with bytes keys mimics the Python-2 era CIFAR files.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py with five data batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        write_pickle(folder / name, {b"batch_label": name.encode(), b"data": cifar_rows(per_batch, seed + i),
                                     b"labels": rng.integers(0, 10, per_batch).tolist(),
                                     b"filenames": [b"x.png"] * per_batch})
    write_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return root


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """root/cifar-100-python with train, test and meta (fine and coarse labels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        write_pickle(folder / name, {b"data": cifar_rows(n, seed), b"fine_labels": rng.integers(0, 100, n).tolist(),
                                     b"coarse_labels": rng.integers(0, 20, n).tolist()})
    write_pickle(folder / "meta", {b"fine_label_names": [b"f"] * 100,
                                   b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return root


def write_stl10(root: Path, n_train: int, n_test: int, n_unlabeled: int, seed: int = 0) -> Path:
    """root/stl10_binary with {train,test,unlabeled}_X.bin (column-major planes), *_y.bin (1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        (folder / f"{part}_X.bin").write_bytes(rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes())
        if part != "unlabeled":
            (folder / f"{part}_y.bin").write_bytes(rng.integers(1, 11, n, dtype=np.uint8).tobytes())
    return root


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """IDX file: big-endian magic, big-endian uint32 dims, uint8 payload; gzipped if path ends .gz."""
    raw = magic.to_bytes(4, "big") + np.array(array.shape, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(raw)
    return path


def write_fashion_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The four gzipped IDX files of (Fashion-)MNIST, with 28x28 random images and labels 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return root
