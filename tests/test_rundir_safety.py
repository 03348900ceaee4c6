"""A run directory survives what users and machines do to it: commands on an existing run,
interrupted reruns, retrains after naming, two processes, foreign folders, tampered or damaged
files, full disks and hostile names. Every user mistake is one `scan: error:` line."""
import csv
import dataclasses
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_error_line
from PIL import Image
from sklearn.datasets import load_digits

import scan
from scan import SCANClustering
from scan.cli import main
from scan.pipeline.stage import STAGES, get_stage
from scan.rundir.directory import LOCK_FILE, release_run_dir
from scan.rundir.trained import TrainedRun
from scan.use.inference import RunError, load_names

NUM_IMAGES, NUM_CLUSTERS = 300, 5


def scan_cli(*args) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stdout)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def tiny_args() -> list[str]:
    from conftest import TINY
    return [a for o in TINY for a in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `scan run` on 300 digits in an .npz, plus an image file to predict; shared, never modified."""
    base = tmp_path_factory.mktemp("safety")
    digits = load_digits()
    np.savez(base / "digits.npz", images=np.uint8(digits.images[:NUM_IMAGES] * 255 / 16),
             labels=digits.target[:NUM_IMAGES])
    Image.fromarray(np.uint8(digits.images[-1] * 255 / 16)).save(base / "seven.png")
    code, _ = scan_cli("run", "--data", base / "digits.npz", "--num-clusters", NUM_CLUSTERS, "--out", base / "run",
                       *tiny_args())
    assert code == 0
    return {"run": base / "run", "npz": base / "digits.npz", "png": base / "seven.png"}


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained["run"], copy, ignore=shutil.ignore_patterns(LOCK_FILE))
    return copy


def predicted(run: Path, image: Path) -> list[dict]:
    code, stdout = scan_cli("predict", run, image)
    assert code == 0
    return list(csv.DictReader(io.StringIO(stdout)))



# ------------------------------------------------------------------------ 1. commands on an existing run

def test_stage_subcommand_on_an_existing_run_uses_its_own_config(run, trained, capsys):
    config, data = (run / "config.yaml").read_bytes(), (run / "data.json").read_bytes()
    before = predicted(run, trained["png"])
    assert scan_cli("evaluate", "--out", run)[0] == 0        # not the digits defaults: no crash
    assert (run / "config.yaml").read_bytes() == config and (run / "data.json").read_bytes() == data
    assert predicted(run, trained["png"]) == before
    # --set on top of the run's own config (the model width stays the run's 8, not a default)
    assert scan_cli("evaluate", "--out", run, "--set", "cluster.lr=1e-3")[0] == 0   # YAML 1.1 '1e-3' is a number
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.001" in saved and "width: 8" in saved


# ------------------------------------------------------------------------ 2. interrupted rerun with another model

@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")   # TorchScript is deprecated in torch 2.13
def test_interrupted_rerun_with_another_width_keeps_the_old_model_usable(run, trained, monkeypatch):
    before = predicted(run, trained["png"])
    old_labels = SCANClustering.load(run).labels_

    def interrupted(r):
        raise KeyboardInterrupt
    monkeypatch.setitem(STAGES._items, "mine", dataclasses.replace(get_stage("mine"), run=interrupted))   # after pretext retrained at width 12
    assert scan_cli("run", "--out", run, "--set", "model.width=12")[0] == 130
    assert "width: 12" in (run / "config.yaml").read_text()             # what a rerun resumes with
    assert predicted(run, trained["png"]) == before                     # the old model, as it was built
    assert scan_cli("report", run)[0] == 0
    assert np.array_equal(SCANClustering.load(run).labels_, old_labels)
    assert scan_cli("export", run, "--out", run.parent / "model.pt")[0] == 0

    monkeypatch.undo()
    assert scan_cli("run", "--out", run)[0] == 0                        # resumes the width-12 run
    model = torch.load(run / "selflabel" / "model.pt", weights_only=True)
    assert model["backbone.trunk.stem.0.weight"].shape[0] == 12
    assert len(predicted(run, trained["png"])) == 1


# ------------------------------------------------------------------------ 3. names belong to a model

def test_names_are_not_applied_to_a_retrained_model(run, trained, caplog):
    assert scan_cli("name", run, "0=cats", "1=dogs")[0] == 0
    assert load_names(TrainedRun.open(run)) == {0: "cats", 1: "dogs"}
    # a retrain: other weights in the final model file (cluster ids mean something else now)
    state = torch.load(run / "selflabel" / "model.pt", weights_only=True)
    state = {k: v.flip(0) if k.startswith("heads.") and v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, run / "selflabel" / "model.pt")
    caplog.clear()
    assert load_names(TrainedRun.open(run)) == {} and load_names(TrainedRun.open(run)) == {}
    warnings = [r for r in caplog.records if "names.json" in r.getMessage()]
    assert len(warnings) == 1 and "earlier model" in warnings[0].getMessage()
    assert all(row["cluster_name"] == "" for row in predicted(run, trained["png"]))
    assert scan_cli("name", run, "2=birds")[0] == 0                      # a fresh start, not cats + dogs + birds
    assert load_names(TrainedRun.open(run)) == {2: "birds"}


# ------------------------------------------------------------------------ 4. one writer per run directory

def test_a_second_process_on_the_same_run_is_refused(run, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from scan.rundir.directory import lock_run_dir; "
                               "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
         str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(scan.__file__).parent.parent)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = (run / "config.yaml").read_bytes()
        assert scan_cli("run", "--out", run)[0] == 2
        one_error_line(capsys, str(run), "in use by another scan", f"pid {holder.pid} on ")
        assert (run / "config.yaml").read_bytes() == config
    finally:
        holder.communicate("", timeout=60)
    assert scan_cli("evaluate", "--out", run)[0] == 0                    # free again once the holder is gone
    release_run_dir(run)


# ------------------------------------------------------------------------ 5. only our folders and our files

def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path, capsys):
    foreign = tmp_path / "project"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "config.yaml").write_text("mine: true\n")
    (foreign / "sub" / ".draft.tmp").write_text("keep me")
    assert scan_cli("run", "--out", foreign, *tiny_args())[0] == 2
    one_error_line(capsys, str(foreign), "not a scan run directory")
    assert (foreign / "config.yaml").read_text() == "mine: true\n" and (foreign / "sub" / ".draft.tmp").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["config.yaml", "sub"]


def test_cleanup_removes_only_our_dead_temp_files_in_the_run_folders(run):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    ours = run / "cluster" / f".model.pt.scan-{dead.pid}.0abc.tmp"
    in_foreign_tree = run / "photos" / f".a.png.scan-{dead.pid}.0abc.tmp"
    someone_elses = run / "cluster" / ".model.pt.x7y8.tmp"
    for path in (ours, in_foreign_tree, someone_elses):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    assert scan_cli("evaluate", "--out", run)[0] == 0
    assert not ours.exists() and in_foreign_tree.exists() and someone_elses.exists()


# ------------------------------------------------------------------------ 6. checkpoints cannot run code

class _WritesAFile:
    target = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_tampered_checkpoint_is_refused_without_running_its_code(run, tmp_path, capsys):
    evil = _WritesAFile()
    evil.target = str(tmp_path / "pwned")
    torch.save({"fingerprint": "x", "epoch": 1, "payload": evil}, run / "cluster" / "checkpoint.pt")
    assert scan_cli("cluster", "--out", run, "--set", "cluster.epochs=3")[0] == 2
    one_error_line(capsys, str(run / "cluster" / "checkpoint.pt"), "could run code")
    assert not (tmp_path / "pwned").exists()


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    from scan.core.checkpoint import atomic_torch_save, load_checkpoint, rng_state, seed_everything, set_rng_state
    seed_everything(5)
    np.random.normal()   # a cached Gaussian is part of numpy's state
    atomic_torch_save(tmp_path / "c.pt", {"rng": rng_state(), "history": [{"loss": np.float64(0.5)}]})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.normal()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert type(ckpt["history"][0]["loss"]) is float


# ------------------------------------------------------------------------ 7. save does not merge

def test_save_refuses_a_non_empty_target_unless_overwrite(run, tmp_path):
    model = SCANClustering.load(run)
    target = tmp_path / "saved"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty.*overwrite=True"):
        model.save(target)
    with pytest.raises(RunError, match="other than a saved model"):
        model.save(target, overwrite=True)                   # not a saved model: never deleted
    assert (target / "notes.txt").read_text() == "mine"
    model.save(tmp_path / "saved2")
    model.save(tmp_path / "saved2", overwrite=True)           # replaces an earlier save
    assert not list((tmp_path / "saved2").rglob("notes.txt")) and not (tmp_path / "saved2" / LOCK_FILE).exists()
    assert np.array_equal(SCANClustering.load(tmp_path / "saved2").labels_, model.labels_)


# ------------------------------------------------------------------------ 9. paths, modes

def test_a_relative_data_path_is_stored_absolute(run, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained["npz"].parent)
    assert scan_cli("evaluate", "--out", run, "--data", trained["npz"].name)[0] == 0
    assert f"path: {trained['npz']}" in (run / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    assert scan_cli("report", run)[0] == 0


def test_artifacts_respect_the_umask(tmp_path):
    from scan.core.checkpoint import atomic_write_text
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~previous


# ------------------------------------------------------------------------ 10. no live formulas in CSV files

def test_csv_cells_that_spreadsheets_would_run_are_neutralised(run, trained, tmp_path, monkeypatch):
    names = [f"{c}==HYPERLINK(\"http://x\",\"{c}\")" for c in range(NUM_CLUSTERS)]
    assert scan_cli("name", run, *names)[0] == 0
    monkeypatch.chdir(tmp_path)
    for name in ("=1+2.png", "+3.png", "-4.png", "@SUM.png"):
        shutil.copy(trained["png"], tmp_path / name)
    code, stdout = scan_cli("predict", run, "--", "=1+2.png", "+3.png", "-4.png", "@SUM.png")
    rows = list(csv.reader(io.StringIO(stdout)))[1:]
    training = list(csv.reader(io.StringIO((run / "assignments.csv").read_text())))[1:]
    assert code == 0 and [r[0] for r in rows] == ["'=1+2.png", "'+3.png", "'-4.png", "'@SUM.png"]
    for row in rows + training:
        assert row[2].startswith("'=HYPERLINK"), row


# ------------------------------------------------------------------------ 11. one line for every user mistake

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage, args, needles", [
    (lambda r: _truncate(r / "selflabel" / "model.pt"), ["predict", "{run}", "{png}"],
     ["selflabel/model.pt is truncated or corrupt", "--restart"]),
    (lambda r: _truncate(r / "selflabel" / "model.pt"), ["evaluate", "--out", "{run}"],
     ["selflabel/model.pt is truncated or corrupt", "--restart"]),
    (lambda r: (r / "cluster" / "checkpoint.pt").write_bytes(b"not a checkpoint" * 20),
     ["cluster", "--out", "{run}", "--set", "cluster.epochs=3"], ["cluster/checkpoint.pt is truncated", "--restart"]),
    (lambda r: np.save(r / "mine" / "neighbors.npy", np.zeros((10, 3), dtype=np.int64)),
     ["cluster", "--out", "{run}", "--set", "cluster.epochs=3"], ["mine/neighbors.npy holds", "(10, 3)", "--restart"]),
    (lambda r: (r / "names.json").write_text("[1, 2]"), ["predict", "{run}", "{png}"], ["names.json", "a list"]),
    (lambda r: None, ["predict", "{run}", "{png}", "--out", "{tmp}"], ["--out {tmp} is a folder"]),
    (lambda r: None, ["export", "{run}", "--out", "{tmp}"], ["--out {tmp} is a folder"]),
    (lambda r: None, ["run", "--out", "{png}"], ["--out {png} is a file"]),
    (lambda r: None, ["run", "--out", "{tmp}/new", "--seed", str(2 ** 70)], ["seed must be <= 4294967295"]),
    (lambda r: None, ["run", "--out", "{tmp}/new", "--set", "model.blocks=[]"], ["model.blocks"]),
    # damaged artifacts of a finished run (issue 28 T5): each names its file and the fix
    (lambda r: torch.save([torch.zeros(1)], r / "selflabel" / "model.pt"), ["predict", "{run}", "{png}"],
     ["selflabel/model.pt holds a list, not model weights", "--restart"]),
    (lambda r: [f.write_text("{") for f in r.glob("selflabel/config-*.json")], ["export", "{run}"],
     ["selflabel/config-", "is damaged", "--restart"]),
    (lambda r: [f.write_text("[]") for f in r.glob("selflabel/config-*.json")], ["predict", "{run}", "{png}"],
     ["selflabel/config-", "is damaged", "--restart"]),
    (lambda r: [(r / "train_outputs.pt").unlink(), np.save(r / "mine" / "neighbors.npy", np.array([None, 1]),
                                                           allow_pickle=True)],
     ["report", "{run}"], ["mine/neighbors.npy is damaged", "scan mine --run-dir"]),
])
def test_user_mistakes_are_one_error_line(run, trained, tmp_path, capsys, damage, args, needles):
    damage(run)
    paths = {"run": run, "png": trained["png"], "tmp": tmp_path}
    assert main([a.format(**paths) for a in args]) == 2
    one_error_line(capsys, *(n.format(**paths) for n in needles))


def test_a_read_only_out_is_one_error_line(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_open = os.open

    def refuse(path, *args, **kwargs):   # root ignores the mode bits: refuse as a read-only folder would
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    assert main(["run", "--out", str(locked)] + tiny_args()) == 2
    one_error_line(capsys, f"--out {locked} is not writable")


def test_a_full_disk_is_one_error_line_and_a_rerun_resumes(run, monkeypatch, capsys):
    real_fsync = os.fsync

    def full(fd):
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    backbone = (run / "pretext" / "backbone.pt").stat().st_mtime_ns
    assert main(["run", "--out", str(run), "--set", "cluster.entropy_weight=4"]) == 2
    one_error_line(capsys, "cannot write", "cluster/checkpoint.pt", "No space left on device", "rerun")
    assert not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(["run", "--out", str(run), "--set", "cluster.entropy_weight=4"]) == 0
    assert (run / "pretext" / "backbone.pt").stat().st_mtime_ns == backbone   # nothing computed was lost


# ------------------------------------------------------------------------ a trained run read back (issue 28)

def test_predict_and_export_refuse_a_run_of_another_format(run, trained, capsys):
    marker = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**marker, "format_version": marker["format_version"] + 1}))
    for args in (("predict", run, trained["png"]), ("export", run), ("report", run)):
        assert scan_cli(*args)[0] == 2
        one_error_line(capsys, str(run), "run-directory format")
    assert not (run / "model.torchscript.pt").exists()


def test_predict_says_when_the_evaluated_model_is_missing_and_uses_the_one_before(run, trained, caplog):
    assert json.loads((run / "metrics.json").read_text())["final_stage"] == "selflabel"
    (run / "selflabel" / "model.pt").unlink()
    caplog.clear()
    rows = predicted(run, trained["png"])
    assert len(rows) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("selflabel/model.pt is missing: using the cluster model" in w for w in warnings), warnings


def test_predict_and_export_never_overwrite_a_file_they_were_not_told_to(run, trained, tmp_path, capsys):
    photo_bytes = trained["png"].read_bytes()
    config = (run / "config.yaml").read_bytes()
    mine = tmp_path / "mine.csv"
    mine.write_text("my own notes\n")
    refusals = [(["predict", run, trained["png"], "--out", trained["png"]], "is one of the images"),
                (["predict", run, trained["png"], "--out", trained["png"], "--overwrite"], "is one of the images"),
                (["predict", run, trained["png"], "--out", run / "config.yaml", "--overwrite"], "inside the run directory"),
                (["export", run, "--out", run / "selflabel" / "model.pt"], "inside the run directory"),
                (["predict", run, trained["png"], "--out", mine], "exists: pass --overwrite"),
                (["export", run, "--out", mine], "exists: pass --overwrite")]
    for args, message in refusals:
        assert scan_cli(*args)[0] == 2
        one_error_line(capsys, "--out", message)
    assert trained["png"].read_bytes() == photo_bytes and (run / "config.yaml").read_bytes() == config
    assert mine.read_text() == "my own notes\n"
    assert scan_cli("predict", run, trained["png"], "--out", mine, "--overwrite")[0] == 0
    assert mine.read_text().startswith("path,cluster")


def test_predict_skips_a_symbolic_link_to_itself_in_a_folder(run, trained, tmp_path, caplog):
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(trained["png"], folder / "seven.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")   # a link to itself: resolving it would never end
    caplog.clear()
    rows = predicted(run, folder)
    assert [Path(r["path"]).name for r in rows] == ["seven.png"]
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records)


def test_file_names_that_are_not_utf8_are_shown_escaped_in_csv_and_stdout(run, trained, tmp_path):
    folder = tmp_path / "old camera"
    folder.mkdir()
    latin1 = folder / os.fsdecode(b"caf\xe9.png")   # a Latin-1 name: not valid UTF-8
    shutil.copy(trained["png"], latin1)
    rows = predicted(run, folder)                   # the CSV printed on stdout
    assert [Path(r["path"]).name for r in rows] == ["caf\\xe9.png"]
    out = tmp_path / "p.csv"
    assert scan_cli("predict", run, folder, "--out", out)[0] == 0
    assert "caf\\xe9.png" in out.read_text(encoding="utf-8")


def test_a_line_break_in_a_file_name_stays_in_its_csv_row_and_out_needs_an_existing_folder(run, trained, tmp_path,
                                                                                          capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(trained["png"], folder / "two\rlines\n.png")
    code, stdout = scan_cli("predict", run, folder)
    assert code == 0
    lines = stdout.splitlines()
    assert len(lines) == 2 and "two\\rlines\\n.png" in lines[1]   # the header and one row, the name escaped
    assert scan_cli("predict", run, folder, "--out", tmp_path / "missing" / "p.csv")[0] == 2
    one_error_line(capsys, "the folder", "missing does not exist")
    assert not (tmp_path / "missing").exists()


def test_a_read_only_run_without_its_caches_still_predicts_and_says_what_it_costs(run, trained, monkeypatch,
                                                                                   caplog):
    (run / "trust.pt").unlink()
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):   # root ignores mode bits: refuse writes as a read-only folder would
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuse)
    caplog.clear()
    assert len(predicted(run, trained["png"])) == 1
    assert not (run / "trust.pt").exists()
    assert any("cannot write" in r.getMessage() and "trust.pt" in r.getMessage() and "this command only" in
               r.getMessage() for r in caplog.records)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", [
    lambda r: (r / "metrics.json").write_text("[1]"),
    lambda r: (r / "metrics.json").write_text("{"),
    lambda r: (r / "data.json").write_text("[]"),
    lambda r: _edit_json(r / "data.json", lambda d: d.pop("image_shape")),
    lambda r: _edit_json(r / "data.json", lambda d: d.update(image_shape=[3, 100_000, 100_000])),   # 30 GB
    lambda r: (r / "selflabel" / "done.json").write_text("[]"),
    lambda r: torch.save({"unrelated": torch.zeros(1)}, r / "trust.pt"),
    lambda r: np.save(r / "features" / "train.npy", np.zeros(NUM_IMAGES, np.float32)),
], ids=["metrics-list", "metrics-bad-json", "data-list", "data-no-shape", "data-huge-shape", "done-list",
        "trust-no-keys", "features-wrong-rank"])
def test_damaged_run_files_that_a_trained_model_does_not_need_do_not_stop_predict(run, trained, capsys, damage):
    """The artifacts of issue 28 T5 that predict can do without: the model's own configuration snapshot
    holds the image shape, a damaged cache is recomputed, damaged metrics count as none. Same answer."""
    before = predicted(run, trained["png"])
    damage(run)
    assert predicted(run, trained["png"]) == before
    assert "Traceback" not in capsys.readouterr().err
