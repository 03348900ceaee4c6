"""A run killed with SIGKILL at any point resumes to exactly the result of an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from scan.core.checkpoint import atomic_write_json

# Enough epochs per stage that a kill can land between checkpoints of every training stage.
SETTINGS = ["model.width=8", "pretext.epochs=8", "pretext.batch_size=128", "cluster.epochs=4",
            "cluster.num_heads=3", "cluster.restarts=2", "selflabel.epochs=3", "selflabel.threshold=0.5",
            "mine.num_neighbors=5"]
DIGITS = 500


def _command(out):
    # the first DIGITS of the digits set, saved beside the run: every kill point of the full set, at a third of the time
    args = [sys.executable, "-m", "scan.cli", "run", "--data", str(out.parent / "digits.npz"), "--out", str(out),
            "--seed", "3", "--no-report"]   # the predictions are compared: the report's map would add seconds
    for s in SETTINGS:
        args += ["--set", s]
    return args


def _env():
    # one thread: identical float results across runs regardless of the machine's core count
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_to_end(out) -> str:
    done = subprocess.run(_command(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def _start(out, log) -> subprocess.Popen:
    """An uninterrupted run in the background (one thread: it takes the core the killed runs leave)."""
    return subprocess.Popen(_command(out), env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _kill_when(out, ready, extra_delay, log) -> bool:
    """Start a run, SIGKILL it `extra_delay` s after `ready()` holds; False if it finished first.

    Its output is appended to the file `log`."""
    with open(log, "a") as sink:
        proc = subprocess.Popen(_command(out), env=_env(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and not ready():
                time.sleep(0.02)
            time.sleep(extra_delay)
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_sigkill_at_random_points_of_each_stage_then_resume_matches_uninterrupted(tmp_path):
    from sklearn.datasets import load_digits
    digits = load_digits()
    np.savez(tmp_path / "digits.npz", images=np.uint8(digits.images[:DIGITS] * 255 / 16), labels=digits.target[:DIGITS])
    out = tmp_path / "killed"
    rng = random.Random(0)
    log = tmp_path / "killed.log"
    kills = 0
    # the uninterrupted reference runs alongside the killed runs (one thread each: a core each)
    with open(tmp_path / "reference.log", "w") as reference_log:
        reference = _start(tmp_path / "reference", reference_log)
        try:
            # mid-stage kills: once a stage has checkpointed at least one epoch, kill it a random moment later (in
            # the cluster stage, in its second restart: the first is finished and kept, the second resumes)
            for stage in ("pretext", "cluster/restart1", "selflabel"):
                kills += _kill_when(out, lambda: (out / stage / "checkpoint.pt").exists(), rng.uniform(0.0, 0.4), log)
            # and once self-labelling has finished: inside evaluate and its file writes (a kill timed from the start
            # of the process, as this test once did, landed in the imports, before any stage)
            kills += _kill_when(out, lambda: (out / "selflabel" / "done.json").exists(), rng.uniform(0.0, 0.3), log)
            assert kills >= 2
            _run_to_end(out)
            assert "pretext: resuming from epoch" in log.read_text()  # the first kill left a mid-stage checkpoint
            assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-2000:]
        finally:
            if reference.poll() is None:
                reference.kill()
                reference.wait()

    assert np.array_equal(np.load(out / "predictions.npy"), np.load(tmp_path / "reference" / "predictions.npy"))
    assert not list(out.rglob("*.tmp")), "temp files left behind"
    assert not list(out.rglob("checkpoint.pt")), "checkpoints of finished stages left behind"


def test_stale_temp_files_are_removed_and_foreign_formats_refused(tmp_path, tiny_overrides):
    from scan.config import ConfigError
    from scan.pipeline import load_config, open_run

    cfg = load_config("digits", tiny_overrides)
    run = tmp_path / "run"
    open_run(cfg, run)
    (run / "pretext").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()   # its pid is free now
    stale = run / "pretext" / f".checkpoint.pt.scan-{dead.pid}.0abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = run / "pretext" / f".model.pt.scan-{os.getppid()}.0abc.tmp"   # a live process is still writing it
    live.write_bytes(b"being written")
    foreign = run / "pretext" / ".notes.txt.tmp"   # not ours: never touched
    foreign.write_bytes(b"someone else's")
    open_run(cfg, run)
    assert not stale.exists() and live.exists() and foreign.exists()

    atomic_write_json(run / "run.json", {"format_version": 99})
    with pytest.raises(ConfigError, match=r"run-directory format 99.*--restart"):
        open_run(cfg, run)
    open_run(cfg, run, restart=True)  # --restart takes the folder over

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a scan run directory"):
        open_run(cfg, tmp_path / "photos")


def test_nan_loss_stops_the_stage_keeps_the_last_good_checkpoint_and_a_rerun_resumes(mined_run, tmp_path,
                                                                                      monkeypatch):
    import torch
    from conftest import copy_run

    from scan import pipeline
    from scan.core.checkpoint import load_checkpoint, read_json
    from scan.pipeline.stages import cluster
    from scan.train.engine import StageError, minibatches

    run = copy_run(mined_run, tmp_path, ["cluster.epochs=3", "selflabel.enabled=false"])   # pretext, mine done
    cfg = run.cfg
    real_loss, calls = cluster.scan_loss, {"n": 0}
    steps_per_epoch = len(minibatches(1437, cfg.cluster.batch_size))

    def poisoned(*args, **kwargs):  # NaN from the second epoch on
        calls["n"] += 1
        total, *rest = real_loss(*args, **kwargs)
        return (total * float("nan") if calls["n"] > steps_per_epoch else total, *rest)

    monkeypatch.setattr(cluster, "scan_loss", poisoned)
    with pytest.raises(StageError, match=r"cluster: the loss became nan in epoch 2.*rerun resumes"):
        pipeline.run_pipeline(run)
    ckpt = load_checkpoint(tmp_path / "run" / "cluster" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["states"]["model"].values()
                                      if v.is_floating_point())
    assert not (tmp_path / "run" / "cluster" / "done.json").exists()

    monkeypatch.setattr(cluster, "scan_loss", real_loss)
    metrics = pipeline.run_pipeline(pipeline.open_run(cfg, tmp_path / "run"))
    assert len(read_json(tmp_path / "run" / "cluster" / "done.json")["history"]) == 3
    # the resumed training learned: measured ACC 0.386 (seed 0; 2 TINY epochs: 0.361); chance is 0.1
    assert metrics["cluster"]["acc"] >= 0.27, metrics["cluster"]


def test_collapsed_clustering_is_warned_about_with_the_fix(caplog):
    import logging
    from types import SimpleNamespace

    import torch

    from scan.pipeline import load_config
    from scan.pipeline.stages.cluster import _warn_collapse

    run = SimpleNamespace(num_clusters=10, cfg=load_config(None))
    with caplog.at_level(logging.WARNING, logger="scan"):
        _warn_collapse(run, torch.tensor([0] * 95 + list(range(1, 6))), "cluster")
        _warn_collapse(run, torch.arange(100) % 10, "cluster")
    assert len(caplog.records) == 1
    assert "95%" in caplog.text and "raise cluster.entropy_weight" in caplog.text
