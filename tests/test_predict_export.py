"""`scan predict` and `scan export` on a tiny trained run: "unknown" images, a confidence that ranks,
each file once, and exported models that give predict's numbers on the same files."""
import csv
import io
import json
import shutil
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

from scan.algo import ood
from scan.algo.ood import TrustHead, fit_trust
from scan.cli import main
from scan.use.export import export_run
from scan.use.images_in import load_image_paths
from scan.use.inference import TRUST_FILE, open_trained_run, predict_images, train_outputs, train_trust


def scan(*args) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `scan run` over a folder of 300 digit photos (16 px), and 3 images unlike any digit."""
    from conftest import TINY
    from test_report import write_photo_folder
    base = tmp_path_factory.mktemp("predict")
    files = write_photo_folder(base / "photos")
    args = ["run", "--data", base / "photos", "--num-clusters", 10, "--labels-from-folders", "--out", base / "run",
            "--set", "data.image_size=16"] + [a for o in TINY for a in ("--set", o)]
    assert scan(*args)[0] == 0
    rng = np.random.default_rng(0)
    strange = [base / "noise.png", base / "green.png", base / "stripes.png"]
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(strange[0])
    Image.new("RGB", (40, 40), (20, 200, 30)).save(strange[1])
    Image.fromarray(np.uint8(np.indices((40, 40)).sum(0) % 8 < 4) * 255).save(strange[2])
    return {"run": base / "run", "files": files, "strange": strange, "base": base}


# ------------------------------------------------------------------------ the measures, by hand

def test_confidence_and_score_worked_out_by_hand():
    # reference: 3 training images on the unit circle at 0°, 60° and 180°; clusters 0, 0, 1
    angles = np.radians([0, 60, 180])
    unit = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.0, 1.0]])
    head = TrustHead(unit, probs, threshold=0.3, neighbours=2)
    # a query at 30° (scale must not matter), given cluster 0: both neighbours at cos 30° = 0.866
    x = torch.tensor([[np.cos(np.radians(30)), np.sin(np.radians(30))]]) * 5
    confidence, score = head(x, torch.tensor([0]))
    assert confidence.item() == pytest.approx((0.9 + 0.6) / 2, abs=1e-6)    # equal weights
    assert score.item() == pytest.approx(1 - np.cos(np.radians(30)), abs=1e-6)
    # at 90°, cluster 1: neighbours 60° (cos 30° = 0.866) and 0° or 180° (cos 90° = 0): only 60° weighs
    confidence, score = head(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert confidence.item() == pytest.approx(0.4, abs=1e-6)
    assert score.item() == pytest.approx(1 - np.cos(np.radians(30)), abs=1e-6)


def test_training_scores_leave_each_image_out_and_set_the_threshold_at_the_99th_percentile():
    # two exact twins and a far point: with themselves counted every score would be 0
    features = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]] + [[1.0, 0.01 * i] for i in range(1, 98)])
    probs = np.eye(2)[np.r_[0, 0, 1, np.zeros(97, int)]]
    head, confidence, score = fit_trust(features, probs)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_allclose(score, 1 - sims.max(1), atol=2e-3)          # float16 reference
    assert score[0] == pytest.approx(0, abs=1e-6) and score[2] > 1
    assert confidence[2] == 0 and confidence[0] == pytest.approx(1, abs=1e-3)   # neighbours in other/same cluster
    assert head.threshold == pytest.approx(np.quantile(score, ood.QUANTILE))
    assert head.neighbours == ood.NEIGHBOURS and len(head.features) == 100


def test_the_reference_is_a_fixed_sample_when_the_training_set_is_large(monkeypatch):
    monkeypatch.setattr(ood, "MAX_REFERENCE", 20)
    rng = np.random.default_rng(0)
    features, probs = rng.normal(size=(50, 4)), rng.dirichlet(np.ones(3), 50)
    head, confidence, score = fit_trust(features, probs)
    again = fit_trust(features, probs)[0]
    assert len(head.features) == 20 and torch.equal(head.features, again.features)
    assert len(score) == 50 and np.all(score >= 0)


def test_confidence_is_lower_where_assignments_are_wrong_while_the_softmax_says_0999_everywhere():
    # two overlapping blobs (centres 3 apart), split by a self-labelled-like model at x = 1.5 with
    # p = 0.999 for every image: the softmax cannot tell right from wrong, the neighbours can
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    features = rng.normal(size=(400, 2)) + np.c_[labels * 3.0, np.zeros(400)] + [0.0, 8.0]
    cluster = (features[:, 0] > 1.5).astype(int)
    probs = np.where(np.eye(2)[cluster] == 1, 0.999, 0.001)
    _, confidence, _ = fit_trust(features, probs)
    right = cluster == labels
    near_split = np.abs(features[:, 0] - 1.5) < 0.25
    assert confidence[near_split].mean() < 0.8 < 0.99 < confidence[np.abs(features[:, 0] - 1.5) > 1].min()
    unsure = confidence < 0.99                  # 36 images: 72% right, against 97% for the others
    assert 20 < unsure.sum() < 60 and right[unsure].mean() < right[~unsure].mean() - 0.15


# ------------------------------------------------------------------------ predict

def test_images_like_no_training_image_are_unknown_and_known_ones_are_not(trained):
    code, stdout = scan("predict", trained["run"], *trained["strange"], trained["files"][3], trained["files"][4])
    rows = rows_of(stdout)
    assert code == 0 and list(rows[0]) == ["path", "cluster", "cluster_name", "confidence", "probability",
                                           "unknown", "ood_score", "top3"]
    threshold = train_trust(open_trained_run(trained["run"])).threshold
    for row in rows[:3]:
        assert row["unknown"] == "true" and row["cluster_name"] == "unknown", row
        assert float(row["ood_score"]) > threshold and 0 <= int(row["cluster"]) < 10   # nearest cluster kept
    for row in rows[3:]:   # training images: their own twin is in the reference
        assert row["unknown"] == "false" and float(row["ood_score"]) <= 1e-3   # float16 reference


def test_confidence_ranks_the_training_images_of_a_trained_run(trained):
    run = open_trained_run(trained["run"], with_data=True)
    trust = train_trust(run)
    outputs = train_outputs(run)
    assert len(trust.confidence) == len(outputs.ids) == 300
    assert len(np.unique(np.round(trust.confidence, 4))) > 100                # ranks, not all 1.00
    assert trust.confidence.min() < 0.9 and np.all((trust.confidence >= 0) & (trust.confidence <= 1))
    assert trust.unknown.sum() == np.sum(trust.ood_score > np.quantile(trust.ood_score, 0.99)) <= 3


def test_trust_is_stored_once_per_model_and_refitted_when_the_model_changes(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run"], run_dir)
    path = run_dir / TRUST_FILE
    first = train_trust(open_trained_run(run_dir))
    stamp = path.stat().st_mtime_ns
    train_trust(open_trained_run(run_dir))
    assert path.stat().st_mtime_ns == stamp                                   # read, not refitted
    saved = torch.load(path, weights_only=True)
    saved["key"] = "selflabel:an-earlier-model"
    saved["head"]["threshold"] = 123.0
    torch.save(saved, path)
    again = train_trust(open_trained_run(run_dir))
    assert again.threshold == pytest.approx(first.threshold) and path.stat().st_mtime_ns != stamp


def test_a_file_given_directly_and_through_its_folder_is_listed_once(trained):
    folder = trained["base"] / "photos" / "1"
    inside = sorted(folder.rglob("*.png"))[0]
    spelt_otherwise = folder / ".." / "1" / inside.relative_to(folder)
    code, stdout = scan("predict", trained["run"], inside, folder, spelt_otherwise, inside)
    paths = [r["path"] for r in rows_of(stdout)]
    assert code == 0 and paths[0] == str(inside) and len(paths) == len(set(paths))
    in_folder = [f for f in trained["files"] if folder in f.parents]
    assert sorted(paths) == sorted(map(str, in_folder))


# ------------------------------------------------------------------------ export

def _run_torchscript(path, images):
    extra = {"scan.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        return [t.numpy() for t in model(images)], json.loads(extra["scan.json"])


def _run_onnx(path, images):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return session.run(None, {"images": images.numpy()}), json.loads(meta["scan.json"])


def _run_torch_export(path, images):
    extra = {"scan.json": ""}
    model = torch.export.load(str(path), extra_files=extra).module()
    with torch.no_grad():
        return [t.numpy() for t in model(images)], json.loads(extra["scan.json"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit.load: TorchScript is deprecated upstream
@pytest.mark.filterwarnings("ignore:No complete tensor found:UserWarning")   # torch.export.load, CPU weights
@pytest.mark.parametrize("fmt, suffix, load", [("torchscript", "pt", _run_torchscript), ("onnx", "onnx", _run_onnx),
                                               ("torch-export", "pt2", _run_torch_export)])
def test_exported_models_give_predicts_numbers_on_the_same_files(trained, tmp_path, fmt, suffix, load):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{suffix}"
    code, stdout = scan("export", trained["run"], "--format", fmt, "--out", out)
    assert code == 0 and stdout.strip() == str(out)
    files = trained["files"][:5] + trained["strange"]
    run = open_trained_run(trained["run"], device="cpu")
    images = load_image_paths(files, run.info["image_shape"])    # what `scan predict` decodes
    expected = predict_images(run, images.images, images.paths)
    (probs, confidence, score), meta = load(out, images.images)
    np.testing.assert_allclose(probs, expected.probs, atol=1e-5)
    np.testing.assert_allclose(confidence, expected.trust.confidence, atol=1e-5)
    np.testing.assert_allclose(score, expected.trust.ood_score, atol=1e-5)
    assert meta["image_shape"] == [3, 16, 16] and meta["num_clusters"] == 10
    assert meta["ood_threshold"] == pytest.approx(expected.trust.threshold)
    assert list(score > meta["ood_threshold"]) == list(expected.trust.unknown) == [False] * 5 + [True] * 3
    # and `scan predict` prints the same numbers for these files
    rows = rows_of(scan("predict", trained["run"], *files)[1])
    assert [float(r["probability"]) for r in rows] == pytest.approx(list(probs.max(1)), abs=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_takes_float_images_and_refuses_other_sizes(trained, tmp_path):
    path = export_run(trained["run"], tmp_path / "m.pt")
    model = torch.jit.load(str(path))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(model(images.float() / 255)[0], model(images)[0], atol=1e-6)
        with pytest.raises(Exception, match="image_shape"):
            model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert export_run(trained["run"]) == trained["run"] / "model.torchscript.pt"


def test_predict_imports_neither_training_code_nor_kornia_faiss_or_sklearn(trained):
    import subprocess
    import sys
    code = ("import sys; from scan.cli import main; "
            f"assert main(['predict', {str(trained['run'])!r}, {str(trained['files'][0])!r}]) == 0; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('kornia', 'faiss', 'sklearn', 'scipy') "
            "or m.startswith(('scan.nets.augment', 'scan.pipeline.stages', 'scan.algo.losses', 'scan.pretext', 'scan.train.mining'))); "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
