"""scikit-learn estimator over the SCAN pipeline.

    from scan import SCANClustering
    model = SCANClustering(n_clusters=10).fit(images)      # (N, H, W[, C]) uint8 array, tensor or folder
    model.labels_, model.predict(new_images), model.predict_proba("photo.jpg")
    model.set_params(cluster__epochs=20)                   # any config field, scikit-learn style
    model.save("my-clusters");  SCANClustering.load("my-clusters")

The estimator is a thin shell: `fit` runs the ordinary pipeline in a run directory (a
temporary one unless `run_dir` is given), so everything the command line offers (report,
naming, export, resuming) works on it, and `SCANClustering.load` opens any `scan run` output.
It follows scikit-learn's estimator rules (`get_params`/`set_params`/`clone`, hyper-parameters
never changed by `fit`, learned attributes ending in `_`), with images instead of 2-D tables.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import tempfile
from pathlib import Path
from typing import get_type_hints

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import NotFittedError

from scan.config import AUTO, Config, flatten, merge
from scan.core.checkpoint import TEMP_PATTERN
from scan.core.errors import ConfigError, RunError
from scan.data import ImageDataset
from scan.pipeline import run_pipeline
from scan.pipeline.resolve import pretrained_overrides, resolve_config
from scan.pipeline.run import open_run
from scan.rundir.directory import LOCK_FILE, is_run_dir, lock_run_dir, release_run_dir, rewrite_data_path
from scan.rundir.trained import TrainedRun
from scan.use.images_in import as_image_tensor, load_image_paths, match_shape
from scan.use.inference import (
    cached_train_outputs,
    finished_run,
    load_classifier,
    load_names,
    open_trained_run,
    predict_proba,
    train_outputs,
)

# ------------------------------------------------------------------------ config overrides as parameters
# `cluster__epochs=5` <-> {"cluster": {"epochs": 5}}, checked against the config's fields (with a did-you-mean)
# as scikit-learn refuses unknown parameters

SECTIONS = tuple(name for name, tp in get_type_hints(Config).items() if dataclasses.is_dataclass(tp))
# Config fields that constructor parameters or `fit(X)` set: an override of them would be ignored.
_OWNED = {("seed",): "seed=", ("device",): "device=", ("quiet",): "quiet=", ("data", "num_clusters"): "n_clusters=",
          ("data", "path"): "the images given to fit(X)"}


def _key_path(key) -> tuple[str, ...]:
    """'cluster__epochs', 'cluster.epochs' -> ('cluster', 'epochs')."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"config override keys must be non-empty strings, got {key!r}")
    return tuple(part for chunk in key.split("__") for part in chunk.split("."))


def _nested(overrides) -> dict:
    """Overrides as a new nested dict: {'cluster__epochs': 5, 'model': {'width': 8}} ->
    {'cluster': {'epochs': 5}, 'model': {'width': 8}}. Flat keys may use '__' or '.'."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict such as {{'cluster': {{'epochs': 5}}}} or "
                          f"{{'cluster__epochs': 5}}, got {overrides!r}")
    out: dict = {}
    for key, value in overrides.items():
        node = _nested(value) if isinstance(value, dict) else value   # fresh dicts: the caller's are never shared
        for part in reversed(_key_path(key)):
            node = {part: node}
        out = merge(out, node)
    return out


_ABSENT = object()


def _lookup(nested: dict, path: tuple[str, ...]):
    """The value at `path` in nested overrides, or _ABSENT."""
    node = nested
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _check_key(path: tuple[str, ...]) -> None:
    """A config field must exist (with a did-you-mean), as scikit-learn refuses an unknown parameter."""
    cls = Config
    for depth, part in enumerate(path):
        where = "__".join(path[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{'__'.join(path)}': {where} is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            hint = difflib.get_close_matches(part, names, n=1)
            did = f" (did you mean '{where + '__' if where else ''}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{'__'.join(path)}'{did}; known keys"
                              f"{' of ' + where if where else ''}: {', '.join(names)}")
        cls = get_type_hints(cls)[part]


# ------------------------------------------------------------------------ the estimator

ARRAY_FILE = "images.npz"   # an in-memory training array is kept here so the run can be reopened

# Config sections (`cluster`, `selflabel`, ...): `set_params(cluster__epochs=5)` goes to `overrides`.

def _image_tensor(X) -> torch.Tensor:
    """as_image_tensor, copying a read-only array (a memmap from joblib, a frozen array) first:
    torch would warn that it cannot share non-writable memory."""
    if isinstance(X, np.ndarray) and not X.flags.writeable:
        X = X.copy()
    return as_image_tensor(X)


def _not_copied(folder, names: list[str]) -> list[str]:
    """What `save` leaves behind: training checkpoints, the run's lock and our temporary files."""
    return [n for n in names if n in ("checkpoint.pt", LOCK_FILE) or TEMP_PATTERN.match(n)]


