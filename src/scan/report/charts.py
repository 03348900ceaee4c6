"""The report's inline SVG charts: cluster sizes, confusion matrix, loss curves, confidence histograms.

Plain SVG strings (no plotting library, no script): they render in any browser, offline.
"""
from __future__ import annotations

from html import escape

import numpy as np


def cluster_color(cluster: int) -> str:
    """Well-separated hues: successive clusters step around the colour wheel by the golden angle."""
    return f"hsl({cluster * 137.508 % 360:.0f}, 58%, 48%)"


def svg(width: int, height: int, body: str, label: str, css_class: str = "") -> str:
    klass = f' class="{css_class}"' if css_class else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg"{klass} role="img" aria-label="{escape(label)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">{body}</svg>')


def short(text: str, length: int = 18) -> str:
    return text if len(text) <= length else text[:length - 1] + "…"


def bar_chart(sizes: np.ndarray, titles: list[str]) -> str:
    """Horizontal bars, one per cluster, labelled with the cluster title and its size."""
    row, label_w, bar_w = 22, 150, 300
    top = max(int(sizes.max()), 1)
    parts = []
    for c, (size, title) in enumerate(zip(sizes, titles)):
        y = c * row
        w = max(bar_w * size / top, 1)
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(short(title))}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" rx="3" '
                     f'fill="{cluster_color(c)}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{int(size)}</text>')
    return svg(label_w + bar_w + 50, row * len(sizes) + 4, "".join(parts), "cluster sizes")


def heatmap(matrix: np.ndarray, row_labels: list[str], col_labels: list[str]) -> str:
    """Values in [0, 1] as cells shaded from white to the accent colour; percentages when cells are big."""
    rows, cols = matrix.shape
    cell = int(np.clip(440 / max(rows, cols), 8, 34))
    left, top = 110, 90
    parts = []
    for i, label in enumerate(row_labels):
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.1f}" text-anchor="end">'
                     f'{escape(short(label, 14))}</text>')
    for j, label in enumerate(col_labels):
        x, y = left + j * cell + cell / 2 + 4, top - 6
        parts.append(f'<text x="{x:.1f}" y="{y}" transform="rotate(-50 {x:.1f} {y})">{escape(short(label, 14))}'
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
    return svg(left + cols * cell + 70, top + rows * cell + 10, "".join(parts), "confusion matrix")


def line_chart(values: list[float], title: str, xs: list[int] | None = None, x_label: str = "epoch",
               mark: int | None = None) -> str:
    """A small line chart of one value per epoch (or per `xs`, e.g. per number of clusters), with the extreme
    values labelled; `mark`: the x whose point is ringed and labelled (a choice made from the curve)."""
    w, h, pad_l, pad_r, pad_t, pad_b = 260, 150, 44, 12, 26, 24
    xs = list(range(1, len(values) + 1)) if xs is None else list(xs)
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    first, last = xs[0], xs[-1]
    px = [pad_l + (w - pad_l - pad_r) * ((x - first) / max(last - first, 1)) for x in xs]
    py = [pad_t + (h - pad_t - pad_b) * (1 - (v - lo) / span) for v in values]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(px, py))
    marked = ""
    if mark in xs:
        x, y = px[xs.index(mark)], py[xs.index(mark)]
        marked = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="#dc2626" stroke-width="2"/>'
                  f'<text x="{x + 9:.1f}" y="{y + 14:.1f}" style="fill:#dc2626;font-weight:600">'
                  f'{mark}</text>')
    body = (f'<text x="{pad_l}" y="14" style="font-weight:600;fill:#1f2430">{escape(title)}</text>'
            f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - pad_r}" y2="{h - pad_b}" stroke="#d1d5db"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{h - pad_b}" stroke="#d1d5db"/>'
            f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{pad_l - 4}" y="{h - pad_b}" text-anchor="end">{lo:.3g}</text>'
            f'<text x="{w - pad_r}" y="{h - 6}" text-anchor="end">{escape(x_label)} {last}</text>'
            f'<text x="{pad_l}" y="{h - 6}">{first}</text>'
            f'<polyline points="{points}" fill="none" stroke="#3b4fd0" stroke-width="2" stroke-linejoin="round"/>'
            + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#3b4fd0"/>' for x, y in zip(px, py)) + marked)
    return svg(w, h, body, f"{title} per {x_label}")


