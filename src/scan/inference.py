"""Using a trained run: reopen it, name its clusters and assign images to them.

A run directory is the whole model: `<final stage>/model.pt` holds the weights, and the
configuration and data summary that built it (its snapshot, scan.rundir; else config.yaml and
data.json) rebuild the network, input shape and normalisation. New images are preprocessed
exactly like the training data (same decoding, crop, size and channels).

Files written here:
  names.json          {"model": "<sha256 of the named model.pt>", "names": {"3": "red cars", ...}}  (scan name)
  train_outputs.pt    probabilities and features of the training images, cached per model
  trust.pt            training features and threshold behind `confidence` and `unknown` (scan.ood), per model
  assignments.csv     path, cluster, cluster_name, confidence, probability, unknown, ood_score, top3 of every
                      training image

The CSV columns are written by scan.assignments.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scan.hashing import file_hash
from scan.checkpoint import (ArtifactError, atomic_torch_save, atomic_write_json, atomic_write_text, load_torch,
                             read_json)
from scan.data import ImageDataset
from scan.engine import Runtime, predict_in_batches, resolve_device
from scan.assignments import Trust, assignments_csv
from scan.images_in import as_image_tensor, load_image_paths, match_shape  # re-exported for callers of this API
from scan.models import Classifier, ClusteringModel
from scan.ood import TrustedClassifier, TrustHead, fit_trust
from scan.run import Run, describe_data, final_stage, load_clustering_model, load_data, load_stage_model
from scan.rundir import RunError, model_config, read_run_config

log = logging.getLogger("scan")

NAMES_FILE = "names.json"
OUTPUTS_FILE = "train_outputs.pt"
ASSIGNMENTS_FILE = "assignments.csv"
TRUST_FILE = "trust.pt"


# ------------------------------------------------------------------------ reopening a run

def open_trained_run(run_dir, device: str = "auto", with_data: bool = False) -> Run:
    """The Run of a finished training directory, rebuilt from its saved config and data summary.

    with_data=False: the training images are not loaded (predict and export need only their
    shape), the Run holds a one-image placeholder. with_data=True: the data are reloaded and must
    be the very images the run was trained on.
    """
    run_dir = Path(run_dir)
    latest, latest_info = read_run_config(run_dir)
    placeholder = ImageDataset(torch.zeros((1, *latest_info["image_shape"]), dtype=torch.uint8), None, None)
    stage = final_stage(Run(latest, run_dir, Runtime(torch.device("cpu")), placeholder, placeholder, latest_info))
    cfg, info = model_config(run_dir, stage, latest, latest_info)
    rt = Runtime(resolve_device(device), quiet=True)
    if not with_data:
        placeholder = ImageDataset(torch.zeros((1, *info["image_shape"]), dtype=torch.uint8), None, None)
        return Run(cfg, run_dir, rt, placeholder, placeholder, info)
    train, evaluation = load_data(cfg)
    if describe_data(cfg, train, evaluation)["data_hash"] != info["data_hash"]:
        raise RunError(f"{cfg.data.path or cfg.data.dataset}: the images differ from those {run_dir} was trained "
                       f"on; rerun `scan run` on them first")
    return Run(cfg, run_dir, rt, train, evaluation, info)


def load_classifier(run: Run) -> Classifier:
    """The final stage's model as images -> probabilities, in eval mode on the run's device."""
    return run.rt.prepare(Classifier(_final_model(run, load_clustering_model))).eval()


def _final_model(run: Run, load) -> ClusteringModel:
    """The final stage's model by `load(run, stage)`; weights that do not fit its config are a RunError."""
    stage = final_stage(run)
    try:
        return load(run, stage)
    except RuntimeError as e:
        if isinstance(e, ArtifactError) or "state_dict" not in str(e):
            raise
        # the weights do not fit the network its configuration describes (e.g. a model.pt copied in)
        raise RunError(f"{run.path(stage, 'model.pt')} does not match the configuration it was trained with "
                       f"({str(e).splitlines()[0]}); rerun `scan run --out {run.run_dir} --restart`") from None


def predict_proba(classifier: Classifier, images: torch.Tensor, rt: Runtime) -> np.ndarray:
    """(N, C) cluster probabilities of uint8 (N, C, H, W) images."""
    return predict_in_batches(classifier, images, rt).numpy()


