"""One cluster's card in the report: size and majority class, a confidence histogram, prototypes,
least confident members, the most similar other clusters (merge hints) and all its members."""
from __future__ import annotations

from dataclasses import dataclass
from html import escape

import numpy as np

from scan.algo.num_clusters import cluster_links
from scan.report.charts import cluster_color, histogram
from scan.report.page import thumbs

TOP_CONFIDENT = 10     # prototypes: closest to the mean feature of this many most confident members (paper)
NUM_PROTOTYPES = 6
NUM_LEAST = 6
NUM_MERGE_HINTS = 3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototypes(members: np.ndarray, confidence: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """The k members closest (cosine) to the mean feature of the cluster's most confident members.

    members: indices of the cluster's images; confidence (N,), features (N, D) of all images.
    """
    if not len(members):
        return members
    feats = _unit(features[members])
    top = np.argsort(-confidence[members], kind="stable")[:TOP_CONFIDENT]
    center = feats[top].mean(0)
    return members[np.argsort(-(feats @ center), kind="stable")[:k]]


@dataclass
class MergeHint:
    other: int                  # the other cluster
    similarity: float           # cosine similarity of the two clusters' mean (unit) features
    crossing: int | None        # mined neighbour pairs with one end in each cluster (None: not mined)


def merge_hints(features: np.ndarray, pred: np.ndarray, k: int, neighbors: np.ndarray | None,
                top: int = NUM_MERGE_HINTS) -> list[list[MergeHint]]:
    """For each cluster, the `top` non-empty other clusters whose mean feature is most similar.

    features (N, D), pred (N,) cluster ids, neighbors (N, K) mined neighbour indices or None.
    """
    x = _unit(features.astype(np.float64))
    sizes = np.bincount(pred, minlength=k)
    means = _unit(np.stack([x[pred == c].sum(0) for c in range(k)]))   # (k, D); zero rows stay zero
    similarity = means @ means.T
    crossing = None
    if neighbors is not None and len(neighbors) == len(pred):
        links = cluster_links(pred, neighbors, k)   # both directions added
        crossing = links + links.T
    hints = []
    for c in range(k):
        others = [o for o in np.argsort(-similarity[c], kind="stable") if o != c and sizes[o] and sizes[c]]
        hints.append([MergeHint(int(o), float(similarity[c, o]), None if crossing is None else int(crossing[c, o]))
                      for o in others[:top]])
    return hints


@dataclass
class ClusterContext:
    """What every cluster card reads: per-image arrays of the training images and the page layout."""
    pred: np.ndarray
    confidence: np.ndarray
    features: np.ndarray
    titles: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    pixelated: bool


def _merge_list(hints: list[MergeHint], titles: list[str]) -> str:
    if not hints:
        return '<p class="note">No other non-empty cluster.</p>'
    items = "".join(f'<li><a href="#cluster-{h.other}" style="--c:{cluster_color(h.other)}">'
                    f'{escape(titles[h.other])}</a> similarity {h.similarity:.2f}'
                    + ("" if h.crossing is None else f" · {h.crossing:,} neighbour pairs cross") + "</li>"
                    for h in hints)
    return f'<ul class="merge">{items}</ul>'


def cluster_card(c: int, ctx: ClusterContext, hints: list[MergeHint], members_html: str) -> tuple[str, np.ndarray]:
    """The card of cluster c and the images it shows; `members_html` lists all its members (a paged
    grid or links to pages)."""
    members = np.flatnonzero(ctx.pred == c)
    meta = f"{len(members):,} images · {100 * len(members) / len(ctx.pred):.1f}%"
    if len(members):
        meta += f" · mean confidence {ctx.confidence[members].mean():.2f}"
    if ctx.labels is not None and len(members):
        counts = np.bincount(ctx.labels[members], minlength=len(ctx.class_names))
        majority = escape(ctx.class_names[counts.argmax()])
        meta += f" · mostly “{majority}” ({100 * counts.max() / len(members):.0f}%)"
    open_tag = f'<section class="cluster card" id="cluster-{c}" style="--c:{cluster_color(c)}">'
    head = (f'<header><span class="badge">{c}</span><h2>{escape(ctx.titles[c])}</h2>'
            f'<span class="meta">{meta}</span></header>')
    if not len(members):
        body = '<p class="note">No image is assigned to this cluster.</p>'
        return f"{open_tag}{head}{body}</section>", members
    by_confidence = members[np.argsort(ctx.confidence[members], kind="stable")]
    views = {"Prototypes": prototypes(members, ctx.confidence, ctx.features, NUM_PROTOTYPES),
             "Least confident": by_confidence[:NUM_LEAST]}
    body = "".join(f'<div class="row"><h3>{label}</h3>{thumbs(idx, ctx.pixelated)}</div>'
                   for label, idx in views.items())
    body += (f'<div class="row"><h3>Confidence</h3>'
             f'{histogram(ctx.confidence[members], cluster_color(c), f"confidence of cluster {c}")}</div>'
             f'<div class="row"><h3>Most similar clusters</h3>{_merge_list(hints, ctx.titles)}</div>'
             f'<div class="row wide"><h3>All members, most confident first</h3>{members_html}</div>')
    return f'{open_tag}{head}<div class="views">{body}</div></section>', np.concatenate(list(views.values()))
