"""The CSV files of assignments (assignments.csv of the training images, `scan predict` output).

Text cells that a spreadsheet would run as a formula (=, +, -, @ ...) are prefixed with '
(see `csv_cell`).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from scan.core.spreadsheet import csv_cell

TOP_K = 3
UNKNOWN_NAME = "unknown"   # cluster_name of a new image that is like none of the training images


@dataclass
class Trust:
    """How far to trust each assignment (scan.algo.ood), aligned with the images it describes."""
    confidence: np.ndarray      # (N,) similarity-weighted agreement of the nearest training images
    ood_score: np.ndarray       # (N,) 1 - cosine similarity to the nearest training image
    threshold: float            # ood_score above it: unknown

    @property
    def unknown(self) -> np.ndarray:
        return self.ood_score > self.threshold


def assignments_csv(ids: list[str], probs: np.ndarray, names: dict[int, str], trust: Trust,
                    name_unknown: bool = False) -> str:
    """CSV text, one row per image: path, cluster, cluster_name, confidence, probability, unknown, ood_score,
    top3 ("3:0.912 1:0.051 ..."). confidence and ood_score: see scan.algo.ood; probability: the softmax maximum.

    name_unknown: new images flagged as unknown get the cluster name "unknown" (their nearest
    cluster stays in `cluster`); training images are the clusters' members and keep their names.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "cluster", "cluster_name", "confidence", "probability", "unknown", "ood_score", "top3"])
    top = np.argsort(-probs, axis=1)[:, :TOP_K]
    for i, (image_id, p, best) in enumerate(zip(ids, probs, top)):
        unknown = bool(trust.unknown[i])
        name = UNKNOWN_NAME if unknown and name_unknown else names.get(int(best[0]), "")
        writer.writerow([csv_cell(str(image_id)), int(best[0]), csv_cell(name), f"{trust.confidence[i]:.4f}",
                         f"{p[best[0]]:.4f}", str(unknown).lower(), f"{trust.ood_score[i]:.4f}",
                         " ".join(f"{c}:{p[c]:.3f}" for c in best)])
    return buffer.getvalue()