# ------------------------------------------------------------------------ cluster names

_warned_stale: set[tuple[str, str]] = set()
_digests: dict[tuple, str] = {}   # (path, size, mtime, inode) -> sha256: a report reads the names several times


def model_digest(run_dir) -> str | None:
    """sha256 of the final model file, or None when the run has no trained model yet."""
    run = open_trained_run(run_dir)
    path = run.path(final_stage(run), "model.pt")
    if not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        _digests[key] = file_hash(path, length=None)
    return _digests[key]


def _read_names_file(path: Path) -> tuple[str | None, dict[int, str]]:
    """(digest of the model they name, {cluster id: name}) from names.json; RunError if malformed.

    A file written before names were tied to a model ({"3": "cats"}) has no digest.
    """
    try:
        content = read_json(path, {})
    except ValueError:
        raise RunError(f"{path}: not valid JSON; fix or delete it and name the clusters again") from None
    if not isinstance(content, dict):
        raise RunError(f"{path}: expected a JSON object of cluster names, found a {type(content).__name__}; "
                       f"fix or delete it and name the clusters again")
    digest, names = (content.get("model"), content.get("names")) if "names" in content else (None, content)
    if not isinstance(names, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in names.items()):
        raise RunError(f"{path}: cluster names must map cluster ids to strings, e.g. {{\"3\": \"red cars\"}}; "
                       f"fix or delete it and name the clusters again")
    return digest, {int(k): v for k, v in names.items()}


def load_names(run_dir) -> dict[int, str]:
    """{cluster id: name} from names.json; empty when no cluster was named.

    Names belong to the model they were given for: after a retrain (cluster ids reshuffled)
    they are not applied, with one warning.
    """
    path = Path(run_dir) / NAMES_FILE
    if not path.exists():
        return {}
    digest, names = _read_names_file(path)
    current = model_digest(run_dir)
    if digest is None or current is None or digest == current or not names:
        return names
    if (str(path), digest) not in _warned_stale:
        _warned_stale.add((str(path), digest))
        log.warning("%s names the clusters of an earlier model (retrained since, so cluster ids changed): "
                    "not applied; name them again with `scan name %s ID=NAME ...`", path, run_dir)
    return {}


def cluster_title(cluster: int, names: dict[int, str]) -> str:
    """The cluster's name, or 'cluster 3' when it has none."""
    return names.get(cluster) or f"cluster {cluster}"


def set_names(run_dir, assignments: list[str]) -> dict[int, str]:
    """Apply 'ID=NAME' assignments ('ID=' removes a name), save names.json, return all names.

    assignments.csv of the training images is rewritten with the new names when it can be
    without reloading the data.
    """
    run = open_trained_run(run_dir)
    count = run.num_clusters
    names = load_names(run_dir)
    for text in assignments:
        key, sep, name = text.partition("=")
        if not sep or not key.strip().isdigit():
            raise RunError(f"'{text}' must look like CLUSTER=NAME, e.g. 3=\"red cars\"")
        cluster = int(key)
        if cluster >= count:
            raise RunError(f"'{text}': {run_dir} has clusters 0..{count - 1}, not {cluster}")
        if name.strip():
            names[cluster] = name.strip()
        else:
            names.pop(cluster, None)
    atomic_write_json(Path(run_dir) / NAMES_FILE, {"model": model_digest(run_dir),
                                                   "names": {str(k): v for k, v in sorted(names.items())}})
    outputs = cached_train_outputs(run)
    if outputs is not None:   # keep assignments.csv in step (cheap: no data or model needed)
        atomic_write_text(run.path(ASSIGNMENTS_FILE), assignments_csv(outputs.ids, outputs.probs, names,
                                                                      train_trust(run)))
    return names


@dataclass
class TrainOutputs:
    """The final model applied to every training image."""
    ids: list[str]              # file paths for folder data, else the image index
    probs: np.ndarray           # (N, C) cluster probabilities
    features: np.ndarray        # (N, D) backbone features (prototypes in the report)


def _model_key(run: Run) -> str:
    """Identifies the final model: its stage and that stage's fingerprint."""
    stage = final_stage(run)
    return f"{stage}:{(read_json(run.path(stage, 'done.json')) or {}).get('fingerprint')}"


