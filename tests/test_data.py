"""Data loaders: tiny files written in each exact on-disk format, plus the built-in digits."""
import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import cifar_rows, write_idx, write_pickle
from PIL import Image

from scan import data
from scan.data import DataError, ImageDataset, imagefiles, list_datasets, load_dataset
from scan.data import formats as data_formats
from scan.use.images_in import load_image_paths

FASHION = Path(data.FASHION_MNIST_PATH)


# ----------------------------------------------------------------------------- writers

def save_image(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == "P":
        img = img.quantize()  # exact palette (convert("P") would snap colours to the web palette)
    elif mode:
        img = img.convert(mode)
    img.save(path, **kwargs)
    return path


def solid(color, size=(12, 10)) -> np.ndarray:
    return np.full((size[1], size[0], 3), color, dtype=np.uint8)


# ----------------------------------------------------------------------------- registry and dataset

def test_registry_lists_every_format_and_rejects_unknown_names():
    assert set(list_datasets()) == {"digits", "fashion-mnist", "mnist", "idx", "cifar10", "cifar100-20",
                                    "stl10", "folder", "npz", "imagenet", "imagenet50", "imagenet100", "imagenet200",
                                    "imagenet10", "imagenet-dogs15"}
    with pytest.raises(DataError, match=r"unknown dataset 'tinyimagenet'.*cifar10.*stl10"):
        load_dataset("tinyimagenet")


def test_unsupported_split_is_a_data_error():
    with pytest.raises(DataError, match="digits has no split 'validation'"):
        load_dataset("digits", split="validation")


def test_subset_copies_and_keeps_metadata():
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    ds = ImageDataset(images, np.array([0, 1, 2, 1]), ["a", "b", "c"], paths=["p0", "p1", "p2", "p3"])
    assert ds.images.is_contiguous()
    sub = ds.subset([3, 1])
    assert sub.images[:, 0, 0, 0].tolist() == [3, 1]
    assert sub.labels.tolist() == [1, 1] and sub.paths == ["p3", "p1"] and sub.num_classes == 3
    assert ds.subset(torch.tensor([True, False, True, False])).labels.tolist() == [0, 2]
    assert len(ds.subset(slice(1, 3))) == 2 and len(ds) == 4  # original untouched
    sub.class_names.append("d")
    assert ds.class_names == ["a", "b", "c"]


def test_num_classes_falls_back_to_labels_then_none():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    assert ImageDataset(images, np.array([0, 4, 1]), None).num_classes == 5
    assert ImageDataset(images, None, None).num_classes is None


# ----------------------------------------------------------------------------- digits

def test_digits_fixed_stratified_split():
    from sklearn.datasets import load_digits

    train, val, full = (load_dataset("digits", split=s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (1437, 360, 1797)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.class_names == [str(d) for d in range(10)]
    # 0..16 scaled to 0..255, order of the original data kept for "all".
    raw = load_digits()
    assert torch.equal(full.images[:, 0], torch.from_numpy(np.rint(raw.images * 255 / 16).astype(np.uint8)))
    assert np.array_equal(full.labels, raw.target)
    # train and val partition the data (as multisets of image+label rows).
    def rows(ds):
        return sorted(img.tobytes() + bytes([label]) for img, label in zip(ds.images.numpy(), ds.labels))
    assert sorted(rows(train) + rows(val)) == rows(full)
    # stratified: every class is ~20 % of its images in val.
    assert np.all(np.abs(np.bincount(val.labels) - 0.2 * np.bincount(full.labels)) <= 1)
    # same held-out set whatever the seed
    again = load_dataset("digits", split="test", seed=123)
    assert torch.equal(again.images, val.images) and np.array_equal(again.labels, val.labels)


def test_digits_rejects_a_path(tmp_path):
    with pytest.raises(DataError, match="digits is built in"):
        load_dataset("digits", path=str(tmp_path))


# ----------------------------------------------------------------------------- IDX / MNIST family

@pytest.fixture
def idx_dir(tmp_path):
    """train (3 images) gzipped with -idx3-ubyte names; t10k (2 images) plain with .idx3-ubyte names."""
    root = tmp_path / "idx"
    root.mkdir()
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (3, 5, 4)), rng.integers(0, 256, (2, 5, 4))
    write_idx(root / "train-images-idx3-ubyte.gz", train, 2051)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.array([4, 0, 9]), 2049)
    write_idx(root / "t10k-images.idx3-ubyte", test, 2051)
    write_idx(root / "t10k-labels.idx1-ubyte", np.array([1, 2]), 2049)
    return root, train, test


def test_idx_splits_gz_and_plain(idx_dir):
    root, train, test = idx_dir
    ds = load_dataset("idx", str(root))
    assert ds.images.shape == (3, 1, 5, 4) and np.array_equal(ds.images[:, 0].numpy(), train)
    assert ds.labels.tolist() == [4, 0, 9] and ds.class_names is None and ds.num_classes == 10
    held_out = load_dataset("mnist", str(root), split="val")
    assert np.array_equal(held_out.images[:, 0].numpy(), test) and held_out.class_names[9] == "9"
    both = load_dataset("idx", str(root), split="all")
    assert both.labels.tolist() == [4, 0, 9, 1, 2] and np.array_equal(both.images[3:, 0].numpy(), test)


def test_idx_bad_magic_and_truncation_name_the_file(idx_dir):
    root, train, _ = idx_dir
    write_idx(root / "t10k-images.idx3-ubyte", train, 2049)
    with pytest.raises(DataError, match=r"t10k-images\.idx3-ubyte: not an IDX file .*magic number 2049, expected 2051"):
        load_dataset("idx", str(root), split="test")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: cannot read"):
        load_dataset("idx", str(root))
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        load_dataset("idx", str(root))


def test_idx_label_count_mismatch_and_missing_files(idx_dir):
    root, _, _ = idx_dir
    write_idx(root / "t10k-labels.idx1-ubyte", np.array([1, 2, 3]), 2049)
    with pytest.raises(DataError, match="3 labels for 2 images"):
        load_dataset("idx", str(root), split="test")
    (root / "t10k-labels.idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("idx", str(root), split="test")


def test_fashion_mnist_missing_default_path_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data_formats, "FASHION_MNIST_PATH", str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"absent does not exist.*apt-get install dataset-fashion-mnist.*--data PATH"):
        load_dataset("fashion-mnist")
    with pytest.raises(DataError, match="IDX needs a data location"):
        load_dataset("idx")


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files():
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.class_names[0] == "T-shirt/top" and train.num_classes == 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR

@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {"data_batch_1": cifar_rows(2, 1), "data_batch_2": cifar_rows(3, 2), "test_batch": cifar_rows(2, 3)}
    labels = {"data_batch_1": [3, 7], "data_batch_2": [0, 1, 9], "test_batch": [5, 5]}
    for name, rows in batches.items():
        write_pickle(folder / name, {b"batch_label": name.encode(), b"data": rows, b"labels": labels[name],
                                     b"filenames": [b"x.png"] * len(rows)})
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                  "dog", "frog", "horse", "ship", "truck")]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder.parent, batches


