"""A trained run as one object, read from its directory once: the configuration and data summary
that built its final model, which stage that is, every stage's done.json and the metrics, and (read
on first use, then kept) the model weights, their digest and the model built from them.

It holds no device and no data: `on(device, data)` binds a copy to a device (predict, export) and,
where a command needs them (the report, assignments.csv), to the training images.

    run = TrainedRun.open("runs/photos").on("cpu")
    model = run.image_model()      # images -> logits of the final stage's kept head
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from scan.config import Config
from scan.core.checkpoint import FORMAT_VERSION, load_state_dict, read_json
from scan.core.errors import RunError, typed
from scan.core.hashing import file_hash
from scan.data import ImageDataset, content_hash, load_data
from scan.nets.models import ClusteringModel
from scan.rundir.directory import MARKER, model_config, read_record, read_run_config
from scan.train.engine import Runtime, resolve_device
from scan.train.sources import RunContext

log = logging.getLogger("scan")

METRICS_FILE = "metrics.json"


def read_marker(run_dir: Path) -> dict:
    """run.json: the run-directory format (a run of another format is refused) and the model stages."""
    try:
        marker = read_json(run_dir / MARKER) or {}
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        raise RunError(f"{run_dir / MARKER} is damaged; rerun `scan run --out {typed(run_dir)}` to rewrite it")
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise RunError(f"{run_dir} was written by a scan with run-directory format {version}, this one reads "
                       f"{FORMAT_VERSION}: use the scan that wrote it, or retrain with `scan run --out {typed(run_dir)} "
                       f"--restart`")
    return marker


def final_stage(run_dir: Path, metrics: dict, model_stages: list[str]) -> str:
    """The stage whose model is the run's result: the one its last evaluation used (metrics.json);
    before any evaluation (or when that model is gone), the last of the run's model stages (run.json)
    whose model exists."""
    evaluated = metrics.get("final_stage")
    if isinstance(evaluated, str) and (run_dir / evaluated / "model.pt").is_file():
        return evaluated
    trained = [stage for stage in model_stages if (run_dir / stage / "model.pt").is_file()]
    if not trained and not model_stages:
        raise RunError(f"{run_dir} has no trained model: run `scan run --out {typed(run_dir)}` first")
    stage = (trained or model_stages[:1])[-1]
    if isinstance(evaluated, str) and trained:
        log.warning("%s is missing: using the %s model instead (rerun `scan run --out %s` to restore it)",
                    run_dir / evaluated / "model.pt", stage, typed(run_dir))
    return stage


@dataclass(frozen=True)
class TrainedRun(RunContext):
    run_dir: Path
    cfg: Config                    # the configuration that built the final model (its snapshot)
    info: dict                     # the data summary it was trained on
    final_stage: str               # the stage whose model.pt is the result
    records: dict                  # {stage: its done.json}, oldest first
    metrics: dict                  # metrics.json; empty before the evaluate stage
    rt: Runtime | None = None      # set by `on`
    train: ImageDataset | None = None   # the training images, when `on` was given them
    eval: ImageDataset | None = None
    # what a command computes from this run and reuses (training outputs, trust): shared by its bound copies
    computed: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, run_dir, records: dict | None = None, metrics: dict | None = None) -> TrainedRun:
        """Read config.yaml, data.json, metrics.json, every stage's done.json and the final model's
        configuration snapshot, once each; `records` and `metrics` that the caller holds (a run that
        just trained) are not read again."""
        run_dir = Path(run_dir)
        latest, latest_info = read_run_config(run_dir)
        if metrics is None:
            try:
                metrics = read_json(run_dir / METRICS_FILE, {})
            except ValueError:   # a damaged metrics.json only loses which model was evaluated last
                metrics = {}
        metrics = metrics if isinstance(metrics, dict) else {}
        if records is None:
            records = {}
            for file in sorted(run_dir.glob("*/done.json"), key=lambda p: p.stat().st_mtime):
                if (record := read_record(file)) is not None:
                    records[file.parent.name] = record
        stage = final_stage(run_dir, metrics, list(read_marker(run_dir).get("model_stages") or []))
        cfg, info = model_config(run_dir, stage, latest, latest_info, records.get(stage, {}).get("fingerprint"))
        return cls(run_dir, cfg, info, stage, records, metrics)

    def on(self, device="auto", data: tuple[ImageDataset, ImageDataset] | None = None,
           with_data: bool = False) -> TrainedRun:
        """A copy bound to a device (a name or a Runtime) and, given `data` or with_data=True (reloaded
        from the configuration and checked to be the very images the run was trained on), to the data."""
        rt = device if isinstance(device, Runtime) else Runtime(resolve_device(device), quiet=True)
        if data is None and with_data:
            data = load_data(self.cfg)
            if content_hash(data[0].images) != self.info["data_hash"]:   # data.json's hash of the training pixels
                raise RunError(f"{self.cfg.data.path or self.cfg.data.dataset}: the images differ from those "
                               f"{self.run_dir} was trained on; rerun `scan run` on them first")
        train, evaluation = data if data is not None else (None, None)
        bound = dataclasses.replace(self, rt=rt, train=train, eval=evaluation, computed=self.computed)
        bound.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("weights", "digest", "model")})
        return bound

    def record(self, stage: str) -> dict | None:
        """The stage's done.json as read when the run was opened; None if it has none."""
        return self.records.get(stage)

    @property
    def fingerprint(self) -> str | None:
        """The final stage's fingerprint (its done.json)."""
        return self.records.get(self.final_stage, {}).get("fingerprint")

    @property
    def model_key(self) -> str:
        """Identifies the final model: its stage and that stage's fingerprint (the caches' key)."""
        return f"{self.final_stage}:{self.fingerprint}"

    @property
    def model_file(self) -> Path:
        return self.path(self.final_stage, "model.pt")

    @cached_property
    def weights(self) -> dict:
        """The final model's state dict, read once (an ArtifactError naming the file if it is not one)."""
        if not self.model_file.is_file():
            raise RunError(f"{self.model_file} is missing: run the {self.final_stage} stage first "
                           f"(scan {self.final_stage} --run-dir {typed(self.run_dir)})")
        return load_state_dict(self.model_file)

    @cached_property
    def digest(self) -> str | None:
        """sha256 of the final model file (names.json names the clusters of one model); None without one."""
        return file_hash(self.model_file, length=None) if self.model_file.is_file() else None

    @cached_property
    def model(self) -> ClusteringModel:
        """The final stage's model as it trained (over cached features for a pretrained run), built once."""
        model, weights = self.source.new_model(1), self.weights
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            # the weights do not fit the network its configuration describes (e.g. a model.pt copied in)
            raise RunError(f"{self.model_file} does not match the configuration it was trained with "
                           f"({str(e).splitlines()[0]}); rerun `scan run --out {typed(self.run_dir)} --restart`") from None
        return model

    def image_model(self) -> ClusteringModel:
        """The final model mapping images to logits (cached features get their pretrained network attached)."""
        return self.source.image_model(self.model)
