"""A self-contained HTML gallery of a run's clusters (`report.html`, opens from disk, offline).

Thumbnails are embedded as base64 PNG data URIs and charts are inline SVG, so the one file
can be mailed or archived. Contents: summary and metrics, cluster sizes, a row-normalised
confusion matrix (when labels exist), training curves, then one `<section class="cluster">`
per cluster with its prototypes, a sample of its members and its least confident members.
"""
from __future__ import annotations

import base64
import datetime
import io
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from scan.checkpoint import atomic_write_text, read_json
from scan.inference import TrainOutputs, cluster_title, load_names, open_trained_run, train_outputs
from scan.metrics import cluster_to_class, contingency
from scan.report_style import CSS
from scan.report_trust import trust_card
from scan.run import Run, final_stage

REPORT_FILE = "report.html"
TOP_CONFIDENT = 10     # prototypes: closest to the mean feature of this many most confident members (paper)
NUM_PROTOTYPES = 6
NUM_SAMPLE = 20
NUM_LEAST = 6
PIXELATED_BELOW = 24   # thumbnails of smaller images are upscaled without smoothing (crisp 8x8 digits)
THUMBNAIL_MAX = 128    # larger images are shrunk to this side: the page stays small with 224 px inputs


def write_report(run_dir, device: str = "auto") -> Path:
    """Write `<run_dir>/report.html` for a finished run (reloads its training images) and return its path."""
    return write_run_report(open_trained_run(run_dir, device, with_data=True))


def write_run_report(run: Run) -> Path:
    """Write report.html for an open Run that holds its training data; return its path."""
    outputs = train_outputs(run)
    names = load_names(run.run_dir)
    path = run.path(REPORT_FILE)
    atomic_write_text(path, render(run, outputs, names))
    return path


# ------------------------------------------------------------------------ choosing images

