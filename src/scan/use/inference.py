"""Using a trained run: reopen it, name its clusters and assign images to them.

A run directory is the whole model: `<final stage>/model.pt` holds the weights, and the
configuration and data summary that built it (its snapshot, scan.rundir.directory; else config.yaml and
data.json) rebuild the network, input shape and normalisation. New images are preprocessed
exactly like the training data (same decoding, crop, size and channels).

Files written here:
  names.json          {"model": "<sha256 of the named model.pt>", "names": {"3": "red cars", ...}}  (scan name)
  train_outputs.pt    probabilities and features of the training images, cached per model
  trust.pt            training features and threshold behind `confidence` and `unknown` (scan.algo.ood), per model
  assignments.csv     path, cluster, cluster_name, confidence, probability, unknown, ood_score, top3 of every
                      training image

The CSV columns are written by scan.use.assignments.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scan.algo.ood import TrustedClassifier, TrustHead, fit_trust
from scan.core.checkpoint import as_json, atomic_torch_save, atomic_write_json, atomic_write_text, load_torch, read_json
from scan.core.errors import ArtifactError, RunError, typed  # noqa: F401  (RunError: part of this API)
from scan.nets.models import Classifier
from scan.rundir.trained import TrainedRun
from scan.train.engine import Runtime, predict_in_batches
from scan.use.assignments import Trust, assignments_csv

log = logging.getLogger("scan")

NAMES_FILE = "names.json"
OUTPUTS_FILE = "train_outputs.pt"
ASSIGNMENTS_FILE = "assignments.csv"
TRUST_FILE = "trust.pt"


# ------------------------------------------------------------------------ reopening a run

def open_trained_run(run_dir, device="auto", with_data: bool = False) -> TrainedRun:
    """The trained run in `run_dir` (scan.rundir.trained), bound to `device`; with_data=True also
    reloads its training images, which must be the very images it was trained on."""
    return TrainedRun.open(run_dir).on(device, with_data=with_data)


def finished_run(run, metrics: dict | None = None) -> TrainedRun:
    """The trained run of a Run that just finished training (scan.pipeline.run), with the data, device,
    stage records and evaluation metrics it already holds."""
    metrics = None if metrics is None else as_json(metrics)   # as metrics.json holds them
    return TrainedRun.open(run.run_dir, records=run.records, metrics=metrics).on(run.rt, data=(run.train, run.eval))


def load_classifier(run: TrainedRun) -> Classifier:
    """The final stage's model as images -> probabilities, in eval mode on the run's device."""
    return run.rt.prepare(Classifier(run.image_model())).eval()


def predict_proba(classifier: Classifier, images: torch.Tensor, rt: Runtime) -> np.ndarray:
    """(N, C) cluster probabilities of uint8 (N, C, H, W) images."""
    return predict_in_batches(classifier, images, rt).numpy()


# ------------------------------------------------------------------------ cluster names

_warned_stale: set[tuple[str, str]] = set()


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
    if not isinstance(names, dict) or not all(str(k).isdecimal() and isinstance(v, str) for k, v in names.items()):
        raise RunError(f"{path}: cluster names must map cluster ids to strings, e.g. {{\"3\": \"red cars\"}}; "
                       f"fix or delete it and name the clusters again")
    return digest, {int(k): v for k, v in names.items()}


def load_names(run: TrainedRun) -> dict[int, str]:
    """{cluster id: name} from names.json; empty when no cluster was named.

    Names belong to the model they were given for: after a retrain (cluster ids reshuffled)
    they are not applied, with one warning.
    """
    path = run.path(NAMES_FILE)
    if not path.exists():
        return {}
    digest, names = _read_names_file(path)
    current = run.digest
    if digest is None or current is None or digest == current or not names:
        return names
    if (str(path), digest) not in _warned_stale:
        _warned_stale.add((str(path), digest))
        log.warning("%s names the clusters of an earlier model (retrained since, so cluster ids changed): "
                    "not applied; name them again with `scan name %s ID=NAME ...`", path, typed(run.run_dir))
    return {}


def cluster_title(cluster: int, names: dict[int, str]) -> str:
    """The cluster's name, or 'cluster 3' when it has none."""
    return names.get(cluster) or f"cluster {cluster}"


