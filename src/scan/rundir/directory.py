"""The run directory as a place on disk: what marks a folder as a run, who may write to it,
what a dead process left in it, and which configuration built each of its models.

  run.json                      marker {"format_version": N}: only a folder holding it is a run
  run.lock                      flock'ed by the process writing the run; holds "pid P on HOST"
  config.yaml, data.json        the configuration and data summary of the latest `scan run`
  <stage>/config-<fp>.json      {"config", "data"} that built a model whose done.json has fingerprint fp

config.yaml is what a rerun resumes with; a model keeps the configuration it was built from in
its stage folder, so a rerun with another architecture that is interrupted (or fails) leaves
every existing model loadable (`model_config`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np

from scan.config import Config, config_from_dict, read_config, save_config
from scan.core.checkpoint import FORMAT_VERSION, TEMP_PATTERN, atomic_write_json, read_json, write_error
from scan.core.errors import ArtifactError, ConfigError, RunError, typed

log = logging.getLogger("scan")

MARKER = "run.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
# Folders a run writes into besides one per stage (the run's root, the feature cache); stale temporary
# files are looked for in these and the stages' folders only, never in other sub-trees.
SHARED_FOLDERS = ("", "features")


_held_locks: dict[str, int] = {}   # resolved run directory -> descriptor of its lock file (this process)


def is_run_dir(path) -> bool:
    return (Path(path) / MARKER).is_file()


# ------------------------------------------------------------------------ claiming a folder

def check_run_format(run_dir: Path, restart: bool) -> None:
    """Refuse a folder that is not a run (a file, a non-empty folder without run.json) or whose
    layout version differs (unless --restart)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder: choose another --out")
    marker = run_dir / MARKER
    if marker.is_file():
        try:
            version = (read_json(marker) or {}).get("format_version")
        except (ValueError, AttributeError):
            version = "unknown"
        if version != FORMAT_VERSION and not restart:
            raise ConfigError(f"{run_dir} was written by a scan with run-directory format {version}, this one uses "
                              f"{FORMAT_VERSION}: pass --restart to recompute it there, or choose another --out")
    elif run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not a scan run directory (no {MARKER}), so it is left alone: "
                          f"choose another --out (a new or empty folder)")


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on the run directory until this process exits (or `release_run_dir`).

    A second process writing the same run would mix artifacts of two trainings; it is refused
    with the holder's pid and host. Re-locking from the holding process is a no-op.
    """
    key = str(run_dir.resolve())
    if key in _held_locks:
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"--out {run_dir} is not writable ({e.strerror}): choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by another scan ({holder}): wait for it to finish, "
                          f"or choose another --out") from None
    except OSError as e:   # a file system without locks: go on, as before locking existed
        log.warning("%s: cannot lock the run directory (%s); make sure no other scan writes to it", run_dir,
                    e.strerror)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise write_error(path, e) from None
    _held_locks[key] = fd


def release_run_dir(run_dir) -> None:
    """Give up this process's lock on a run directory (the estimator, once `fit` is done)."""
    fd = _held_locks.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by someone else
        return True
    return True


def remove_stale_temp_files(run_dir: Path, stages: tuple[str, ...]) -> None:
    """A process killed mid-write leaves its temp file behind (the target itself is intact).

    Only our own temporary files (`checkpoint.TEMP_PATTERN`) in the run's own folders are
    removed, and only those of processes that are gone. Called with the run locked, so a file
    bearing our own pid was left by an earlier process that had it (pids repeat in containers).
    """
    for name in SHARED_FOLDERS + tuple(stages):
        folder = run_dir / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            match = TEMP_PATTERN.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                pid = int(match[1])
                if pid == os.getpid() or not _pid_alive(pid):
                    Path(entry.path).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, restart: bool, stages: tuple[str, ...]) -> None:
    """Claim `run_dir` for writing: check it, create it, lock it, mark it, tidy it."""
    check_run_format(run_dir, restart)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {run_dir}: {e.strerror}") from None
    lock_run_dir(run_dir)
    for name in SHARED_FOLDERS[1:] + tuple(stages):   # every write of a run goes into one of these
        if (run_dir / name).is_symlink():
            raise ConfigError(f"{run_dir / name} is a symbolic link: scan writes only inside its run directory, so "
                              f"it is left alone; move it away (or choose another --out)")
    atomic_write_json(run_dir / MARKER, {"format_version": FORMAT_VERSION})
    remove_stale_temp_files(run_dir, stages)
    if restart:
        for stage in stages:
            for name in ("done.json", "checkpoint.pt"):
                (run_dir / stage / name).unlink(missing_ok=True)


def discard_new_run_dir(run_dir: Path, created: bool) -> None:
    """Undo `prepare_run_dir` on a folder that was not a run before a start that then failed: our
    marker and lock go, and the folder too if this process `created` it and nothing else is in it."""
    release_run_dir(run_dir)
    for name in (MARKER, LOCK_FILE):
        (run_dir / name).unlink(missing_ok=True)
    if created:
        try:
            run_dir.rmdir()
        except OSError:   # something else is in it (or it is gone): leave it
            pass


def with_absolute_paths(cfg: Config) -> Config:
    """data.path made absolute, so that the run works from any working directory (scan report)."""
    path = cfg.data.path
    if not path or os.path.isabs(os.path.expanduser(path)):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=os.path.abspath(path)))


# ------------------------------------------------------------------------ which configuration built which model

def _snapshot_file(run_dir: Path, stage: str, fingerprint: str) -> Path:
    return run_dir / stage / f"config-{fingerprint}.json"