def _is_path(x) -> bool:
    return isinstance(x, (str, Path)) or (isinstance(x, (list, tuple)) and bool(x) and
                                          all(isinstance(p, (str, Path)) for p in x))


class SCANClustering(ClusterMixin, BaseEstimator):
    """Unsupervised image clustering (SCAN) as a scikit-learn estimator.

    Parameters (each kept as given; `fit` resolves them into `config_`):
    n_clusters: number of clusters; "auto": chosen without labels (the choose stage, within the config's
        `choose` range); None keeps the config's `data.num_clusters` (None there: the number of
        ground-truth classes of a labelled data set, auto without labels).
    config: None (defaults chosen from the data, as `scan run --data`), a built-in config name,
        a YAML path or a `scan.config.Config`.
    pretrained: None, or what `scan run --pretrained NAME|FILE` takes: a frozen pretrained
        network (efficientnet_lite0|1|2) or a backbone state-dict file, with config/builtin/pretrained.yaml.
    overrides: dict of config overrides, nested ({"cluster": {"epochs": 5}}) or flat with '__'
        or '.' ({"cluster__epochs": 5}); they win over `config` and `pretrained`. The fields set by
        the parameters below and by `fit(X)` (seed, device, quiet, data.num_clusters, data.path)
        are refused here; data.dataset (default "auto" for a path X) names the format of a path.
        `set_params(cluster__epochs=5)` and `get_params()` see every override as `section__key`,
        so grid searches and pipelines reach any config field.
    seed, device, quiet: the config's fields of the same name (always applied).
    run_dir: where artifacts go (default: a temporary folder that lives as long as the fitted
        estimator); an existing run there is continued, as `scan run --out` does.

    Learned attributes: labels_ (N,), probs_ (N, C), features_ (N, D) final-model features,
    neighbors_ (N, K) mined neighbour indices, filenames_ (the image paths in the order of
    labels_ when fitted on a folder, else None), n_clusters_ (the chosen number with "auto"),
    n_clusters_curve_ ({C: neighbour modularity} of the candidates "auto" tried; None when C was given),
    n_features_in_ (values per image
    the model takes: C*H*W), cluster_names_, metrics_, config_ (the resolved Config), run_dir_.
    """

    def __init__(self, n_clusters=10, config=None, pretrained=None, overrides=None, seed=0, device="auto",
                 run_dir=None, quiet=True):
        self.n_clusters = n_clusters
        self.config = config
        self.pretrained = pretrained
        self.overrides = overrides
        self.seed = seed
        self.device = device
        self.run_dir = run_dir
        self.quiet = quiet

    # -------------------------------------------------------------- parameters

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters; with deep=True also every override as `section__key`."""
        params = super().get_params(deep=deep)
        if deep and isinstance(self.overrides, dict):
            try:
                params.update(flatten(_nested(self.overrides), "__"))
            except ConfigError:   # a malformed overrides value is reported by fit, not here
                pass
        return params

    def set_params(self, **params) -> SCANClustering:
        """Set parameters; `section__key=value` (e.g. cluster__epochs=5) sets a config override.

        Overrides go into a new dict stored in `overrides` (the one passed in is never changed).
        """
        config_keys = {k: v for k, v in params.items() if re.split(r"__|\.", k, maxsplit=1)[0] in SECTIONS}
        for key in config_keys:   # checked first, so that a misspelt key changes nothing
            _check_key(_key_path(key))
        super().set_params(**{k: v for k, v in params.items() if k not in config_keys})
        if config_keys:
            self.overrides = merge(_nested(self.overrides), _nested(config_keys))
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False   # image batches (N, H, W[, C]), tensors or paths, not tables
        tags.input_tags.three_d_array = True
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_classifier")

    # -------------------------------------------------------------- fitting

    def fit(self, X, y=None) -> SCANClustering:
        """Train on images X (array, tensor, image folder or data file); y is ignored (unsupervised)."""
        del y
        tmp = None
        if self.run_dir is None:   # kept on the instance once fitted: the folder lives as long as the estimator
            tmp = tempfile.TemporaryDirectory(prefix="scan-")
        run_dir = Path(tmp.name if tmp is not None else self.run_dir)
        data = None
        if isinstance(X, (str, Path)):
            user = {"data": {"path": str(X)}}
        elif _is_path(X):   # the training images are one folder (or data file): its files are decoded alike
            raise RunError("fit(X) takes the folder that holds the images (fit('photos/')), not a list of files; "
                           "predict(X) takes a list of files")
        else:
            images = _image_tensor(X)
            if len(images) == 0:
                raise RunError(f"fit(X) needs images; X has shape {tuple(np.shape(X))}")
            dataset = ImageDataset(images, None, None)
            data = (dataset, dataset)
            user = {"data": {"dataset": "npz", "path": str((run_dir / ARRAY_FILE).resolve())}}
        cfg = self._resolve_config(user, data)
        try:
            run = open_run(cfg, run_dir, data=data)
            if data is not None:
                # saved after open_run (which insists on an empty or existing run directory)
                np.savez(run_dir / ARRAY_FILE, images=data[0].images.permute(0, 2, 3, 1).numpy())
            run_pipeline(run)
            self._learn(finished_run(run))
        finally:   # a fitted estimator only reads its run: another process may continue training it
            release_run_dir(run_dir)
        self._tmp = tmp   # after success only: a failed refit leaves the earlier fit intact
        return self

    def _resolve_config(self, fit_data: dict, data) -> Config:
        """config < pretrained < overrides < parameters and X, as `scan run` resolves its options;
        with no config, defaults chosen from the data (as `scan run --data` without --config)."""
        overrides = _nested(self.overrides)
        for path, owner in _OWNED.items():
            if _lookup(overrides, path) is not _ABSENT:
                raise ConfigError(f"overrides sets {'__'.join(path)}: use {owner} of SCANClustering instead")
        dataset = _lookup(overrides, ("data", "dataset"))
        if data is not None and dataset not in (_ABSENT, "npz"):
            raise ConfigError(f"overrides sets data__dataset={dataset!r}, but fit(X) was given images, not a path")
        if data is None and dataset is _ABSENT:
            fit_data = merge(fit_data, {"data": {"dataset": "auto"}})   # the format is recognised from the files
        if self.pretrained is not None:   # exactly what `scan run --pretrained` applies
            overrides = merge(pretrained_overrides(str(self.pretrained)), overrides)
        params = {"seed": self.seed, "device": self.device, "quiet": self.quiet}
        if self.n_clusters is not None:
            params["data"] = {"num_clusters": self.n_clusters}
        return resolve_config(self.config, merge(merge(overrides, params), fit_data), data)[0]

    def _learn(self, run: TrainedRun) -> SCANClustering:
        """Set the learned attributes from a finished run."""
        outputs = train_outputs(run)
        self.run_dir_ = run.run_dir
        self.config_ = run.cfg
        self.n_clusters_ = run.num_clusters
        choice = run.record("choose") if run.cfg.data.num_clusters == AUTO else None
        self.n_clusters_curve_ = {int(c): q for c, q in choice["curve"].items()} if choice else None
        self.probs_ = outputs.probs
        self.labels_ = outputs.probs.argmax(1)
        self.features_ = outputs.features
        self.neighbors_ = np.load(run.path("mine", "neighbors.npy"))
        # image folders: their files; arrays and data files: row numbers (no file names to give)
        ids = list(outputs.ids)
        self.filenames_ = None if ids == [str(i) for i in range(len(ids))] else ids
        self.cluster_names_ = load_names(run)
        self.metrics_ = run.metrics
        self._run = run.on(run.rt)   # without the training data
        self.n_features_in_ = int(np.prod(run.info["image_shape"]))
        self._classifier = load_classifier(self._run)
        return self

    # -------------------------------------------------------------- predicting

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("this SCANClustering is not fitted yet: call fit(X) or SCANClustering.load(path)")

    def _images(self, X) -> torch.Tensor:
        shape = self._run.info["image_shape"]
        if _is_path(X):
            return load_image_paths([X] if isinstance(X, (str, Path)) else X, shape).images
        return match_shape(_image_tensor(X), shape)

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
        if is_run_dir(path):
            lock_run_dir(path)   # a live `scan run` there holds it: refused (naming it), never swapped under it
        try:
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
        finally:
            release_run_dir(path)
        return path

    @classmethod
    def load(cls, path, device: str = "auto") -> SCANClustering:
        """An estimator fitted by `save`, or from any `scan run` output directory.

        Its parameters describe that run (its config, seed, cluster count, run_dir=path), so
        fitting it again continues training in `path`.
        """
        run = open_trained_run(path, device=device)
        if cached_train_outputs(run) is None:   # e.g. a run from an older version: recompute from its data
            run = open_trained_run(path, device=device, with_data=True)
        cfg = run.cfg
        estimator = cls(n_clusters=run.num_clusters, config=cfg, seed=cfg.seed, device=device, run_dir=path,
                        quiet=cfg.quiet)
        return estimator._learn(run)
