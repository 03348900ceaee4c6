"""Each fact computed once: a command reads each artifact of a run at most once, and the images go
through a network only as often as the computation needs (counted with counting wrappers)."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from scan.nets.models import Backbone


@pytest.fixture
def counters(monkeypatch):
    """(reads, images): reads of run files by 'folder/name' (JSON text and torch files), and the
    number of images each unaugmented (eval-mode) backbone pass saw, in order."""
    reads, images = Counter(), []
    read_text, load, forward = Path.read_text, torch.load, Backbone.forward

    def count(path):
        path = Path(path)
        if "run" in path.parts:   # the run directory of these tests: RUN/file or RUN/stage/file
            inside = path.parts[path.parts.index("run") + 1:]
            reads["/".join(inside)] += 1

    def counted_read_text(self, *args, **kwargs):
        count(self)
        return read_text(self, *args, **kwargs)

    def counted_load(path, *args, **kwargs):
        count(path)
        return load(path, *args, **kwargs)

    def counted_forward(self, x):
        if not self.training:
            images.append(int(x.shape[0]))
        return forward(self, x)
    monkeypatch.setattr(Path, "read_text", counted_read_text)
    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(Backbone, "forward", counted_forward)
    return reads, images



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from test_report import NUM_IMAGES, write_photo_folder
    base = tmp_path_factory.mktemp("reads")
    write_photo_folder(base / "photos")
    return base, NUM_IMAGES


def test_a_folder_run_then_report_and_predict_read_each_artifact_once(photos, counters):
    from conftest import TINY
    base, n = photos
    reads, images = counters
    run = base / "run"
    args = ["run", "--data", base / "photos", "--num-clusters", 10, "--out", run, "--set", "data.image_size=16",
            "--set", "selflabel.epochs=1"] + [a for o in TINY for a in ("--set", o)]
    assert run_cli(*args) == 0
    snapshot = next(run.glob("selflabel/config-*.json")).relative_to(run).as_posix()
    # what `scan run` wrote it keeps in memory: no done.json or metrics.json is read back; the report reads
    # the configuration once; a model file is read by each stage that starts from it and by evaluate
    assert dict(reads) == {"run.json": 1, "data.json": 1, "config.yaml": 1, snapshot: 1, "pretext/backbone.pt": 2,
                           "cluster/model.pt": 2, "selflabel/model.pt": 2}
    # passes over the training images (a folder has no held-out split): the pretext features once (no second
    # pass for an eval split), the cluster stage's probabilities once per attempt (the tiny training fails its
    # check, so the rescue retried), self-labelling's starting probabilities, evaluate once per trained model,
    # and the final model's probabilities with its features in one pass (assignments.csv, the report)
    attempts = len(json.loads((run / "cluster" / "done.json").read_text())["check"]["attempts"])
    assert attempts == 2
    assert sum(images) == n * (1 + attempts + 1 + 2 + 1)
    assert sorted(p.name for p in (run / "features").iterdir()) == ["train.npy", "train_projection.npy"]

    reads.clear(), images.clear()
    assert run_cli("report", run) == 0
    once = {"run.json", "data.json", "config.yaml", "metrics.json", snapshot, "pretext/done.json", "mine/done.json",
            "cluster/done.json", "selflabel/done.json"}
    assert dict(reads) == {name: 1 for name in once | {"train_outputs.pt", "trust.pt"}}
    assert images == []   # the training outputs are cached: no network runs

    reads.clear(), images.clear()
    assert run_cli("predict", run, base / "photos" / "1", "--out", base / "p.csv") == 0
    assert dict(reads) == {name: 1 for name in once | {"trust.pt", "selflabel/model.pt"}}
    assert sum(images) == len(list((base / "photos" / "1").rglob("*.*")))   # each new image once