def test_cifar10_pixel_layout_and_labels(cifar10_root):
    root, batches = cifar10_root
    ds = load_dataset("cifar10", str(root))  # parent folder of cifar-10-batches-py
    assert ds.images.shape == (5, 3, 32, 32) and ds.labels.tolist() == [3, 7, 0, 1, 9]
    assert ds.class_names[3] == "cat"
    # Row layout: 1024 red, then 1024 green, then 1024 blue bytes, each plane row-major 32x32.
    row = batches["data_batch_2"][1]
    assert ds.images[3, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]
    assert ds.images[3, 2, 31, 0].item() == row[2048 + 31 * 32]
    test = load_dataset("cifar10", str(root / "cifar-10-batches-py"), split="val")
    assert test.labels.tolist() == [5, 5] and test.images[1, 0, 0, 1].item() == batches["test_batch"][1][1]
    assert len(load_dataset("cifar10", str(root), split="all")) == 7


def test_cifar_refuses_code_in_pickles_and_names_corrupt_files(cifar10_root):
    root, _ = cifar10_root
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({b"data": Path("evil")}, f)  # any non-numpy global must be refused
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR .*refusing to load pathlib"):
        load_dataset("cifar10", str(root))
    batch.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR"):
        load_dataset("cifar10", str(root))
    write_pickle(batch, {b"data": cifar_rows(2, 0)})
    with pytest.raises(DataError, match=r"data_batch_2: missing key b'labels'"):
        load_dataset("cifar10", str(root))


