"""Images read from their files only when indexed, for image sets too large to hold decoded in memory.

`LazyImages` stands in for the (N, 3, S, S) uint8 tensor of an `ImageDataset` and serves rows
from one of two places:
- a decode-once file (`decode_once`): every image decoded once, in parallel with a progress bar,
  into a uint8 .npy file from which every stage and every epoch then reads the rows it needs
  (`RowFile`). The operating system keeps in its page cache what fits and drops the rest, so the
  process itself never holds more than a batch. 100k images at 64 px take 1.2 GB of disk,
  decoded in one pass instead of once per epoch.
- the image files themselves, decoded on each use, with at most `max_cached` decoded images kept
  (least recently used dropped first): ImageNet trees, and folders with data.cache_images=none.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from scan.core.checkpoint import atomic_write_json, read_json
from scan.core.hashing import stable_hash
from scan.data.datasets import DataError
from scan.data.imagefiles import decode_images, progress

log = logging.getLogger("scan.data")

CACHE_VERSION = 1          # bump when decoding changes, so old decode-once files are rebuilt
SAMPLED_ROWS = 256   # rows whose hash is checked each time a decoded cache is reused
DECODE_CHUNK = 1024        # images decoded at a time while filling a decode-once file (fewer under a tight budget)


def image_bytes(size: int) -> int:
    """Bytes of one decoded (3, size, size) uint8 image."""
    return 3 * size * size


def _file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    stats = [f.stat() for f in files]
    return [(str(f), s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)]


class LazyImages:
    """Images (N, 3, S, S) uint8 decoded from their files (or read from a decode-once file) when indexed.

    It has the tensor's len/shape/dtype/ndim, and indexing with an int, slice, index array or
    tensor returns a real uint8 tensor of those rows. `.to()` and `.contiguous()` return the object
    itself: each batch moves to the device instead. `peak_decoded` is the most decoded images this
    object has held in memory at once outside a returned batch (the bounded cache, or the chunk of a
    decode-once pass), so tests and benchmarks can check the memory bound.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: list[Path], size: int, workers: int = 0, max_cached: int = 0,
                 store: RowFile | None = None, rows: np.ndarray | None = None, digest: str | None = None):
        self.files = list(files)
        self.size = size
        self.workers = workers
        self.max_cached = max_cached
        self.shape = torch.Size((len(self.files), 3, size, size))
        self.store = store        # RowFile of the decode-once (M, 3, S, S) file; None: decode the files
        self._rows = rows         # (N,) row of `store` holding image i (unreadable files have none)
        self._digest = digest     # hash of the pixels, equal to content_hash of the same images in memory
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.peak_decoded = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.arange(len(self))[index]
        flat = np.atleast_1d(rows)
        batch = self.store[self._rows[flat]] if self.store is not None else self._decode(flat)
        batch = torch.from_numpy(np.ascontiguousarray(batch))
        return batch[0] if np.ndim(rows) == 0 else batch

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 3, S, S) from the bounded cache, decoding (in parallel) the rows it lacks."""
        wanted = [int(i) for i in rows]
        missing = [i for i in dict.fromkeys(wanted) if i not in self._cache]
        decoded = dict(zip(missing, decode_images([self.files[i] for i in missing], self.size, self.workers)))
        for i, img in decoded.items():
            if img is None:
                log.warning("%s: unreadable image, used as a black image", self.files[i])
            decoded[i] = (np.zeros((3, self.size, self.size), np.uint8) if img is None
                          else np.ascontiguousarray(img.transpose(2, 0, 1)))
        batch = np.stack([decoded[i] if i in decoded else self._cache[i] for i in wanted])
        if self.max_cached:
            for i in wanted:          # most recently used last; the oldest are dropped first
                if i in decoded:
                    self._cache[i] = decoded[i]
                self._cache.move_to_end(i)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            self.peak_decoded = max(self.peak_decoded, len(self._cache))
        return batch

    def to(self, *args, **kwargs) -> LazyImages:
        return self

    def contiguous(self, *args, **kwargs) -> LazyImages:
        return self

    def fingerprint(self) -> str:
        """The pixels' hash when a decode-once pass saw them all (equal to that of the same images in
        memory), else a hash of the file list with sizes and modification times (decoding every
        image to hash it would take hours on ImageNet)."""
        return self._digest or stable_hash(self.size, _file_stats(self.files))


def default_cache_dir() -> Path:
    """Where decode-once files go unless data.cache_dir says otherwise: the user's cache folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scan"


