"""The report's map: every image (or a random sample of MAP_MAX_POINTS) placed in 2-D by t-SNE on
its features, one dot per image coloured by cluster; hovering a dot previews its thumbnail and a
click pins the preview (the behaviour is in scan.report.script).
"""
from __future__ import annotations

import io
import zipfile
from html import escape
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from scan.core.checkpoint import atomic_write_bytes
from scan.core.hashing import bytes_hash, stable_hash
from scan.report.charts import cluster_color, short, svg

MAP_MAX_POINTS = 2000   # t-SNE time grows ~N log N: 2,000 points take ~10 s on one core
PCA_DIMS = 50           # t-SNE on 50 principal components: faster and less noisy than on all D
TSNE_STEPS = 500        # half of scikit-learn's default: the clusters have settled by then, at half the time
MAP_W, MAP_H, MAP_PAD = 640, 460, 8


def map_sample(num_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the images on the map: all of them, or MAP_MAX_POINTS drawn at random."""
    max_points = MAP_MAX_POINTS
    if num_images <= max_points:
        return np.arange(num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, size=max_points, replace=False))


def embed_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) features -> (N, 2) t-SNE coordinates scaled to [0, 1], cosine geometry (rows normalised)."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    # repeated images (identical features) share one point: t-SNE's tree crashes the process on many duplicates
    _, first, inverse = np.unique(np.round(x, 6), axis=0, return_index=True, return_inverse=True)
    if len(first) < len(x):
        order = np.argsort(first)   # the unique rows in order of first appearance, as without repeats
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return embed_2d(features[first[order]], seed)[rank[inverse.ravel()]]
    n = len(x)
    if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
    if n < 5:   # too few points for t-SNE's neighbourhoods: the first two principal axes
        xy = PCA(min(2, n, x.shape[1]), random_state=seed).fit_transform(x) if n > 1 else np.zeros((n, 2))
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    else:
        tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", max_iter=TSNE_STEPS, random_state=seed)
        xy = tsne.fit_transform(x)
    xy = xy - xy.min(0)
    return xy / np.maximum(xy.max(0), 1e-12)


def embed_2d_kept(features: np.ndarray, seed: int, keep: Path | None) -> np.ndarray:
    """embed_2d, kept in the .npz `keep` under a key of the features' bytes, the seed and the map's settings.

    t-SNE is most of a report's time, and `scan name` / `scan report` on an unchanged model see the very same
    features: they reuse the layout (the dots also stay where the user saw them). A key that differs (a
    retrained model), a damaged or foreign file, or keep=None computes it afresh; a stale file is replaced.
    """
    key = stable_hash(bytes_hash(features.astype(np.float32, copy=False)), seed, PCA_DIMS, TSNE_STEPS)
    if keep is not None and Path(keep).is_file():
        try:
            with np.load(keep, allow_pickle=False) as kept:
                xy = kept["xy"]
                if str(kept["key"]) == key and xy.shape == (len(features), 2) and np.isfinite(xy).all():
                    return xy.astype(np.float64)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass   # not ours to trust: recomputed and replaced below
    xy = embed_2d(features, seed)
    if keep is not None:
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), xy=xy)
        atomic_write_bytes(Path(keep), buffer.getvalue())
    return xy


def map_card(indices: np.ndarray, xy: np.ndarray, pred: np.ndarray, titles: list[str], total: int,
             pixelated: bool) -> str:
    """The map card: an SVG dot per image in `indices` at `xy` (in [0, 1]), a legend and the preview panel."""
    sx, sy = MAP_W - 2 * MAP_PAD, MAP_H - 2 * MAP_PAD
    dots = "".join(f'<circle cx="{MAP_PAD + sx * x:.1f}" cy="{MAP_PAD + sy * (1 - y):.1f}" r="3.2" '
                   f'fill="{cluster_color(int(pred[i]))}" data-i="{int(i)}"/>' for i, (x, y) in zip(indices, xy))
    legend = "".join(f'<span class="key" style="--c:{cluster_color(c)}"><span class="dot"></span>'
                     f'{escape(short(t, 24))}</span>' for c, t in enumerate(titles))
    shown = (f"all {total:,} images" if len(indices) == total else
             f"{len(indices):,} of the {total:,} images, drawn at random (the map shows at most "
             f"{MAP_MAX_POINTS:,} so that the page opens quickly)")
    pixel = " pixel" if pixelated else ""
    return (f'<div class="card"><h2>Map of the images</h2><div class="map-wrap">'
            f'{svg(MAP_W, MAP_H, dots, "map of the images, coloured by cluster", "map")}'
            f'<div class="map-panel{pixel}"><div class="cap">Hover a dot to see its image; click to keep it.</div>'
            f'<a class="file" hidden>open the original file</a></div></div>'
            f'<div class="legend">{legend}</div>'
            f'<p class="note">t-SNE of the features (first {PCA_DIMS} principal components) of {shown}: images '
            f'close on the map look alike to the model; colour is the cluster.</p></div>')