def test_cifar10_wrong_folder_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r"not a CIFAR-10 folder \(expected batches\.meta .*cifar-10-batches-py/"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_uses_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = cifar_rows(3, 4)
    write_pickle(folder / "train", {b"data": rows, b"fine_labels": [50, 99, 0], b"coarse_labels": [19, 4, 0]})
    write_pickle(folder / "test", {b"data": rows[:1], b"fine_labels": [7], b"coarse_labels": [2]})
    coarse = [f"super{i}".encode() for i in range(20)]
    write_pickle(folder / "meta", {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": coarse})
    ds = load_dataset("cifar100-20", str(tmp_path))
    assert ds.labels.tolist() == [19, 4, 0] and ds.num_classes == 20 and ds.class_names[19] == "super19"
    assert ds.images[2, 2, 1, 0].item() == rows[2][2048 + 32]
    assert load_dataset("cifar100-20", str(folder), split="test").labels.tolist() == [2]


# ----------------------------------------------------------------------------- STL-10

@pytest.fixture
def stl_root(tmp_path):
    """Images whose value encodes (image, channel, row, col) asymmetrically, stored column-major."""
    folder = tmp_path / "stl" / "stl10_binary"
    folder.mkdir(parents=True)
    n, c, y, x = np.meshgrid(np.arange(2), np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    images = ((n * 50 + c * 7 + y * 2 + x) % 256).astype(np.uint8)
    (folder / "train_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # column-major planes
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_X.bin").write_bytes(images[:1].transpose(0, 1, 3, 2).tobytes())
    (folder / "test_y.bin").write_bytes(bytes([4]))
    (folder / "unlabeled_X.bin").write_bytes(images[::-1].transpose(0, 1, 3, 2).tobytes())
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer",
                                                       "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return folder.parent, images


def test_stl10_column_major_and_splits(stl_root):
    root, images = stl_root
    train = load_dataset("stl10", str(root))
    assert torch.equal(train.images, torch.from_numpy(images))
    assert train.images[0, 0, 0, 1].item() == 1 and train.images[0, 0, 1, 0].item() == 2
    assert train.labels.tolist() == [0, 9] and train.class_names[7] == "monkey"
    assert load_dataset("stl10", str(root / "stl10_binary"), split="test").labels.tolist() == [3]
    unlabeled = load_dataset("stl10", str(root), split="unlabeled")
    assert unlabeled.labels is None and torch.equal(unlabeled.images[0], train.images[1])
    both = load_dataset("stl10", str(root), split="train+unlabeled")
    assert len(both) == 4 and both.labels is None
    assert load_dataset("stl10", str(root), split="all").labels.tolist() == [0, 9, 3]


def test_stl10_bad_sizes_name_the_file(stl_root):
    root, _ = stl_root
    folder = root / "stl10_binary"
    (folder / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match=r"test_X\.bin: 1000 bytes is not a whole number"):
        load_dataset("stl10", str(root), split="test")
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match=r"train_y\.bin: 3 labels for the 2 images"):
        load_dataset("stl10", str(root))
    (folder / "train_y.bin").write_bytes(bytes([0, 2]))
    with pytest.raises(DataError, match=r"train_y\.bin: labels must be 1\.\.10, found 0\.\.2"):
        load_dataset("stl10", str(root))


# ----------------------------------------------------------------------------- npz

@pytest.mark.parametrize("shape, channels", [((4, 6, 5), 1), ((4, 6, 5, 1), 1), ((4, 6, 5, 3), 3), ((4, 6, 5, 4), 3)])
def test_npz_layouts(tmp_path, shape, channels):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=np.array([0, 2, 1, 2]), class_names=np.array(["a", "b", "c"]))
    ds = load_dataset("npz", str(tmp_path / "x.npz"), split="val")  # no split concept: all images
    assert ds.images.shape == (4, channels, 6, 5) and ds.class_names == ["a", "b", "c"]
    pixels = images if images.ndim == 3 else images[..., :3].transpose(0, 3, 1, 2)
    assert np.array_equal(ds.images.numpy().reshape(pixels.shape), pixels)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 2, 1, 2]


def test_npz_unlabeled(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 3, 3), np.uint8))
    ds = load_dataset("auto", str(tmp_path / "x.npz"))
    assert ds.labels is None and ds.num_classes is None


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 3, 3), np.float32)}, r"'images' must be uint8 .*found float32"),
    ({"images": np.zeros((2, 3, 3, 2), np.uint8)}, r"'images' has shape \(2, 3, 3, 2\)"),
    ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(3, int)}, "'labels' has length 3 but 'images' has 2"),
    ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(2)}, "'labels' must be a 1-D integer array"),
    ({"images": np.zeros((2, 3, 3), np.uint8), "labels": np.array([0, 2]), "class_names": np.array(["a", "b"])},
     "label 2 has no entry in 'class_names'"),
    ({"pixels": np.zeros((2, 3, 3), np.uint8)}, "no 'images' array"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"bad\.npz: " + message):
        load_dataset("npz", str(tmp_path / "bad.npz"))