def dendrogram(steps: list[dict], titles: list[str]) -> str:
    """The merge tree of the clusters (scan.algo.num_clusters.merge_tree): leaves along the bottom in
    the tree's order, each merge one level higher than the last, the first merges lowest."""
    k = len(titles)
    children = {s["into"]: s["merge"] for s in steps}

    def leaves(node: int) -> list[int]:
        return [node] if node < k else leaves(children[node][0]) + leaves(children[node][1])

    order = leaves(steps[-1]["into"]) if steps else list(range(k))
    step_w, top, bottom, left = 34, 10, 70, 10
    level_h = min(18.0, 360 / max(len(steps), 1))   # 50 clusters stay within a screen's height
    w, h = left * 2 + step_w * k + 60, round(top + bottom + level_h * max(len(steps), 1))
    x = {leaf: left + step_w * (i + 0.5) for i, leaf in enumerate(order)}
    y = {leaf: float(h - bottom) for leaf in range(k)}
    parts = []
    for level, s in enumerate(steps, 1):
        a, b = s["merge"]
        joined = round(h - bottom - level_h * level, 1)
        parts.append(f'<path d="M{x[a]:.1f},{y[a]:.1f} V{joined} H{x[b]:.1f} V{y[b]:.1f}" fill="none" '
                     f'stroke="#6b7280" stroke-width="1.5"><title>step {level}: {escape(", ".join(titles[i] for i in leaves(a)))}'
                     f' + {escape(", ".join(titles[i] for i in leaves(b)))}</title></path>')
        x[s["into"]], y[s["into"]] = (x[a] + x[b]) / 2, joined
    for leaf in order:
        parts.append(f'<circle cx="{x[leaf]:.1f}" cy="{h - bottom}" r="5" fill="{cluster_color(leaf)}"/>'
                     f'<text transform="translate({x[leaf] + 4:.1f},{h - bottom + 12}) rotate(60)">'
                     f'{escape(short(titles[leaf], 12))}</text>')
    return svg(w, h, "".join(parts), "merge tree of the clusters")


HISTOGRAM_BINS = 20


def histogram(values: np.ndarray, colour: str, label: str) -> str:
    """Counts of `values` in [0, 1] in HISTOGRAM_BINS equal bins, bars scaled to the fullest bin."""
    counts = np.histogram(np.clip(values, 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))[0]
    w, h, pad_b, pad_t = 240, 86, 16, 12
    bar = w / HISTOGRAM_BINS
    top = max(int(counts.max()), 1)
    bars = "".join(f'<rect x="{i * bar + 0.5:.1f}" y="{h - pad_b - (h - pad_b - pad_t) * n / top:.1f}" '
                   f'width="{bar - 1:.1f}" height="{(h - pad_b - pad_t) * n / top:.1f}" fill="{colour}">'
                   f'<title>{i / HISTOGRAM_BINS:.2f}–{(i + 1) / HISTOGRAM_BINS:.2f}: {n}</title></rect>'
                   for i, n in enumerate(counts) if n)
    axis = (f'<line x1="0" y1="{h - pad_b}" x2="{w}" y2="{h - pad_b}" stroke="#d1d5db"/>'
            f'<text x="0" y="{h - 3}">0</text><text x="{w / 2}" y="{h - 3}" text-anchor="middle">0.5</text>'
            f'<text x="{w}" y="{h - 3}" text-anchor="end">1</text>'
            f'<text x="{w}" y="{pad_t - 2}" text-anchor="end">{top} max</text>')
    return svg(w, h, bars + axis, label, "hist")
