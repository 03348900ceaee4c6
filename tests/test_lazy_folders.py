"""Image folders bigger than memory: decode-once files, on-demand decoding with a bounded cache, HEIC."""
import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from scan.algo.baselines import pixel_kmeans
from scan.algo.neighbors import pixel_features
from scan.config import DataConfig
from scan.data import (
    DataError,
    FolderOptions,
    LazyImages,
    content_hash,
    imagefiles,
    lazy_images,
    load_data,
    load_dataset,
)
from scan.data.folders import FOLDER_STORAGE, budget_images
from scan.pipeline import load_config, open_run, run_pipeline
from scan.report import write_run_report
from scan.use.inference import finished_run

SIDE = 48                      # 3 * 48 * 48 = 6912 bytes a decoded image
BUDGET = 1                     # MB: 1048576 // 6912 = 151 decoded images, fewer than the folder's 300
BUDGET_IMAGES = 151


def write_folder(root, per_class=100, classes=("a", "b", "c")):
    """root/<class>/<i>.png|jpg of random noise (mixed formats and sizes), plus one broken file."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (12 + i % 5, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def eager(folder):
    return load_dataset("folder", str(folder), image_size=SIDE)


def lazy_options(tmp_path, **changes):
    return dataclasses.replace(FolderOptions("auto", BUDGET, str(tmp_path / "cache"), 2, True), **changes)


def load(folder, options):
    return load_dataset("folder", str(folder), image_size=SIDE, folder=options)


def test_budget_and_choices_worked_out_by_hand():
    assert budget_images(SIDE, FolderOptions(max_memory_mb=BUDGET)) == BUDGET_IMAGES
    assert budget_images(4096, FolderOptions(max_memory_mb=1)) == 1         # never zero
    field = {f.name: f for f in dataclasses.fields(DataConfig)}["cache_images"]
    assert sorted(field.metadata["choices"]) == sorted(["auto", *FOLDER_STORAGE.names()])


def test_small_folder_stays_one_tensor(folder, eager, tmp_path):
    assert isinstance(eager.images, torch.Tensor) and eager.images.shape == (300, 3, SIDE, SIDE)
    roomy = load(folder, lazy_options(tmp_path, max_memory_mb=3))           # 300 * 6912 bytes = 1.98 MB fit
    assert isinstance(roomy.images, torch.Tensor) and torch.equal(roomy.images, eager.images)
    assert not (tmp_path / "cache").exists()


def test_folder_over_budget_is_decoded_once_to_a_file_with_the_same_pixels_and_hash(folder, eager, tmp_path):
    ds = load(folder, lazy_options(tmp_path))
    assert isinstance(ds.images, LazyImages) and ds.images.store is not None
    assert ds.images.shape == eager.images.shape and len(ds) == 300
    assert ds.paths == eager.paths and ds.labels.tolist() == eager.labels.tolist()
    assert all("broken" not in p for p in ds.paths)
    assert torch.equal(ds.images[:], eager.images)
    index = torch.tensor([299, 0, 151, 0])
    assert torch.equal(ds.images[index], eager.images[index])
    assert torch.equal(ds.images[7], eager.images[7])
    assert content_hash(ds.images) == content_hash(eager.images)            # same data hash: no stage recomputes
    assert ds.images.peak_decoded == BUDGET_IMAGES                          # decoded 151 at a time
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    store = np.load(tmp_path / "cache" / files[1], mmap_mode="r")
    assert store.shape == (301, 3, SIDE, SIDE)                              # the broken file keeps a black row


def test_decode_once_file_is_reused_and_rebuilt_when_the_folder_changes(folder, tmp_path, monkeypatch):
    first = load(folder, lazy_options(tmp_path))
    monkeypatch.setattr(lazy_images, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    again = load(folder, lazy_options(tmp_path))
    assert content_hash(again.images) == content_hash(first.images)
    monkeypatch.undo()
    changed = tmp_path / "changed"
    write_folder(changed, per_class=60)
    before = content_hash(load(changed, lazy_options(tmp_path)).images)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(changed / "b" / "000.jpg")
    after = load(changed, lazy_options(tmp_path))
    assert content_hash(after.images) != before
    assert after.images[60].max() <= 1                                      # b/000.jpg is row 60: now black
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def test_interrupted_decoding_leaves_no_file_that_looks_finished(folder, tmp_path, monkeypatch):
    calls = []

    def fail_on_second_chunk(files, *args, **kwargs):
        calls.append(len(files))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [np.zeros((SIDE, SIDE, 3), np.uint8)] * len(files)
    monkeypatch.setattr(lazy_images, "decode_images", fail_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        load(folder, lazy_options(tmp_path))
    assert calls == [BUDGET_IMAGES, 301 - BUDGET_IMAGES]                     # 301 files with broken.png
    assert list((tmp_path / "cache").iterdir()) == []


def test_not_enough_disk_is_one_clear_error(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(lazy_images.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"cache.*GB needed.*data.cache_dir"):
        load(folder, lazy_options(tmp_path))


def test_on_demand_decoding_keeps_at_most_the_budget_in_memory(folder, eager, tmp_path):
    ds = load(folder, lazy_options(tmp_path, cache_images="none"))
    images = ds.images
    assert isinstance(images, LazyImages) and images.store is None and images.max_cached == BUDGET_IMAGES
    assert ds.paths == eager.paths                                          # the header check dropped broken.png
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    for epoch in range(2):
        for start in range(0, 300, 64):
            idx = order[start:start + 64]
            assert torch.equal(images[idx], eager.images[idx])
            assert len(images._cache) <= BUDGET_IMAGES
    assert images.peak_decoded == BUDGET_IMAGES
    assert not (tmp_path / "cache").exists()
    assert content_hash(images) == content_hash(load(folder, lazy_options(tmp_path, cache_images="none")).images)


def test_run_settings_reach_the_loader(folder, tmp_path, monkeypatch, capsys):
    pools = []

    class RecordingPool(imagefiles.ThreadPoolExecutor):
        def __init__(self, max_workers=None):
            pools.append(max_workers)
            super().__init__(max_workers)
    monkeypatch.setattr(imagefiles, "ThreadPoolExecutor", RecordingPool)
    cfg = load_config(None, [f"data.path={folder}", "data.dataset=folder", f"data.image_size={SIDE}",
                             "data.cache_images=disk", "data.max_memory_mb=2", "data.decode_workers=3",
                             f"data.cache_dir={tmp_path / 'mine'}", "quiet=true"])
    train, evaluation = load_data(cfg)
    assert evaluation is train and isinstance(train.images, LazyImages)
    assert train.images.peak_decoded == 301 < 2 * 2**20 // 6912             # all 301 files fit one chunk of 303
    assert pools == [3] and capsys.readouterr().err == ""
    assert len(list((tmp_path / "mine").glob("images-*.npy"))) == 1


def test_progress_bar_on_stderr_unless_quiet(folder, tmp_path, capsys):
    load(folder, lazy_options(tmp_path, quiet=False))
    err = capsys.readouterr().err
    assert "decoding images" in err and "img/s" in err
    load(folder, lazy_options(tmp_path, quiet=False, cache_images="memory"))
    assert "decoding images" in capsys.readouterr().err
    load(folder, lazy_options(tmp_path, cache_images="memory"))
    assert capsys.readouterr().err == ""


class CountingReads:
    """Wraps LazyImages, remembering how many rows each read asked for."""

    def __init__(self, images):
        self.images, self.reads = images, []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads.append(len(index))
        return self.images[index]


def test_pixel_baselines_stream_lazy_images(folder, eager, tmp_path):
    ds = load(folder, lazy_options(tmp_path))
    expected = pixel_features(eager.images, seed=0)
    assert np.allclose(pixel_features(ds.images, seed=0), expected, atol=1e-4)   # all 300 fit: same PCA
    counted = CountingReads(ds.images)
    sampled = pixel_features(counted, seed=0, fit_sample=100, batch_size=50)
    assert sampled.shape == (300, 50) and max(counted.reads) == 50
    assert sum(counted.reads) == 100 + 300                                 # the fit sample, then every image once
    lazy_clusters = pixel_kmeans(ds.images, ds.images, 3, 0)[0]
    assert np.array_equal(lazy_clusters, pixel_kmeans(eager.images, eager.images, 3, 0)[0])


def test_heic_photos_are_read_with_the_plugin(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    Image.fromarray(np.full((16, 24, 3), (200, 40, 90), np.uint8)).save(tmp_path / "phone.heic", quality=95)
    Image.fromarray(np.full((16, 16, 3), 10, np.uint8)).save(tmp_path / "scan.png")
    ds = load_dataset("folder", str(tmp_path), image_size=8)
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == ["phone.heic", "scan.png"]
    colour = ds.images[0].float().mean((1, 2))
    assert torch.allclose(colour, torch.tensor([200.0, 40.0, 90.0]), atol=6)   # lossy, but the same colour


def test_unreadable_heic_without_the_plugin_says_how_to_get_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("scan.data.folders.heif_available", lambda: False)
    (tmp_path / "phone.heic").write_bytes(b"not decodable")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        load_dataset("folder", str(tmp_path), image_size=8)
    assert "pip install 'scan-clustering[heif]'" in caplog.text


def test_every_stage_runs_on_a_decode_once_folder_exactly_as_in_memory(tmp_path, tiny_overrides):
    """Pretext, mining (with the pixel space), clustering, self-labelling, evaluation and the report
    read the decode-once file batch by batch: same seed, same pixels, the very same numbers."""
    folder = write_folder(tmp_path / "photos", per_class=10)
    metrics = {}
    for storage in ("memory", "disk"):
        cfg = load_config(None, tiny_overrides + [
            f"data.path={folder}", "data.dataset=folder", "data.image_size=16", "data.labels_from_folders=true",
            f"data.cache_images={storage}", f"data.cache_dir={tmp_path / 'cache'}", "mine.features=backbone+pixels"])
        run = open_run(cfg, tmp_path / storage)
        assert isinstance(run.train.images, LazyImages) == (storage == "disk")
        metrics[storage] = {k: v for k, v in run_pipeline(run).items() if k != "seconds"}
    assert metrics["disk"] == metrics["memory"] and "kmeans_pixels" in metrics["disk"]
    assert write_run_report(finished_run(run)).read_text().count("data:image/") >= 3     # thumbnails of the lazy images


def test_damaged_decode_once_files_are_rebuilt(folder, eager, tmp_path):
    load(folder, lazy_options(tmp_path))
    record = next((tmp_path / "cache").glob("*.json"))
    record.write_text("{not json")
    assert torch.equal(load(folder, lazy_options(tmp_path)).images[:], eager.images)
    store = next((tmp_path / "cache").glob("*.npy"))
    np.save(store, np.zeros((2, 3, SIDE, SIDE), np.uint8))               # wrong shape
    assert torch.equal(load(folder, lazy_options(tmp_path)).images[:], eager.images)
    with open(store, "r+b") as f:                                          # cut short
        f.truncate(store.stat().st_size - 1)
    assert torch.equal(load(folder, lazy_options(tmp_path)).images[:], eager.images)


def test_a_decode_once_cache_damaged_in_place_is_decoded_again(folder, eager, tmp_path, caplog):
    options = lazy_options(tmp_path)
    first = load(folder, options)
    assert isinstance(first.images, LazyImages)
    store = next((tmp_path / "cache").glob("images-*.npy"))
    header = store.stat().st_size - 300 * 3 * SIDE * SIDE
    with open(store, "r+b") as f:   # all white, same size: what a bad disk or a stray tool could leave
        f.seek(header)
        f.write(b"\xff" * (store.stat().st_size - header))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scan.data"):
        again = load(folder, options)
    assert any("decoding again" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.images[torch.arange(len(again))], eager.images)
    assert content_hash(again.images) == content_hash(eager.images)