def prototypes(members: np.ndarray, confidence: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """The k members closest (cosine) to the mean feature of the cluster's most confident members.

    members: indices of the cluster's images; confidence (N,), features (N, D) of all images.
    """
    if not len(members):
        return members
    feats = features[members] / np.maximum(np.linalg.norm(features[members], axis=1, keepdims=True), 1e-12)
    top = np.argsort(-confidence[members], kind="stable")[:TOP_CONFIDENT]
    center = feats[top].mean(0)
    return members[np.argsort(-(feats @ center), kind="stable")[:k]]


def cluster_views(cluster: int, pred: np.ndarray, confidence: np.ndarray, features: np.ndarray,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Image indices to show for one cluster: prototypes, a random sample and the least confident."""
    members = np.flatnonzero(pred == cluster)
    by_confidence = members[np.argsort(confidence[members], kind="stable")]
    sample = np.sort(rng.choice(members, size=min(NUM_SAMPLE, len(members)), replace=False))
    return {"Prototypes": prototypes(members, confidence, features, NUM_PROTOTYPES),
            "Least confident": by_confidence[:NUM_LEAST], "Sample": sample}


# ------------------------------------------------------------------------ small HTML helpers

def cluster_color(cluster: int) -> str:
    """Well-separated hues: successive clusters step around the colour wheel by the golden angle."""
    return f"hsl({cluster * 137.508 % 360:.0f}, 58%, 48%)"


def _thumbnail(image) -> str:
    """A (C, H, W) uint8 tensor as a PNG data URI."""
    array = image.numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    pil.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(label)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">{body}</svg>')


def _short(text: str, length: int = 18) -> str:
    return text if len(text) <= length else text[:length - 1] + "…"


def bar_chart(sizes: np.ndarray, titles: list[str]) -> str:
    """Horizontal bars, one per cluster, labelled with the cluster title and its size."""
    row, label_w, bar_w = 22, 150, 300
    top = max(int(sizes.max()), 1)
    parts = []
    for c, (size, title) in enumerate(zip(sizes, titles)):
        y = c * row
        w = max(bar_w * size / top, 1)
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(_short(title))}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" rx="3" '
                     f'fill="{cluster_color(c)}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{int(size)}</text>')
    return _svg(label_w + bar_w + 50, row * len(sizes) + 4, "".join(parts), "cluster sizes")


def heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str]) -> str:
    """Values in [0, 1] as cells shaded from white to the accent colour; percentages when cells are big."""
    rows, cols = matrix.shape
    cell = int(np.clip(440 / max(rows, cols), 8, 34))
    left, top = 110, 90
    parts = []
    for i, label in enumerate(row_labels):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end">'
                     f'{escape(_short(label, 14))}</text>')
    for j, label in enumerate(col_labels):
        x, y = left + j * cell + cell / 2 + 4, top - 6
        parts.append(f'<text x="{x:.1f}" y="{y}" transform="rotate(-50 {x:.1f} {y})">{escape(_short(label, 14))}'
                     f'</text>')
    for i in range(rows):
        for j in range(cols):
            v = float(matrix[i, j])
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#3b4fd0" '
                         f'fill-opacity="{0.04 + 0.96 * v:.3f}" stroke="#fff"/>')
            if cell >= 24 and v >= 0.005:
                colour = "#fff" if v > 0.5 else "#374151"
                parts.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" '
                             f'style="fill:{colour}">{round(100 * v)}</text>')
    # the rotated column labels lean right: leave room for the last ones
    return _svg(left + cols * cell + 70, top + rows * cell + 10, "".join(parts), "confusion matrix")


def line_chart(values: list[float], title: str) -> str:
    """A small line chart of one value per epoch, with the first and last values labelled."""
    w, h, pad_l, pad_r, pad_t, pad_b = 260, 150, 44, 12, 26, 24
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    xs = [pad_l + (w - pad_l - pad_r) * (i / max(len(values) - 1, 1)) for i in range(len(values))]
    ys = [pad_t + (h - pad_t - pad_b) * (1 - (v - lo) / span) for v in values]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    body = (f'<text x="{pad_l}" y="14" style="font-weight:600;fill:#1f2430">{escape(title)}</text>'
            f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - pad_r}" y2="{h - pad_b}" stroke="#d1d5db"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{h - pad_b}" stroke="#d1d5db"/>'
            f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{pad_l - 4}" y="{h - pad_b}" text-anchor="end">{lo:.3g}</text>'
            f'<text x="{w - pad_r}" y="{h - 6}" text-anchor="end">epoch {len(values)}</text>'
            f'<text x="{pad_l}" y="{h - 6}">1</text>'
            f'<polyline points="{points}" fill="none" stroke="#3b4fd0" stroke-width="2" stroke-linejoin="round"/>'
            + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#3b4fd0"/>' for x, y in zip(xs, ys)))
    return _svg(w, h, body, f"{title} per epoch")


# ------------------------------------------------------------------------ report sections

def _loss_histories(run: Run) -> dict[str, list[float]]:
    """{stage: loss per epoch} for every stage whose done.json holds a per-epoch history."""
    curves = {}
    for record_file in sorted(run.run_dir.glob("*/done.json"), key=lambda p: p.stat().st_mtime):
        history = (read_json(record_file) or {}).get("history") or []
        losses = [h["loss"] for h in history if isinstance(h.get("loss"), (int, float))]
        if losses:
            curves[record_file.parent.name] = losses
    return curves


def _stat(label: str, value) -> str:
    return f'<div class="stat"><div class="v">{escape(str(value))}</div><div class="k">{escape(label)}</div></div>'


def _summary(run: Run, num_images: int) -> str:
    d = run.cfg.data
    source = f"{d.path} ({d.dataset})" if d.path else d.dataset
    size = "×".join(str(s) for s in run.info["image_shape"][1:])
    stats = [_stat("images", f"{num_images:,}"), _stat("clusters", run.num_clusters), _stat("image size", size),
             _stat("final model", final_stage(run)), _stat("backbone", run.cfg.model.backbone)]
    return (f'<div class="card"><h2>Summary</h2><p class="source">Data: <code>{escape(source)}</code> · '
            f'run <code>{escape(str(run.run_dir))}</code></p>'
            f'<div class="stats">{"".join(stats)}</div></div>')


def _metrics_table(metrics: dict) -> str:
    """Accuracy and friends of every evaluated stage (only when the run had labels)."""
    stages = [s for s, m in metrics.items() if isinstance(m, dict) and "acc" in m]
    if not stages:
        return ""
    columns = [c for c in ("acc", "nmi", "ari", "top5") if any(c in metrics[s] for s in stages)]
    head = "".join(f"<th>{c.upper() if c != 'top5' else 'Top-5'}</th>" for c in columns)
    label = {"kmeans": "k-means (pretext features)", "kmeans_pixels": "k-means (raw pixels)"}
    rows = "".join(f"<tr><td>{label.get(s, escape(s))}</td>"
                   + "".join(f"<td>{metrics[s][c]:.3f}</td>" if c in metrics[s] else "<td>–</td>" for c in columns)
                   + "</tr>" for s in stages)
    note = f"on the '{escape(str(metrics.get('split')))}' split ({metrics.get('num_eval')} images)"
    if "neighbor_purity" in metrics:
        note += f" · neighbour purity {metrics['neighbor_purity']:.3f}"
    return (f'<div class="card"><h2>Metrics</h2><table class="metrics"><tr><th>stage</th>{head}</tr>{rows}</table>'
            f'<p class="note">{note}</p></div>')


def _confusion(run: Run, pred: np.ndarray, titles: list[str]) -> str:
    """True classes × clusters, each row normalised; clusters ordered by the class they match."""
    labels = run.train.labels
    if labels is None:
        return ""
    num_classes = run.info["num_classes"]
    counts = contingency(pred, labels, run.num_clusters, num_classes).T        # (classes, clusters)
    mapping = cluster_to_class(pred, labels, run.num_clusters, num_classes)
    order = np.lexsort((-counts.sum(0), mapping))
    matrix = counts[:, order] / np.maximum(counts.sum(1, keepdims=True), 1)
    classes = run.train.class_names or [str(k) for k in range(num_classes)]
    return (f'<div class="card"><h2>Confusion matrix</h2>{heatmap(matrix, classes, [titles[c] for c in order])}'
            f'<p class="note">rows: true classes of the {len(labels):,} training images; '
            f'columns: clusters; each row sums to 100%</p></div>')


def _curves(run: Run) -> str:
    curves = _loss_histories(run)
    if not curves:
        return ""
    charts = "".join(line_chart(losses, f"{stage} loss") for stage, losses in curves.items())
    return f'<div class="card"><h2>Training curves</h2><div class="curves">{charts}</div></div>'


def _thumbs(indices: np.ndarray, run: Run, outputs: TrainOutputs, confidence: np.ndarray) -> str:
    pixelated = ' class="pixel"' if run.image_size < PIXELATED_BELOW else ""
    figures = []
    for i in indices:
        tip = f"{outputs.ids[i] if run.train.paths else f'image {i}'} · confidence {confidence[i]:.3f}"
        figures.append(f'<figure class="thumb"><img{pixelated} src="{_thumbnail(run.train.images[i])}" '
                       f'alt="image {i}" title="{escape(tip)}"><figcaption>{confidence[i]:.2f}</figcaption></figure>')
    return f'<div class="thumbs">{"".join(figures)}</div>'


def _cluster_section(c: int, title: str, run: Run, outputs: TrainOutputs, pred: np.ndarray,
                     rng: np.random.Generator) -> str:
    confidence = outputs.probs.max(1)
    members = np.flatnonzero(pred == c)
    meta = f"{len(members):,} images · {100 * len(members) / len(pred):.1f}%"
    if len(members):
        meta += f" · mean confidence {confidence[members].mean():.2f}"
    if run.train.labels is not None and len(members):
        counts = np.bincount(run.train.labels[members], minlength=run.info["num_classes"])
        names = run.train.class_names or [str(k) for k in range(len(counts))]
        meta += f" · mostly “{escape(names[counts.argmax()])}” ({100 * counts.max() / len(members):.0f}%)"
    head = (f'<header><span class="badge">{c}</span><h2>{escape(title)}</h2>'
            f'<span class="meta">{meta}</span></header>')
    if len(members):
        # Prototypes and least confident side by side, the (wider) sample below them.
        views = cluster_views(c, pred, confidence, outputs.features, rng)
        body = "".join(f'<div class="row{" wide" if label == "Sample" else ""}"><h3>{label}</h3>'
                       f'{_thumbs(idx, run, outputs, confidence)}</div>' for label, idx in views.items())
        body = f'<div class="views">{body}</div>'
    else:
        body = '<p class="note">No image is assigned to this cluster.</p>'
    return f'<section class="cluster card" id="cluster-{c}" style="--c:{cluster_color(c)}">{head}{body}</section>'


def render(run: Run, outputs: TrainOutputs, names: dict[int, str]) -> str:
    """The whole report as one HTML string."""
    pred = outputs.probs.argmax(1)
    titles = [cluster_title(c, names) for c in range(run.num_clusters)]
    sizes = np.bincount(pred, minlength=run.num_clusters)
    rng = np.random.default_rng(run.cfg.seed)   # the same sample on every rerun of the report
    chips = "".join(f'<a class="chip" href="#cluster-{c}" style="--c:{cluster_color(c)}"><span class="dot"></span>'
                    f'{escape(t)} <span class="n">{sizes[c]}</span></a>' for c, t in enumerate(titles))
    hint = "" if names else (f'<p class="note">Name clusters with <code>scan name {escape(str(run.run_dir))} '
                             f'0="a name" 1=…</code>, then rerun <code>scan report</code>.</p>')
    sections = "".join(_cluster_section(c, titles[c], run, outputs, pred, rng) for c in range(run.num_clusters))
    charts = (f'<div class="grid2"><div class="card"><h2>Cluster sizes</h2>{bar_chart(sizes, titles)}</div>'
              f'{_confusion(run, pred, titles)}</div>')
    source = run.cfg.data.path or run.cfg.data.dataset
    metrics = read_json(run.path("metrics.json"), {})
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>SCAN clusters · {escape(Path(str(source)).name or str(source))}</title><style>{CSS}</style></head>
<body><header class="top"><div class="wrap"><h1>{run.num_clusters} clusters in
<em>{escape(Path(str(source)).name or str(source))}</em></h1>
<p class="sub">SCAN unsupervised image classification · {len(pred):,} images · generated {stamp}</p></div></header>
<main class="wrap">{trust_card(metrics)}{_summary(run, len(pred))}{_metrics_table(metrics)}
<div class="card"><h2>Clusters</h2><nav class="chips">{chips}</nav>{hint}</div>
{charts}{_curves(run)}{sections}</main>
<footer>Prototypes are the members closest to the mean feature of the cluster's {TOP_CONFIDENT} most confident
members. Hover an image for its file and confidence.</footer></body></html>
"""