def record_config(run, model_stages: tuple[str, ...]) -> None:
    """Write config.yaml and data.json, and the snapshot each (enabled) model stage would be trained from.

    A snapshot is keyed by the stage fingerprint (a hash of every setting and input the model
    depends on), so the model a done.json describes always finds the configuration that built it;
    snapshots no finished model or current setting refers to are removed.
    """
    snapshot = {"config": json.loads(json.dumps(run.cfg.to_dict())), "data": run.info}
    # with data.num_clusters=auto a model's fingerprint needs the choice: the choose stage records them once made
    for stage in model_stages if run.num_clusters_known else ():
        keep = {run.fingerprint(stage), (run.record(stage) or {}).get("fingerprint")}
        folder = run.path(stage)
        for old in folder.glob("config-*.json") if folder.is_dir() else ():
            if old.name[len("config-"):-len(".json")] not in keep:
                old.unlink(missing_ok=True)
        target = _snapshot_file(run.run_dir, stage, run.fingerprint(stage))
        try:
            unchanged = read_json(target) == snapshot
        except ValueError:
            unchanged = False
        if not unchanged:
            atomic_write_json(target, snapshot)
    save_config(run.cfg, run.path(CONFIG_FILE))
    atomic_write_json(run.path(DATA_FILE), run.info)
    # the model stages this configuration trains, in order: a trained run not yet evaluated finds its final model
    atomic_write_json(run.path(MARKER), {"format_version": FORMAT_VERSION, "model_stages": list(model_stages)})


def read_record(path: Path) -> dict | None:
    """A stage's done.json; None when it is absent or damaged (not a JSON object): that stage counts as not
    done, so a rerun computes it again."""
    try:
        record = read_json(path)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_run_config(run_dir: Path) -> tuple[Config, dict]:
    """(config, data summary) of the latest run in `run_dir`; RunError when it is not a run."""
    config_file, data_file = run_dir / CONFIG_FILE, run_dir / DATA_FILE
    if not is_run_dir(run_dir) or not config_file.is_file() or not data_file.is_file():
        raise RunError(f"{run_dir}: not a scan run directory (no {MARKER}/{CONFIG_FILE}/{DATA_FILE}); "
                    f"train one with `scan run --out {typed(run_dir)}`")
    try:
        info = read_json(data_file)
    except ValueError:
        raise RunError(f"{data_file}: not valid JSON; rerun `scan run --out {typed(run_dir)}` to rewrite it") from None
    return read_config(str(config_file)), info


def model_config(run_dir: Path, stage: str, latest: Config, latest_info: dict,
                 fingerprint: str | None) -> tuple[Config, dict]:
    """(config, data summary) that built `<stage>/model.pt`, whose done.json holds `fingerprint`: its
    snapshot, else the latest ones (runs written before snapshots existed). Which stages are enabled
    stays as in `latest`, so the model chosen as final is the one the snapshot belongs to."""
    file = _snapshot_file(run_dir, stage, fingerprint) if fingerprint else None
    try:
        snapshot = read_json(file) if file else None
    except ValueError:
        snapshot = []   # not JSON: refused below, like any other content that is not a snapshot
    if snapshot is not None and not (isinstance(snapshot, dict) and isinstance(snapshot.get("config"), dict)
                                     and isinstance(snapshot.get("data"), dict)):
        raise RunError(f"{file} is damaged (not the configuration that built {stage}/model.pt); rerun "
                       f"`scan run --out {typed(run_dir)} --restart` to rebuild it")
    if not snapshot:
        return latest, latest_info
    cfg = config_from_dict(snapshot["config"])
    cfg = dataclasses.replace(cfg, device=latest.device, quiet=latest.quiet,
                              selflabel=dataclasses.replace(cfg.selflabel, enabled=latest.selflabel.enabled),
                              refine=dataclasses.replace(cfg.refine, method=latest.refine.method))
    return cfg, snapshot["data"]


def rewrite_data_path(run_dir: Path, old: str, new: str) -> None:
    """Point config.yaml and every snapshot that read data.path `old` at `new` (a copied run)."""
    files = [run_dir / CONFIG_FILE] + sorted(run_dir.glob("*/config-*.json"))
    for file in files:
        if file.suffix == ".yaml":
            cfg = read_config(str(file))
            if cfg.data.path == old:
                save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=new)), file)
            continue
        snapshot = read_json(file)
        if snapshot["config"]["data"]["path"] == old:
            snapshot["config"]["data"]["path"] = new
            atomic_write_json(file, snapshot)


# ------------------------------------------------------------------------ artifacts reused as inputs

def check_neighbors(run, num_train: int) -> None:
    """mine/neighbors.npy, when the mine stage counts as done, must be (N_train, K) indices into the
    training set; a damaged one would otherwise crash the cluster stage with an index error."""
    record = run.record("mine")
    path = run.path("mine", "neighbors.npy")
    if record is None or not path.exists():
        return
    if not run.num_clusters_known or record.get("fingerprint") != run.fingerprint("mine"):
        return
    try:
        neighbors = np.load(path, mmap_mode="r", allow_pickle=False)   # checked in place, not loaded
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ArtifactError(f"{path} is truncated or corrupt ({type(e).__name__}); rerun with --restart to "
                            f"recompute it") from None
    bad = (neighbors.ndim != 2 or neighbors.shape[0] != num_train or neighbors.shape[1] < 1
           or not np.issubdtype(neighbors.dtype, np.integer))
    if not bad and neighbors.size and (neighbors.min() < 0 or neighbors.max() >= num_train):
        bad = True
    if bad:
        raise ArtifactError(f"{path} holds {neighbors.dtype} {neighbors.shape}, expected integer indices "
                            f"(N_train={num_train}, K) below {num_train}; rerun with --restart to recompute it")
