"""scikit-learn style estimator over the SCAN pipeline.

    from scan import SCANClustering
    model = SCANClustering(n_clusters=10).fit(images)      # (N, H, W[, C]) uint8 array, tensor or folder
    model.labels_, model.predict(new_images), model.predict_proba("photo.jpg")
    model.save("my-clusters");  SCANClustering.load("my-clusters")

The estimator is a thin shell: `fit` runs the ordinary pipeline in a run directory (a
temporary one unless `run_dir` is given), so everything the command line offers (report,
naming, export, resuming) works on it, and `SCANClustering.load` opens any `scan run` output.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import NotFittedError

from scan.checkpoint import TEMP_PATTERN, read_json
from scan.config import Config, _merge, config_from_dict, load_config
from scan.data import ImageDataset
from scan.images_in import as_image_tensor, load_image_paths, match_shape
from scan.inference import (cached_train_outputs, load_classifier, load_names, open_trained_run, predict_proba,
                            train_outputs)
from scan.defaults import auto_defaults
from scan.pipeline import run_pipeline
from scan.run import Run, load_data, open_run
from scan.rundir import LOCK_FILE, RunError, is_run_dir, release_run_dir, rewrite_data_path

ARRAY_FILE = "images.npz"   # an in-memory training array is kept here so the run can be reopened


def _nested(params: dict) -> dict:
    """{'cluster__epochs': 5, 'seed': 1} -> {'cluster': {'epochs': 5}, 'seed': 1} (scikit-learn's '__')."""
    out: dict = {}
    for key, value in params.items():
        node = value
        for part in reversed(key.split("__")):
            node = {part: node}
        out = _merge(out, node)
    return out


def _not_copied(folder, names: list[str]) -> list[str]:
    """What `save` leaves behind: training checkpoints, the run's lock and our temporary files."""
    return [n for n in names if n in ("checkpoint.pt", LOCK_FILE) or TEMP_PATTERN.match(n)]


def _is_path(x) -> bool:
    return isinstance(x, (str, Path)) or (isinstance(x, (list, tuple)) and bool(x) and
                                          all(isinstance(p, (str, Path)) for p in x))


class SCANClustering:
    """Unsupervised image clustering (SCAN) with the scikit-learn estimator interface.

    n_clusters: number of clusters. config: None (defaults chosen from the data, as `scan run
    --data`), a built-in config name, a YAML path or a `Config`. run_dir: where artifacts go
    (default: a temporary folder removed with the estimator). **params: config overrides,
    either nested (`cluster={"epochs": 5}`) or scikit-learn style (`cluster__epochs=5`).

    Learned attributes: labels_ (N,), probs_ (N, C), features_ (N, D) final-model features,
    neighbors_ (N, K) mined neighbour indices, cluster_names_, metrics_, config_, run_dir_.
    """

    def __init__(self, n_clusters: int = 10, config=None, run_dir=None, **params):
        self.n_clusters = n_clusters
        self.config = config
        self.run_dir = run_dir
        self.params = params

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"SCANClustering(n_clusters={self.n_clusters}, config={self.config!r}{extra})"

    # -------------------------------------------------------------- fitting

    def fit(self, X, y=None) -> SCANClustering:
        """Train on images X (array, tensor, image folder or data file); y is ignored (unsupervised)."""
        del y
        run_dir = self._fresh_run_dir()
        data = None
        user = _merge(_nested(self.params), {"data": {"num_clusters": self.n_clusters}})
        if isinstance(X, (str, Path)):
            user = _merge(user, {"data": {"dataset": "auto", "path": str(X)}})
        else:
            images = as_image_tensor(X)
            dataset = ImageDataset(images, None, None)
            data = (dataset, dataset)
            user = _merge(user, {"data": {"dataset": "npz", "path": str((run_dir / ARRAY_FILE).resolve())}})
        cfg = self._resolve_config(user, data)
        try:
            run = open_run(cfg, run_dir, data=data)
            if data is not None:
                # saved after open_run (which insists on an empty or existing run directory)
                np.savez(run_dir / ARRAY_FILE, images=data[0].images.permute(0, 2, 3, 1).numpy())
            run_pipeline(run)
            return self._learn(run)
        finally:   # a fitted estimator only reads its run: another process may continue training it
            release_run_dir(run_dir)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """Train on X and return its cluster ids."""
        return self.fit(X, y).labels_

    def _fresh_run_dir(self) -> Path:
        if self.run_dir is not None:
            return Path(self.run_dir)
        # Kept on the instance: the folder lives as long as the estimator does.
        self._tmp = tempfile.TemporaryDirectory(prefix="scan-")
        return Path(self._tmp.name)

    def _resolve_config(self, user: dict, data) -> Config:
        """The config source plus overrides; with no source, defaults chosen from the data."""
        if isinstance(self.config, Config):
            return config_from_dict(_merge(self.config.to_dict(), user))
        if self.config is not None:
            return load_config(str(self.config), user)
        base = load_config(None, user)
        train = (data or load_data(base))[0]
        return load_config(None, _merge(auto_defaults(base, train), user))

    def _learn(self, run: Run) -> SCANClustering:
        """Set the learned attributes from a run directory holding a finished run."""
        outputs = train_outputs(run)
        self.run_dir_ = run.run_dir
        self.config_ = run.cfg
        self.n_clusters = run.num_clusters
        self.probs_ = outputs.probs
        self.labels_ = outputs.probs.argmax(1)
        self.features_ = outputs.features
        self.neighbors_ = np.load(run.path("mine", "neighbors.npy"))
        self.cluster_names_ = load_names(run.run_dir)
        self.metrics_ = read_json(run.path("metrics.json"), {})
        self._run = open_trained_run(run.run_dir, device=str(run.rt.device))   # without the training data
        self._classifier = load_classifier(self._run)
        return self

    # -------------------------------------------------------------- predicting

    def _check_fitted(self) -> None:
        if not hasattr(self, "_classifier"):
            raise NotFittedError("this SCANClustering is not fitted yet: call fit(X) or SCANClustering.load(path)")

    def _images(self, X) -> torch.Tensor:
        shape = self._run.info["image_shape"]
        if _is_path(X):
            return load_image_paths([X] if isinstance(X, (str, Path)) else X, shape).images
        return match_shape(as_image_tensor(X), shape)

    def predict_proba(self, X) -> np.ndarray:
        """(N, n_clusters) cluster probabilities of images X (array, tensor, image files or folders)."""
        self._check_fitted()
        return predict_proba(self._classifier, self._images(X), self._run.rt)

    def predict(self, X) -> np.ndarray:
        """Cluster id of every image in X."""
        return self.predict_proba(X).argmax(1)

    # -------------------------------------------------------------- persistence

    def save(self, path, overwrite: bool = False) -> Path:
        """Copy the run directory (config, weights, artifacts; no training checkpoints) to `path`.

        `path` must not exist or be empty; overwrite=True replaces an earlier saved model or run
        there (never a folder that is not one: that is refused rather than deleted).
        """
        self._check_fitted()
        path = Path(path)
        if path.resolve() == Path(self.run_dir_).resolve():
            return path
        if path.resolve().is_relative_to(Path(self.run_dir_).resolve()):
            raise RunError(f"{path} is inside the run directory {self.run_dir_}: save elsewhere")
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file: save to a folder")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise RunError(f"{path} is not empty: pass overwrite=True to replace the model saved there, "
                               f"or save elsewhere")
            if not is_run_dir(path):
                raise RunError(f"{path} holds something other than a saved model: not overwriting it")
        # Copied next to the target and swapped in, so a failed copy leaves the old content intact.
        staging = path.with_name(f".{path.name}.saving")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(self.run_dir_, staging, ignore=_not_copied)
        array = str((Path(self.run_dir_) / ARRAY_FILE).resolve())
        # the copy must read its own copy of the training array (the original may be a temp dir)
        rewrite_data_path(staging, array, str((path / ARRAY_FILE).resolve()))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
        return path

    @classmethod
    def load(cls, path) -> SCANClustering:
        """An estimator fitted by `save`, or from any `scan run` output directory."""
        run = open_trained_run(path)
        if cached_train_outputs(run) is None:   # e.g. a run from an older version: recompute from its data
            run = open_trained_run(path, with_data=True)
        estimator = cls(n_clusters=run.num_clusters, run_dir=path)
        return estimator._learn(run)
