"""Training logs people can read and keep: an epoch-level progress bar per stage, RUN_DIR/metrics.csv
with one row per epoch and stage, and TensorBoard event files when asked (`log: tensorboard`).

The bar counts epochs ("pretext epoch 3/40", with rate and time left); the steps of the current
epoch show after it, so a long epoch still moves. The table and the event files are written after
the epoch's checkpoint, so what they hold is always what a resumed run continues from.

    stage,epoch,loss,...,seconds,checkpoint_seconds
    pretext,1,5.21,...,3.02,0.01
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from scan.core.checkpoint import atomic_write_text
from scan.core.errors import ConfigError
from scan.core.spreadsheet import csv_cell

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
INSTALL_TENSORBOARD = "pip install 'scan-clustering[tensorboard]'"


def check_log_writer(name: str) -> None:
    """ConfigError, before any work starts, when `log: tensorboard` is asked and the package is missing."""
    if name != "tensorboard":
        return
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ConfigError(f"log=tensorboard needs the tensorboard package, which is not installed: "
                          f"{INSTALL_TENSORBOARD} (or leave --log out; metrics.csv is always written)") from None


@dataclass
class TrainingLog:
    """Where a run's epochs are recorded: RUN_DIR/metrics.csv, and event files when `writer` is tensorboard."""
    run_dir: Path
    writer: str = "none"

    def open_events(self):
        """A TensorBoard writer for RUN_DIR/tensorboard, or None unless `log: tensorboard`."""
        if self.writer != "tensorboard":
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def forget_after(self, stage: str, epoch: int) -> None:
        """Drop the stage's rows after `epoch` (a stage starting over, or resuming from its checkpoint)."""
        path = self.run_dir / METRICS_FILE
        rows, columns = read_rows(path)
        kept = [r for r in rows if not (r["stage"] == csv_cell(stage) and int(r["epoch"]) > epoch)]
        if len(kept) != len(rows):
            write_rows(path, kept, columns)


def numbers(stats: dict) -> dict[str, float]:
    """The numeric per-epoch statistics (flags such as `stop` and the epoch number itself left out)."""
    return {k: v for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows and columns of metrics.csv; rows without a stage and an integer epoch (a damaged
    file) are dropped rather than stopping the training that appends to it."""
    if not path.is_file():
        return [], ["stage", "epoch"]
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("stage") and str(r.get("epoch") or "").isdigit()]
        columns = [c for c in reader.fieldnames or () if c]
    return rows, ["stage", "epoch"] + [c for c in columns if c not in ("stage", "epoch")]


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def record_epoch(path: Path, stage: str, stats: dict) -> None:
    """Add (or replace) the row of (stage, epoch); a new statistic becomes a new column."""
    rows, columns = read_rows(path)
    epoch = str(int(stats["epoch"]))
    row = {"stage": csv_cell(stage), "epoch": epoch, **{k: f"{v:.6g}" for k, v in numbers(stats).items()}}
    columns += [k for k in row if k not in columns]
    rows = [r for r in rows if not (r["stage"] == row["stage"] and r["epoch"] == epoch)] + [row]
    write_rows(path, rows, columns)


class EpochBar:
    """The progress bar of one stage's epoch loop, and the hook that records each finished epoch."""

    def __init__(self, stage: str, epochs: int, start: int, steps_per_epoch: int, quiet: bool,
                 log: TrainingLog | None):
        self.stage, self.steps, self.step, self.log = stage, steps_per_epoch, 0, log
        self.last = ""   # the statistics of the last finished epoch, shown after the step count
        self.bar = tqdm(total=epochs, initial=start, desc=f"{stage} epoch", unit="epoch", disable=quiet,
                        dynamic_ncols=True, file=sys.stderr)
        self.events = None
        if log is not None:
            log.forget_after(stage, start)
            self.events = log.open_events()

    def tick(self) -> None:
        """One optimisation step done: shown after the bar, redrawn at most every 0.1 s."""
        self.step += 1
        self.bar.set_postfix_str(", ".join(filter(None, (f"step {self.step}/{self.steps}", self.last))),
                                 refresh=False)
        self.bar.update(0)

    def epoch_done(self, stats: dict) -> None:
        self.step = 0
        self.last = ", ".join(f"{k}={v:.4g}" for k, v in numbers(stats).items() if "seconds" not in k)
        self.bar.set_postfix_str(self.last, refresh=False)
        self.bar.update(1)
        if self.log is not None:
            record_epoch(self.log.run_dir / METRICS_FILE, self.stage, stats)
        if self.events is not None:
            for key, value in numbers(stats).items():
                self.events.add_scalar(f"{self.stage}/{key}", value, global_step=int(stats["epoch"]))
            self.events.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.events is not None:
            self.events.close()
        return False
