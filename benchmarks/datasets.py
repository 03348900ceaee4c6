"""Real and generated image sets for benchmarking the default path (no config, no tuning).

Each builder writes what a user would hand to `scan run --data`: an `.npz` with `images`
(and `labels`, read only for scoring) or a folder of PNG files in one sub-folder per class.
Everything comes from packages that install offline: scikit-learn's digits, Debian's
Fashion-MNIST, scikit-image's photos and shape generator.

    python benchmarks/datasets.py OUT_DIR        # builds every set, prints their paths
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _fashion(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images drawn without replacement from the 60k Fashion-MNIST training split."""
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    pick = np.random.default_rng(seed).choice(len(images), count, replace=False)
    return images[pick], labels[pick]


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits, 0..16 grey levels stretched to 0..255."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64)


def fashion_5k() -> tuple[np.ndarray, np.ndarray]:
    return _fashion(5000, seed=1)


def fashion_20k() -> tuple[np.ndarray, np.ndarray]:
    return _fashion(20000, seed=2)


def fashion_tinted() -> tuple[np.ndarray, np.ndarray]:
    """5k Fashion-MNIST images on a random-coloured background with a random-coloured garment:
    colour carries no class information, so clustering on colour (as raw pixels do) is wrong."""
    grey, labels = _fashion(5000, seed=3)
    rng = np.random.default_rng(3)
    fg, bg = rng.uniform(0, 255, (2, len(grey), 1, 1, 3))
    alpha = grey[..., None] / 255.0
    return (alpha * fg + (1 - alpha) * bg).round().astype(np.uint8), labels


def shapes() -> tuple[np.ndarray, np.ndarray]:
    """3,000 32x32 colour images of one random shape each (circle, rectangle, triangle, ellipse),
    random colour, size and place on a white background: the class is the shape."""
    from skimage.draw import random_shapes
    kinds = ("circle", "rectangle", "triangle", "ellipse")
    rng = np.random.default_rng(4)
    images, labels = [], []
    for i in range(3000):
        k = i % len(kinds)
        img, _ = random_shapes((32, 32), max_shapes=1, min_shapes=1, shape=kinds[k], min_size=12, max_size=28,
                               rng=int(rng.integers(2**31)), num_channels=3)
        images.append(img)
        labels.append(k)
    return np.stack(images).astype(np.uint8), np.array(labels, np.int64)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "brick", "grass", "gravel", "moon")


def photo_patches(root: Path) -> Path:
    """A folder of 2,000 PNG patches (64x64, random position and scale) cut from 10 scikit-image
    photos, one sub-folder per photo: the class is the photo a patch comes from."""
    from PIL import Image
    from skimage import data
    folder = root / "photo-patches"
    if folder.exists():
        return folder
    rng = np.random.default_rng(5)
    for name in PHOTOS:
        photo = getattr(data, name)()
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        (folder / name).mkdir(parents=True)
        h, w = photo.shape[:2]
        for j in range(200):
            side = int(rng.integers(min(h, w) // 6, min(h, w) // 2))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((64, 64), Image.BILINEAR)
            patch.save(folder / name / f"{j:03d}.png")
    return folder


def _classes(images: np.ndarray, labels: np.ndarray, keep) -> tuple[np.ndarray, np.ndarray]:
    """The images of the classes in `keep`, relabelled 0..len(keep)-1 in that order."""
    rows = np.isin(labels, keep)
    return images[rows], np.searchsorted(np.sort(keep), labels[rows])


def _long_tailed(images: np.ndarray, labels: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k keeps a share ratio**(-k / (C-1)) of its images: sizes in a geometric progression from all of
    the first class down to 1/ratio of the last (the long tail of a real photo folder)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    rows = []
    for k in classes:
        members = np.flatnonzero(labels == k)
        keep = max(2, round(len(members) * ratio ** (-k / (len(classes) - 1))))
        rows.append(rng.choice(members, keep, replace=False))
    rows = np.sort(np.concatenate(rows))
    return images[rows], labels[rows]


def digits_3() -> tuple[np.ndarray, np.ndarray]:
    """Digits 0, 4 and 7 only (537 images): few kinds."""
    return _classes(*digits(), np.array([0, 4, 7]))


def digits_5() -> tuple[np.ndarray, np.ndarray]:
    """Digits 1, 2, 3, 5 and 8 (903 images): five kinds, some alike (3, 5, 8)."""
    return _classes(*digits(), np.array([1, 2, 3, 5, 8]))


def fashion_2k() -> tuple[np.ndarray, np.ndarray]:
    return _fashion(2000, seed=6)


def digits_fashion_20() -> tuple[np.ndarray, np.ndarray]:
    """20 kinds: the 1,797 digits (upscaled to 28x28) and 2,000 Fashion-MNIST images (classes 10..19)."""
    from PIL import Image
    small, digit_labels = digits()
    big = np.stack([np.asarray(Image.fromarray(d).resize((28, 28), Image.BILINEAR)) for d in small])
    garments, garment_labels = _fashion(2000, seed=7)
    return np.concatenate([big, garments]), np.concatenate([digit_labels, garment_labels + 10])


def fashion_long_tailed() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST with class sizes from 500 down to 50 (10:1, geometric; 2,000 images in all)."""
    return _long_tailed(*_fashion(5000, seed=8), ratio=10, seed=8)


def digits_long_tailed() -> tuple[np.ndarray, np.ndarray]:
    """The digits with class sizes from ~180 down to ~18 (10:1, geometric; ~700 images)."""
    return _long_tailed(*digits(), ratio=10, seed=9)


NPZ_SETS = {"digits": digits, "fashion-5k": fashion_5k, "fashion-20k": fashion_20k,
            "fashion-tinted": fashion_tinted, "shapes": shapes, "digits-3": digits_3, "digits-5": digits_5,
            "fashion-2k": fashion_2k, "digits-fashion-20": digits_fashion_20,
            "fashion-long-tailed": fashion_long_tailed, "digits-long-tailed": digits_long_tailed}


def build(root: Path, names=None) -> dict[str, Path]:
    """Write every (or the named) data set under `root` once; return name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, make in NPZ_SETS.items():
        if names and name not in names:
            continue
        path = root / f"{name}.npz"
        if not path.exists():
            images, labels = make()
            np.savez(path, images=images, labels=labels)
        out[name] = path
    if not names or "photo-patches" in names:
        out["photo-patches"] = photo_patches(root)
    return out


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-data")).items():
        print(name, path)