def test_npz_unreadable_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DataError, match=r"bad\.npz: not a readable \.npz file"):
        load_dataset("npz", str(tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- image folders

@pytest.fixture
def class_folder(tmp_path):
    """Two classes in mixed formats and modes, a text file and a truncated PNG."""
    root = tmp_path / "imgs"
    save_image(root / "cats" / "a.png", solid((200, 10, 10)))
    save_image(root / "cats" / "b.jpg", solid((10, 200, 10)), quality=95)
    save_image(root / "cats" / "deep" / "c.png", solid((90, 90, 90)), mode="L")  # grey, nested
    save_image(root / "dogs" / "d.png", np.dstack([solid((10, 10, 200)), np.full((10, 12), 128, np.uint8)]))
    save_image(root / "dogs" / "e.bmp", solid((60, 70, 80)), mode="P")  # exact: one-colour palette
    (root / "dogs" / "notes.txt").write_text("not an image")
    good = save_image(root / "dogs" / "f.png", np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    (root / "dogs" / "g.png").write_bytes(good.read_bytes()[:200])  # truncated
    (root / ".hidden.png").write_bytes(b"ignored entirely")
    return root


def test_folder_with_classes_skips_unreadable_files(class_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        ds = load_dataset("folder", str(class_folder), image_size=8)
    assert ds.images.shape == (6, 3, 8, 8) and ds.images.dtype == torch.uint8
    names = [Path(p).relative_to(class_folder).as_posix() for p in ds.paths]
    assert names == ["cats/a.png", "cats/b.jpg", "cats/deep/c.png", "dogs/d.png", "dogs/e.bmp", "dogs/f.png"]
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    px = ds.images[:, :, 4, 4].tolist()
    assert px[0] == [200, 10, 10] and px[2] == [90, 90, 90] and px[3] == [10, 10, 200] and px[4] == [60, 70, 80]
    assert max(abs(a - b) for a, b in zip(px[1], [10, 200, 10])) <= 3  # JPEG is lossy
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 of 8 files" in warnings[0]
    assert "notes.txt" in warnings[0] and "g.png" in warnings[0]


def test_folder_labels_only_when_wanted_and_meaningful(class_folder, tmp_path):
    assert load_dataset("folder", str(class_folder), image_size=4, labels_from_folders=False).labels is None
    one_class = tmp_path / "one"
    save_image(one_class / "only" / "x.png", solid((1, 2, 3)))
    save_image(one_class / "only" / "y.png", solid((1, 2, 3)))
    assert load_dataset("folder", str(one_class)).labels is None


def test_flat_folder_resize_and_centre_crop(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:50] = (0, 255, 0)
    wide[:, 50:] = (0, 0, 255)
    save_image(tmp_path / "wide.png", wide)
    save_image(tmp_path / "tall.tif", np.full((30, 10, 3), 77, np.uint8))
    ds = load_dataset("auto", str(tmp_path), image_size=10)
    assert ds.labels is None and ds.class_names is None and ds.images.shape == (2, 3, 10, 10)
    # shorter side 20 -> 10 px (width 30), centre 10 columns = original 20..40: green only, no red/blue.
    assert (ds.images[1, 1] == 255).all() and (ds.images[1, 0] == 0).all() and (ds.images[1, 2] == 0).all()
    assert (ds.images[0] == 77).all()
    assert load_dataset("folder", str(tmp_path)).images.shape[-1] == data.DEFAULT_IMAGE_SIZE


def test_folder_sixteen_bit_grey_is_rescaled(tmp_path):
    save_image(tmp_path / "deep.png", np.full((6, 6), 65535, np.uint16))
    save_image(tmp_path / "mid.png", np.full((6, 6), 32896, np.uint16))
    ds = load_dataset("folder", str(tmp_path), image_size=4)
    assert ds.images[0].unique().tolist() == [255] and ds.images[1].unique().tolist() == [128]


def test_folder_skips_decompression_bombs(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(imagefiles, "MAX_IMAGE_PIXELS", 200)
    save_image(tmp_path / "ok.png", solid((5, 5, 5), (10, 10)))        # 100 px
    save_image(tmp_path / "warn.png", solid((5, 5, 5), (15, 15)))      # 225 px: Pillow's warning zone
    save_image(tmp_path / "huge.png", solid((5, 5, 5), (30, 30)))      # 900 px: Pillow's error zone
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        ds = load_dataset("folder", str(tmp_path), image_size=4)
    assert [Path(p).name for p in ds.paths] == ["ok.png"] and "skipped 2 of 3" in caplog.text
    assert "2 of them over the pixel limit of 200 pixels" in caplog.text   # why, and how to raise it
    assert Image.MAX_IMAGE_PIXELS != 200  # the global limit is restored afterwards
    with pytest.raises(DataError, match=r"huge.png: 30x30 is over the pixel limit of 200 pixels .*MAX_IMAGE_PIXELS"):
        load_image_paths([tmp_path / "huge.png"], [3, 4, 4])   # scan predict on the file itself


def test_folder_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: folder is empty"):
        load_dataset("folder", str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"junk: none of the 2 files is a readable image"):
        load_dataset("folder", str(tmp_path / "junk"))
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        load_dataset("folder", str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- auto detection

def test_auto_detects_formats(idx_dir, cifar10_root, stl_root):
    assert data.detect_format(idx_dir[0]) == "idx"
    assert data.detect_format(cifar10_root[0]) == "cifar10"
    assert data.detect_format(stl_root[0] / "stl10_binary") == "stl10"
    assert len(load_dataset("auto", str(idx_dir[0]), split="test")) == 2


def test_auto_rejects_unusable_paths(tmp_path):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file"):
        load_dataset("auto", str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match=r"missing does not exist"):
        load_dataset("auto", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="'auto' needs a data location"):
        load_dataset("auto")


def test_splitless_formats_are_known(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 4, 4), np.uint8))
    assert not data.has_splits("npz", None) and not data.has_splits("auto", str(tmp_path / "x.npz"))
    assert not data.has_splits("folder", None)
    assert data.has_splits("cifar10", None) and data.has_splits("digits", None)


def test_channel_stats_in_chunks_match_one_pass():
    """The normalisation statistics of a sample too big for one float tensor (ImageNet at 224 px)
    come from exact integer sums in chunks and equal the one-pass float32 values."""
    from scan.data import channel_stats
    images = torch.zeros(4, 2, 1, 2, dtype=torch.uint8)
    images[:, 0] = torch.tensor([[0, 255]], dtype=torch.uint8)      # channel 0: half 0, half 1
    images[:, 1] = 51                                                 # channel 1: constant 0.2
    rows = torch.arange(4)
    for budget in (2 ** 26, 4):   # one pass, then chunks of one image (4 values each)
        mean, std = channel_stats(images, rows, max_values=budget)
        # channel 0: eight values, four 0 and four 1: mean 0.5, unbiased var = 8 * 0.25 / 7
        assert mean.tolist() == pytest.approx([0.5, 0.2], abs=1e-7)
        assert std.tolist() == pytest.approx([(2 / 7) ** 0.5, 0.0], abs=1e-6)


def test_labels_from_folders_on_a_flat_folder_warns_that_there_are_none(tmp_path, caplog):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", solid((i, i, i), (6, 6)))
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        ds = load_dataset("folder", str(tmp_path), image_size=4, labels_from_folders=True)
    assert ds.labels is None
    assert "--labels-from-folders found 0 class subfolder(s) and 3 image(s) outside them" in caplog.text
