"""Fuzz-style test: the folder loader survives a zoo of broken and unusual files."""
import io
import logging
import os
import random
import re
import threading

import numpy as np
import pytest
from PIL import Image

from scan.data import DataError, imagefiles, load_dataset
from scan.data.imagefiles import decode_images


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _rgb(rng, size=(24, 18)):
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# Files that must load: (name suffix, bytes maker). Each maker gets a numpy Generator.
GOOD = {
    "rgb.png": lambda r: _png_bytes(_rgb(r)),
    "rgb.jpg": lambda r: _png_bytes(_rgb(r), format="JPEG"),
    "grey.png": lambda r: _png_bytes(_rgb(r).convert("L")),
    "rgba.png": lambda r: _png_bytes(_rgb(r).convert("RGBA")),
    "palette.png": lambda r: _png_bytes(_rgb(r).convert("P")),
    "palette_transparent.png": lambda r: _png_bytes(_rgb(r).convert("P"), transparency=0),
    "sixteen_bit.png": lambda r: _png_bytes(Image.fromarray(r.integers(0, 65536, (12, 12), dtype=np.uint16))),
    "cmyk.jpg": lambda r: _png_bytes(_rgb(r).convert("CMYK"), format="JPEG"),
    "cmyk.tif": lambda r: _png_bytes(_rgb(r).convert("CMYK"), format="TIFF"),
    "one_pixel.bmp": lambda r: _png_bytes(_rgb(r, (1, 1)), format="BMP"),
    "very_wide.png": lambda r: _png_bytes(_rgb(r, (300, 2))),
    "lossless.webp": lambda r: _png_bytes(_rgb(r), format="WEBP", lossless=True),
    "animated.png": lambda r: _png_bytes(_rgb(r), save_all=True, append_images=[_rgb(r)], duration=50),
    "animated.webp": lambda r: _png_bytes(_rgb(r), format="WEBP", save_all=True, append_images=[_rgb(r)]),
}

# Files that must be skipped and counted.
BAD = {
    "zero_bytes.png": lambda r: b"",
    "truncated.jpg": lambda r: _png_bytes(_rgb(r, (64, 64)), format="JPEG")[:300],
    "truncated.png": lambda r: _png_bytes(_rgb(r, (64, 64)))[:100],
    "text_named.jpg": lambda r: b"this is not an image\n" * 10,
    "random_bytes.png": lambda r: r.integers(0, 256, 500, dtype=np.uint8).tobytes(),
    "png_header_only.png": lambda r: b"\x89PNG\r\n\x1a\n",
    "bomb.png": lambda r: _png_bytes(Image.new("1", (400, 400))),  # above the test's pixel limit
    "notes.txt": lambda r: b"a note",
    "table.csv": lambda r: b"1,2,3\n",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folder_loader_survives_a_zoo_of_broken_and_unusual_files(tmp_path, monkeypatch, caplog, seed):
    monkeypatch.setattr(imagefiles, "MAX_IMAGE_PIXELS", 100_000)  # so a small file can play the bomb
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    root = tmp_path / "zoo"
    expected_good, expected_bad = [], []
    for i in range(40):
        table = GOOD if pick.random() < 0.6 else BAD
        suffix = pick.choice(sorted(table))
        folder = root / pick.choice(["", "a", "a/b", "c"])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:02d}_{suffix}"
        path.write_bytes(table[suffix](rng))
        (expected_good if table is GOOD else expected_bad).append(path)
    # links: a loop between two names, a dangling link and a folder linking to its parent
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    os.symlink(root / "missing.png", root / "dangling.png")
    expected_bad += [root / "loop_a.png", root / "loop_b.png", root / "dangling.png"]
    (root / "a").mkdir(exist_ok=True)
    os.symlink(root, root / "a" / "up")  # a symlink loop through folders must not be walked forever
    # unreadable permissions (root can still read it, and then it is simply a good image)
    locked = root / "locked.png"
    locked.write_bytes(GOOD["rgb.png"](rng))
    locked.chmod(0)
    (expected_good if os.access(locked, os.R_OK) else expected_bad).append(locked)

    with caplog.at_level(logging.WARNING, logger="scan.data"):
        ds = load_dataset("folder", str(root), image_size=16)

    assert sorted(ds.paths) == sorted(str(p) for p in expected_good)
    assert ds.images.shape == (len(expected_good), 3, 16, 16)
    if expected_bad:
        counts = re.findall(r"skipped (\d+) of (\d+) files", caplog.text)
        assert counts == [(str(len(expected_bad)), str(len(expected_good) + len(expected_bad)))]


def test_good_zoo_members_decode_to_their_content(tmp_path):
    """Unusual modes are converted faithfully, not just survived: a flat colour stays that colour."""
    colour = (200, 40, 90)
    flat = Image.new("RGB", (20, 20), colour)
    files = {
        "cmyk.jpg": _png_bytes(flat.convert("CMYK"), format="JPEG", quality=100),
        "rgba.png": _png_bytes(flat.convert("RGBA")),
        "animated.png": _png_bytes(flat, save_all=True, append_images=[Image.new("RGB", (20, 20))], duration=50),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    ds = load_dataset("folder", str(tmp_path), image_size=8)
    for path, img in zip(ds.paths, ds.images):
        assert np.abs(img[:, 4, 4].numpy().astype(int) - colour).max() <= 6, path


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path, caplog):
    """Opening a FIFO for reading blocks until a writer comes: it must be skipped and counted."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(GOOD["rgb.png" if name.endswith("png") else "rgb.jpg"](rng))
    os.mkfifo(tmp_path / "pipe.png")
    result = {}
    worker = threading.Thread(target=lambda: result.update(ds=load_dataset("folder", str(tmp_path), image_size=8)),
                              daemon=True)
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        worker.start()
        worker.join(timeout=60)
    assert not worker.is_alive(), "the loader hangs on the FIFO"
    assert [os.path.basename(p) for p in result["ds"].paths] == ["a.png", "b.jpg"]
    assert "skipped 1 of 3 files" in caplog.text and "pipe.png" in caplog.text
    assert decode_images([tmp_path / "pipe.png"], 8) == [None]   # scan predict PIPE.png: unreadable, no hang


def test_running_out_of_memory_is_not_reported_as_unreadable_files(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(GOOD["rgb.png"](np.random.default_rng(0)))

    def no_memory(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(imagefiles.Image, "open", no_memory)
    with pytest.raises(DataError, match="out of memory while decoding 1 images") as info:
        load_dataset("folder", str(tmp_path), image_size=8)
    assert "readable" not in str(info.value)