class RowFile:
    """Rows of a uint8 .npy file (M, 3, S, S), read with pread when indexed.

    Not a memory map on purpose: mapped pages count as the process's resident memory once an
    epoch has touched them all; read into a fresh batch, the file stays in the operating system's
    page cache (fast on the next epoch, dropped first under memory pressure) and the process
    holds one batch.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{path}: not a C-ordered uint8 (M, C, H, W) array")
        self.shape = shape
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        row_bytes = out[0].nbytes if len(out) else 0
        for j, row in enumerate(rows):
            if os.preadv(self._fd, [out[j]], self.offset + int(row) * row_bytes) != row_bytes:
                raise OSError(f"{self.path}: shorter than its header says; delete it to decode again")
        return out

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def decode_once(files: list[Path], size: int, cache_dir: Path, workers: int, chunk: int,
                quiet: bool) -> tuple[RowFile, np.ndarray, str]:
    """(the store, (M,) bool readable, pixel digest) of `files` decoded at `size`.

    The file is named by a hash of the file list, sizes, modification times and `size`, so a
    changed folder gets a new file and an unchanged one is reused by every stage and every run.
    It is filled `chunk` images at a time (the most decoded images held at once), written under a
    temporary name and renamed when complete, so an interrupted pass never leaves a partial file
    that looks finished. Unreadable files keep a black row and are marked unreadable.
    """
    key = stable_hash(CACHE_VERSION, size, _file_stats(files))
    store_path, record_path = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
    shape = (len(files), 3, size, size)
    found = _reusable(store_path, record_path, shape)
    if found is None:
        record = _fill(files, size, store_path, workers, chunk, quiet)
        store = RowFile(store_path)
        record["sample_digest"] = _sample_digest(store)
        atomic_write_json(record_path, record)   # last: a record means the file beside it is complete
    else:
        log.info("reusing the decoded images in %s", store_path)
        store, record = found
    readable = np.ones(len(files), dtype=bool)
    readable[record["unreadable"]] = False
    return store, readable, record["digest"]


def _reusable(store_path: Path, record_path: Path, shape: tuple) -> tuple[RowFile, dict] | None:
    """The store and its record when both exist and agree, else None (decode again)."""
    try:
        record = read_json(record_path)
        if not record or record.get("version") != CACHE_VERSION or not store_path.is_file():
            return None
        store = RowFile(store_path)
    except (OSError, ValueError):   # a damaged record (json errors are ValueErrors) or .npy header
        return None
    size_ok = store_path.stat().st_size == store.offset + int(np.prod(shape))
    if store.shape != shape or not size_ok:
        return None
    # rows damaged in place keep the size: sampled rows must still hash as when they were written
    # (a cache from before the sample digest existed is trusted as before)
    expected = record.get("sample_digest")
    if expected is not None and expected != _sample_digest(store):
        log.warning("%s does not hold the images it was decoded from (damaged since); decoding again", store_path)
        return None
    return store, record


def _sample_digest(store: RowFile, count: int = SAMPLED_ROWS) -> str:
    """Hash of `count` rows spread evenly over the store (the first and last included): cheap to check
    on every reuse, and any damage to a sampled row (or a rewrite of the whole file) changes it."""
    rows = np.unique(np.linspace(0, store.shape[0] - 1, num=min(count, store.shape[0])).round().astype(np.int64))
    return hashlib.sha256(store[rows].tobytes()).hexdigest()[:16]


def _fill(files: list[Path], size: int, path: Path, workers: int, chunk: int, quiet: bool) -> dict:
    """Decode every file into the .npy at `path`; the record of unreadable rows and the pixel digest."""
    need = len(files) * image_bytes(size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        raise DataError(f"{path.parent}: cannot use as data.cache_dir ({e})") from None
    if free < need:
        raise DataError(f"{path.parent}: {need / 2**30:.1f} GB needed to cache the decoded images, "
                        f"{free / 2**30:.1f} GB free; set data.cache_dir to a larger disk or lower data.image_size")
    log.info("decoding %d images once into %s (%.1f GB)", len(files), path, need / 2**30)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest, unreadable = hashlib.sha256(), []
    black = np.zeros((3, size, size), np.uint8)
    try:
        with open(temporary, "xb") as out, progress(len(files), "decoding images", quiet) as bar:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (len(files), 3, size, size)}
            np.lib.format.write_array_header_1_0(out, header)
            for start in range(0, len(files), chunk):   # written in order: plain appends, no memory map
                for offset, img in enumerate(decode_images(files[start:start + chunk], size, workers, bar)):
                    if img is None:
                        unreadable.append(start + offset)
                        out.write(black.tobytes())
                        continue
                    chw = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
                    out.write(chw)
                    digest.update(chw)   # readable rows in order: the bytes of the in-memory tensor
        os.replace(temporary, path)
    finally:
        if temporary.exists():   # only ever our own temporary file
            temporary.unlink()
    return {"version": CACHE_VERSION, "unreadable": unreadable, "digest": digest.hexdigest()[:16]}
