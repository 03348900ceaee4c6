"""Reading image files: listing a folder and decoding any file Pillow reads to an RGB crop.

Shared by image folders, ImageNet-style trees (decoded lazily) and `scan predict`, so new
images are preprocessed exactly like training ones. Anything that is not a regular file (a
FIFO, a device, a socket named *.png) is skipped without being opened for a blocking read.
HEIC/HEIF photos (phones) are read when the optional `pillow-heif` plugin is installed
(`pip install 'scan-clustering[heif]'`); without it they are skipped like any unreadable file.
"""
from __future__ import annotations

import os
import stat
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}) | HEIF_EXTENSIONS
MAX_IMAGE_PIXELS = 50_000_000    # ~7000 x 7000: far above useful inputs, stops decompression bombs


@contextmanager
def _decompression_bomb_guard() -> Iterator[None]:
    """Make Pillow refuse images above MAX_IMAGE_PIXELS (its warning becomes an error to skip on).

    Set in the calling thread around the whole pool: the warning filters are process-wide, so
    workers see them without each one racing to install and restore them.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@lru_cache(maxsize=None)
def heif_available() -> bool:
    """Register the pillow-heif plugin with Pillow (once); False when it is not installed.

    Registered at decode time rather than at import, so importing scan never pays for it.
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) as 8-bit RGB, alpha dropped."""
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow's own conversion clips high-bit-depth values at 255; rescale a 16-bit range instead.
        values = np.asarray(img, dtype=np.float32)
        if values.size and values.max() > 255:
            values = values * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when a transparent palette goes straight to RGB
    return img.convert("RGB")


def _open_regular(file: Path):
    """A binary file object for `file`, or None when it is not a regular file.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is
    then checked on the open descriptor, so the file cannot be swapped in between.
    """
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _decode(file: Path, size: int) -> np.ndarray | None:
    """(size, size, 3) uint8: shorter side resized to `size`, centre crop. None if unreadable.

    MemoryError is not "unreadable": it propagates, so that running out of memory is reported
    as such rather than as a folder of broken files.
    """
    try:
        handle = _open_regular(file)
        if handle is None:
            return None
        with handle, Image.open(handle) as img:
            img.draft(None, (size, size))  # JPEG: let the decoder downscale by 2^k, still >= size
            img = _to_rgb(ImageOps.exif_transpose(img))
            side = min(img.size)
            left, top = (img.width - side) / 2, (img.height - side) / 2
            img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                             reducing_gap=3.0)
            return np.asarray(img, dtype=np.uint8)
    except MemoryError:
        raise
    except Exception:  # truncated/corrupt/bomb files raise many types; one bad file must not stop the load
        return None


def over_pixel_limit(file: Path) -> tuple[int, int] | None:
    """(width, height) when `file` is an image larger than MAX_IMAGE_PIXELS (refused as a possible
    decompression bomb), else None. Reads the header only; for saying why a file was skipped."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None   # only the size is read here; no pixels are decoded
    try:
        handle = _open_regular(file)
        if handle is None:
            return None
        with handle, Image.open(handle) as img:
            return img.size if img.width * img.height > MAX_IMAGE_PIXELS else None
    except Exception:   # not an image at all: the plain "not readable" says it
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def pixel_limit_hint(files: list[Path]) -> str:
    """'; 2 of them over the pixel limit ...' for the skipped files that are too large, else ''."""
    large = [f for f in files if over_pixel_limit(f)]
    if not large:
        return ""
    return (f"; {len(large)} of them over the pixel limit of {MAX_IMAGE_PIXELS:,} pixels (raise "
            f"scan.data.imagefiles.MAX_IMAGE_PIXELS, or downscale them)")


def decode_images(files: list[Path], size: int, workers: int = 0, bar=None) -> list[np.ndarray | None]:
    """Each file as a (size, size, 3) uint8 RGB crop (see `_decode`), None where unreadable, in order.

    `workers` threads decode (0: the pool's default, about one per core + 4): Pillow releases the
    GIL while decoding, so threads scale without copying images between processes. `bar` (a tqdm
    bar, see `progress`) advances by one per image. Public so that new images are preprocessed
    exactly like a training folder (scan predict).
    """
    return _map_files(lambda f: _decode(f, size), files, workers, bar)


def probe_images(files: list[Path], workers: int = 0, bar=None) -> list[bool]:
    """Whether Pillow recognises each file as an image, from its header only (no pixels decoded).

    What decoding on demand can check up front; a file truncated after its header still passes.
    """
    def probe(file: Path) -> bool:
        try:
            handle = _open_regular(file)
            if handle is None:
                return False
            with handle, Image.open(handle) as img:
                return min(img.size) > 0
        except MemoryError:
            raise
        except Exception:  # same reasoning as _decode: any failure means "not an image"
            return False
    return _map_files(probe, files, workers, bar)


def _map_files(fn, files: list[Path], workers: int, bar) -> list:
    """fn(file) for every file on a thread pool, results in file order; `bar` counts finished files."""
    if any(Path(f).suffix.lower() in HEIF_EXTENSIONS for f in files):
        heif_available()
    results = []
    with _decompression_bomb_guard(), ThreadPoolExecutor(workers or None) as pool:
        for result in pool.map(fn, files):   # main thread only: the bar needs no lock
            results.append(result)
            if bar is not None:
                bar.update(1)
    return results


def progress(total: int, desc: str, quiet: bool):
    """A bar on stderr counting images, with rate and time left; silent when `quiet`."""
    from tqdm.auto import tqdm  # imported here: predict decodes a few files and needs no bar
    return tqdm(total=total, desc=desc, unit="img", disable=quiet, leave=False, file=sys.stderr,
                mininterval=0.5, smoothing=0.1)


def list_files(root: Path) -> list[Path]:
    """All files under root, recursively, sorted for a deterministic order; hidden entries ignored."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)