def cached_train_outputs(run: Run) -> TrainOutputs | None:
    """The cached outputs when they were computed by the current final model, else None."""
    path = run.path(OUTPUTS_FILE)
    if not path.exists():
        return None
    try:
        saved = load_torch(path)
    except ArtifactError:   # only a cache: recomputed and rewritten
        return None
    if not isinstance(saved, dict) or saved.get("key") != _model_key(run):
        return None
    return TrainOutputs(saved["ids"], saved["probs"].numpy(), saved["features"].numpy())


def train_outputs(run: Run) -> TrainOutputs:
    """Probabilities and features of the training images (the Run must hold its data), cached."""
    cached = cached_train_outputs(run)
    if cached is not None:
        return cached
    probs, features = run.source.train_outputs(_final_model(run, load_stage_model))
    ids = run.train.paths or [str(i) for i in range(len(run.train))]
    atomic_torch_save(run.path(OUTPUTS_FILE), {"key": _model_key(run), "ids": ids, "probs": probs,
                                               "features": features})
    return TrainOutputs(ids, probs.numpy(), features.numpy())


def _head_space(run: Run, features: np.ndarray) -> np.ndarray:
    """Training features as the cluster head sees them: cached pretrained features are standardised
    by the model's frozen statistics (FrozenFeatures) before the head, image features are not."""
    backbone = _final_model(run, load_stage_model).backbone
    standardize = getattr(backbone, "standardize", None)
    return features if standardize is None else standardize(torch.as_tensor(features)).detach().numpy()


def _trust_state(run: Run) -> dict:
    """trust.pt of the current final model, fitted on its training outputs once (needs the data when
    the training outputs are not cached yet)."""
    path = run.path(TRUST_FILE)
    if path.exists():
        try:
            saved = load_torch(path)
            if isinstance(saved, dict) and saved.get("key") == _model_key(run):
                return saved
        except ArtifactError:   # only a cache: refitted and rewritten
            pass
    outputs = cached_train_outputs(run)
    if outputs is None:   # computed from the training images, which a Run opened for predict does not hold
        outputs = train_outputs(open_trained_run(run.run_dir, str(run.rt.device), with_data=True))
    head, confidence, score = fit_trust(_head_space(run, outputs.features), outputs.probs, seed=run.cfg.seed)
    saved = {"key": _model_key(run), "head": head.state(), "train_confidence": torch.from_numpy(confidence),
             "train_score": torch.from_numpy(score)}
    atomic_torch_save(path, saved)
    return saved


def train_trust(run: Run) -> Trust:
    """Confidence, ood_score and unknown of every training image, leave-one-out, aligned with TrainOutputs."""
    saved = _trust_state(run)
    return Trust(saved["train_confidence"].numpy(), saved["train_score"].numpy(), saved["head"]["threshold"])


def trusted_classifier(run: Run) -> TrustedClassifier:
    """images -> (probabilities, confidence, ood_score), on the run's device, in eval mode (predict and export)."""
    trust = TrustHead.from_state(_trust_state(run)["head"])
    classifier = Classifier(_final_model(run, load_clustering_model))
    return run.rt.prepare(TrustedClassifier(classifier.backbone, classifier.head, trust)).eval()


@dataclass
class Predictions:
    """New images assigned by a trained run."""
    ids: list[str]
    probs: np.ndarray           # (N, C)
    trust: Trust


def predict_images(run: Run, images: torch.Tensor, ids: list[str]) -> Predictions:
    """uint8 (N, C, H, W) images, shaped like the run's training images, through `trusted_classifier`."""
    model = trusted_classifier(run)

    def columns(x):   # (B, C + 2): probabilities, confidence, ood_score
        probs, confidence, score = model(x)
        return torch.cat([probs, confidence[:, None], score[:, None]], 1)
    out = predict_in_batches(columns, images, run.rt).numpy()
    c = run.num_clusters
    return Predictions(ids, out[:, :c], Trust(out[:, c], out[:, c + 1], model.trust.threshold))


def write_train_assignments(run: Run) -> Path:
    """assignments.csv for the training images of a finished run (the Run must hold its data)."""
    out = train_outputs(run)
    path = run.path(ASSIGNMENTS_FILE)
    atomic_write_text(path, assignments_csv(out.ids, out.probs, load_names(run.run_dir), train_trust(run)))
    return path