def set_names(run: TrainedRun, assignments: list[str]) -> dict[int, str]:
    """Apply 'ID=NAME' assignments ('ID=' removes a name), save names.json, return all names.

    assignments.csv of the training images is rewritten with the new names when it can be
    without reloading the data.
    """
    count = run.num_clusters
    names = load_names(run)
    for text in assignments:
        key, sep, name = text.partition("=")
        if not sep or not key.strip().isdecimal():   # isdigit() accepts '²', which int() refuses
            raise RunError(f"'{text}' must look like CLUSTER=NAME, e.g. 3=\"red cars\"")
        cluster = int(key)
        if cluster >= count:
            raise RunError(f"'{text}': {run.run_dir} has clusters 0..{count - 1}, not {cluster}")
        if name.strip():
            names[cluster] = name.strip()
        else:
            names.pop(cluster, None)
    atomic_write_json(run.path(NAMES_FILE), {"model": run.digest,
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


def _save_cache(path: Path, obj: dict) -> None:
    """Keep a computed cache for later commands; a run directory that cannot be written (read-only, a full
    disk) still serves this command, which says so once, with what it costs."""
    try:
        atomic_torch_save(path, obj)
    except ArtifactError as e:
        log.warning("%s; computed for this command only, and again by every command on this run", e)


def cached_train_outputs(run: TrainedRun) -> TrainOutputs | None:
    """The cached outputs when they were computed by the current final model, else None (read once
    per command: kept in `run.computed`)."""
    if "outputs" in run.computed:
        return run.computed["outputs"]
    path = run.path(OUTPUTS_FILE)
    if not path.exists():
        return None
    try:
        saved = load_torch(path)
    except ArtifactError:   # only a cache: recomputed and rewritten
        return None
    if not isinstance(saved, dict) or saved.get("key") != run.model_key:
        return None
    outputs = TrainOutputs(saved["ids"], saved["probs"].numpy(), saved["features"].numpy())
    run.computed["outputs"] = outputs
    return outputs


def train_outputs(run: TrainedRun) -> TrainOutputs:
    """Probabilities and features of the training images (the Run must hold its data), cached."""
    cached = cached_train_outputs(run)
    if cached is not None:
        return cached
    probs, features = run.source.train_outputs(run.model)
    ids = run.train.paths or [str(i) for i in range(len(run.train))]
    _save_cache(run.path(OUTPUTS_FILE), {"key": run.model_key, "ids": ids, "probs": probs, "features": features})
    run.computed["outputs"] = TrainOutputs(ids, probs.numpy(), features.numpy())
    return run.computed["outputs"]


def _head_space(run: TrainedRun, features: np.ndarray) -> np.ndarray:
    """Training features as the cluster head sees them: cached pretrained features are standardised
    by the model's frozen statistics (FrozenFeatures) before the head, image features are not."""
    backbone = run.model.backbone
    standardize = getattr(backbone, "standardize", None)
    return features if standardize is None else standardize(torch.as_tensor(features)).detach().numpy()


def _trust_state(run: TrainedRun) -> dict:
    """trust.pt of the current final model, fitted on its training outputs once (needs the data when
    the training outputs are not cached yet); kept in `run.computed` for the rest of the command."""
    if "trust" in run.computed:
        return run.computed["trust"]
    path = run.path(TRUST_FILE)
    if path.exists():
        try:
            saved = load_torch(path)
            if isinstance(saved, dict) and saved.get("key") == run.model_key:
                run.computed["trust"] = saved
                return saved
        except ArtifactError:   # only a cache: refitted and rewritten
            pass
    outputs = cached_train_outputs(run)
    if outputs is None:   # computed from the training images, which a Run opened for predict does not hold
        outputs = train_outputs(run.on(run.rt, with_data=True))
    head, confidence, score = fit_trust(_head_space(run, outputs.features), outputs.probs, seed=run.cfg.seed)
    saved = {"key": run.model_key, "head": head.state(), "train_confidence": torch.from_numpy(confidence),
             "train_score": torch.from_numpy(score)}
    _save_cache(path, saved)
    run.computed["trust"] = saved
    return saved


def train_trust(run: TrainedRun) -> Trust:
    """Confidence, ood_score and unknown of every training image, leave-one-out, aligned with TrainOutputs."""
    saved = _trust_state(run)
    return Trust(saved["train_confidence"].numpy(), saved["train_score"].numpy(), saved["head"]["threshold"])


def trusted_classifier(run: TrainedRun) -> TrustedClassifier:
    """images -> (probabilities, confidence, ood_score), on the run's device, in eval mode (predict and export)."""
    trust = TrustHead.from_state(_trust_state(run)["head"])
    classifier = Classifier(run.image_model())
    return run.rt.prepare(TrustedClassifier(classifier.backbone, classifier.head, trust)).eval()


@dataclass
class Predictions:
    """New images assigned by a trained run."""
    ids: list[str]
    probs: np.ndarray           # (N, C)
    trust: Trust


def predict_images(run: TrainedRun, images: torch.Tensor, ids: list[str]) -> Predictions:
    """uint8 (N, C, H, W) images, shaped like the run's training images, through `trusted_classifier`."""
    model = trusted_classifier(run)

    def columns(x):   # (B, C + 2): probabilities, confidence, ood_score
        probs, confidence, score = model(x)
        return torch.cat([probs, confidence[:, None], score[:, None]], 1)
    out = predict_in_batches(columns, images, run.rt).numpy()
    c = run.num_clusters
    return Predictions(ids, out[:, :c], Trust(out[:, c], out[:, c + 1], model.trust.threshold))


def write_train_assignments(run: TrainedRun) -> Path:
    """assignments.csv for the training images of a finished run (the Run must hold its data)."""
    out = train_outputs(run)
    path = run.path(ASSIGNMENTS_FILE)
    atomic_write_text(path, assignments_csv(out.ids, out.probs, load_names(run), train_trust(run)))
    return path
