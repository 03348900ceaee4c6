"""ImageNet subsets (shipped class lists, lazy loading) and backbone initialisation from checkpoints."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from scan.config import ConfigError
from scan.data import DataError, LazyImages, content_hash, imagenet_subsets, load_dataset, read_class_list
from scan.nets.models import build_backbone, load_backbone_weights, torchvision_resnet_keys
from scan.pipeline import load_config, open_run, run_pipeline

UNLISTED = ("n00000001", "n09999999")        # class folders that belong to no shipped subset


def write_tree(root, wnids, per_class=2, side=12, splits=("train", "val")):
    """ImageNet-style root/<split>/<wnid>/*.JPEG; each class has its own grey level."""
    for split in splits:
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((side, side + 4, 3), (c * 5 + i) % 256, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    return root


def test_shipped_class_lists_are_nested_unique_wordnet_ids():
    sizes = {"imagenet-dogs15": 15, "imagenet10": 10, "imagenet100": 100, "imagenet200": 200, "imagenet50": 50}
    assert imagenet_subsets() == sorted(sizes)
    lists = {name: [wnid for wnid, _ in read_class_list(name)] for name in imagenet_subsets()}
    for name, wnids in lists.items():
        assert len(wnids) == len(set(wnids)) == sizes[name]
        assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert set(lists["imagenet50"]) < set(lists["imagenet100"]) < set(lists["imagenet200"])
    # DAC's two sets: the Maltese dog is in both; every Dogs-15 class is a dog (WordNet IDs n02085620-n02113978)
    assert set(lists["imagenet10"]) & set(lists["imagenet-dogs15"]) == {"n02085936"}
    assert all("n02085620" <= w <= "n02113978" for w in lists["imagenet-dogs15"])
    assert read_class_list("imagenet10")[3] == ("n02690373", "airliner")


def test_subset_loader_picks_exactly_the_listed_classes_and_decodes_lazily(tmp_path):
    listed = [wnid for wnid, _ in read_class_list("imagenet50")]
    root = write_tree(tmp_path / "imagenet", listed + list(UNLISTED))
    train = load_dataset("imagenet50", path=str(root), image_size=8)
    assert isinstance(train.images, LazyImages) and train.images.shape == (100, 3, 8, 8)
    assert train.class_names == [name for _, name in read_class_list("imagenet50")]
    assert sorted(set(train.labels.tolist())) == list(range(50))
    picked = {p.split("/")[-2] for p in train.paths}
    assert picked == set(listed)                             # no unlisted class slips in
    # label k is the k-th listed WordNet ID
    assert all(p.split("/")[-2] == listed[label] for p, label in zip(train.paths, train.labels))
    batch = train.images[torch.tensor([0, 2, 99])]
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 8, 8)
    assert train.images[5].shape == (3, 8, 8) and train.images[10:14].shape == (4, 3, 8, 8)
    val = load_dataset("imagenet50", path=str(root), split="val", image_size=8)
    assert len(val) == 100 and all("/val/" in p for p in val.paths)


def test_imagenet_without_subset_takes_every_class_folder(tmp_path):
    root = write_tree(tmp_path / "imagenet", list(UNLISTED), per_class=3, splits=("train",))
    ds = load_dataset("imagenet", path=str(root), image_size=8)
    assert ds.class_names == list(UNLISTED) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_class_folder_is_a_data_error_naming_it(tmp_path):
    root = write_tree(tmp_path / "imagenet", [wnid for wnid, _ in read_class_list("imagenet50")][:3])
    with pytest.raises(DataError, match=r"train/n\d{8}: class folder is missing"):
        load_dataset("imagenet50", path=str(root))


def test_lazy_content_hash_follows_the_files(tmp_path):
    root = write_tree(tmp_path / "imagenet", list(UNLISTED), splits=("train",))
    before = content_hash(load_dataset("imagenet", path=str(root), image_size=8).images)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "train" / UNLISTED[0] / "extra.JPEG")
    assert content_hash(load_dataset("imagenet", path=str(root), image_size=8).images) != before


def test_imagenet_config_recipe_runs_every_stage_on_a_tiny_fake_tree(tmp_path, tiny_overrides):
    root = write_tree(tmp_path / "imagenet", [wnid for wnid, _ in read_class_list("imagenet50")])
    full = load_config("imagenet50")
    assert (full.cluster.optimizer, full.cluster.lr, full.cluster.update_backbone, full.cluster.num_heads) == \
        ("sgd", 5.0, False, 10)
    assert (full.selflabel.lr, full.selflabel.ema_decay, full.selflabel.class_balance) == (0.03, 0.999, False)
    assert full.mine.num_neighbors == 50 and full.cluster.entropy_weight == 5.0
    # tiny: the recipe on 16 px images with a small ResNet whose weights come from a wrapped checkpoint
    backbone = build_backbone("resnet_small", 3, width=8)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}},
               tmp_path / "init.pth")
    cfg = load_config("imagenet50", tiny_overrides + [
        f"data.path={root}", "data.image_size=16", "model.backbone=resnet_small", "cluster.batch_size=32",
        "selflabel.batch_size=32", f"model.init_checkpoint={tmp_path / 'init.pth'}"])
    metrics = run_pipeline(open_run(cfg, tmp_path / "run"))
    assert metrics["num_clusters"] == 50 and metrics["num_eval"] == 100
    assert np.load(tmp_path / "run" / "probs.npy").shape == (100, 50)


def test_init_checkpoint_strips_wrappers_and_loads_our_and_torchvision_layouts(tmp_path):
    source = build_backbone("resnet18", 3)
    ours = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save(ours, tmp_path / "ours.pt")
    target = build_backbone("resnet18", 3)
    load_backbone_weights(target, str(tmp_path / "ours.pt"))
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))

    # torchvision names (conv1, bn1, layerL.B, downsample, fc) under MoCo's wrappers
    tv = {}
    offsets = {1: 0, 2: 2, 3: 4, 4: 6}                       # resnet18: two blocks per layer
    for key, value in source.trunk.state_dict().items():
        if key.startswith("stem."):
            tv[{"0": "conv1", "1": "bn1"}[key.split(".")[1]] + key[len("stem.0"):]] = value
        else:
            _, index, rest = key.split(".", 2)
            layer = max(L for L, start in offsets.items() if int(index) >= start)
            tv[f"layer{layer}.{int(index) - offsets[layer]}.{rest.replace('shortcut.', 'downsample.')}"] = value
    tv["fc.weight"] = torch.zeros(10, 512)
    assert torchvision_resnet_keys(tv).keys() == source.trunk.state_dict().keys()
    moco = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in tv.items()},
                           "module.encoder_k.conv1.weight": torch.zeros(1), "module.queue": torch.zeros(2)}}
    torch.save(moco, tmp_path / "moco.pth.tar")
    fresh = build_backbone("resnet18", 3, mean=[0.1] * 3)
    load_backbone_weights(fresh, str(tmp_path / "moco.pth.tar"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.trunk.state_dict().values(), source.trunk.state_dict().values()))
    assert torch.allclose(fresh.mean.flatten(), torch.full((3,), 0.1))   # no normalisation in the file: kept


def test_init_checkpoint_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="model.init_checkpoint=.*does not exist"):
        load_backbone_weights(build_backbone("resnet18", 3), str(tmp_path / "nope.pt"))
    torch.save(build_backbone("resnet_small", 3, width=8).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match="has shape"):
        load_backbone_weights(build_backbone("resnet_small", 3, width=16), str(tmp_path / "small.pt"))
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="lacks .* backbone weights"):
        load_backbone_weights(build_backbone("resnet18", 3), str(tmp_path / "empty.pt"))


def test_full_imagenet_config_starts_on_a_fake_tree_of_every_class_folder(tmp_path, tiny_overrides):
    """imagenet1k reads every class folder (here 3), clusters with the heads only and evaluates them."""
    root = write_tree(tmp_path / "imagenet", list(UNLISTED) + ["n05555555"], per_class=4)
    backbone = build_backbone("resnet_small", 3, width=8)
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "init.pth")
    cfg = load_config("imagenet1k", tiny_overrides + [
        f"data.path={root}", "data.image_size=16", "model.backbone=resnet_small", "cluster.batch_size=4",
        "mine.num_neighbors=2", f"model.init_checkpoint={tmp_path / 'init.pth'}"])
    metrics = run_pipeline(open_run(cfg, tmp_path / "run"))
    assert metrics["num_clusters"] == 3 and metrics["final_stage"] == "cluster"
