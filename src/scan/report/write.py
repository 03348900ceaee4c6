"""The HTML report of a run: `report.html`, plus `report_pages/` for runs too big for one file.

Every file is self-contained (inline WebP thumbnails, SVG charts, one small script) and opens from
disk with no network. report.html holds the summary, metrics, a t-SNE map of the images, the
charts and one card per cluster. Up to ONE_FILE_MAX images every member is in report.html, paged
MEMBERS_PER_SCREEN at a time; above that each cluster's members go to pages of MEMBERS_PER_FILE
images in report_pages/, so no file grows with the size of the run and each opens in seconds.

`report_data` gathers everything from a TrainedRun into a ReportData; `render_report` turns a ReportData
into {file name: HTML} and needs no run (benchmarks/report_size.py feeds it synthetic data).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from scan.algo.metrics import cluster_to_class, contingency
from scan.algo.num_clusters import CLOSE_SHARE
from scan.core.checkpoint import atomic_write_text
from scan.core.errors import RunError, typed
from scan.report.charts import bar_chart, cluster_color, dendrogram, heatmap, line_chart
from scan.report.cluster import ClusterContext, cluster_card, merge_hints
from scan.report.map import embed_2d_kept, map_card, map_sample
from scan.report.page import PIXELATED_BELOW, ImageTable, member_list, page
from scan.report.trust import trust_card
from scan.rundir.trained import TrainedRun
from scan.use.inference import TrainOutputs, cluster_title, load_names, open_trained_run, train_outputs, train_trust

REPORT_FILE = "report.html"
PAGES_DIR = "report_pages"
MAP_FILE = "report_map.npz"   # the map's layout, reused while the model's features are unchanged
ONE_FILE_MAX = 2000         # up to this many images, every member's thumbnail is in report.html
MEMBERS_PER_SCREEN = 60     # thumbnails shown at once in a member grid
MEMBERS_PER_FILE = 1000     # larger runs: members split into files of this many (~1.5 MB each)


@dataclass
class ReportData:
    """Everything the report shows, gathered from a run (report_data) or made up (benchmarks)."""
    source: str                      # the data set or folder the run clustered
    run_dir: str
    images: object                   # (N, C, H, W) uint8 tensor of the training images
    ids: list[str]                   # file paths for folder data, else image indices
    probs: np.ndarray                # (N, C) cluster probabilities of the training images
    features: np.ndarray             # (N, D) features of the training images
    seed: int
    summary: dict[str, str]          # label -> value, the summary card
    evaluated_on: str                # which images the metrics and the confusion matrix use
    names: dict[int, str] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    labels: np.ndarray | None = None         # (N,) classes of the training images (majority class per cluster)
    class_names: list[str] | None = None
    eval_pred: np.ndarray | None = None      # clusters and classes of the images the metrics use
    eval_labels: np.ndarray | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)   # stage -> loss per epoch
    entropy_weight: float | None = None      # the cluster stage's, to explain its negative loss
    # the cluster stage pulled towards equal sizes with nothing else to follow (uniform size prior, no
    # candidates): the report says how to let kinds of unequal sizes keep their sizes
    equal_sizes: bool = False
    map_file: Path | None = None             # where the map's layout is kept between renders (None: not kept)
    neighbors: np.ndarray | None = None      # (N, K) mined neighbours: merge hints count crossing pairs
    extra_columns: dict[str, np.ndarray] = field(default_factory=dict)   # more per-image values to show
    # (N,) how far to trust each assignment (scan.algo.ood: agreement of the nearest training images);
    # None: the softmax maximum, which self-labelling pushes to 1.00 for nearly every image
    trust: np.ndarray | None = None

    @property
    def typed_run_dir(self) -> str:
        """The run directory as the page's suggested commands spell it: quoted for the shell, escaped for HTML."""
        return escape(typed(self.run_dir))

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1) if self.trust is None else self.trust

    @property
    def num_clusters(self) -> int:
        return self.probs.shape[1]


def write_report(run_dir, device: str = "auto") -> Path:
    """Write `<run_dir>/report.html` for a finished run (reloads its training images) and return its path."""
    return write_run_report(open_trained_run(run_dir, device, with_data=True))


def write_run_report(run: TrainedRun) -> Path:
    """Write report.html (and report_pages/ when needed) for a trained run bound to its training data."""
    return write_files(run.run_dir, render_report(report_data(run, train_outputs(run))))


def write_files(run_dir: Path, files: dict[str, str]) -> Path:
    """Write the report's files into run_dir; member pages of an earlier, larger report are removed."""
    run_dir = Path(run_dir)
    for name, text in files.items():
        (run_dir / name).parent.mkdir(exist_ok=True)
        atomic_write_text(run_dir / name, text)
    pages = run_dir / PAGES_DIR
    if pages.is_dir():
        for old in pages.glob("cluster-*.html"):   # only names this module writes
            if f"{PAGES_DIR}/{old.name}" not in files:
                old.unlink()
        if not any(pages.iterdir()):
            pages.rmdir()
    return run_dir / REPORT_FILE


# ------------------------------------------------------------------------ gathering

def _loss_histories(run: TrainedRun) -> dict[str, list[float]]:
    """{stage: loss per epoch} for every stage whose done.json holds a per-epoch history."""
    curves = {}
    for stage, record in run.records.items():
        losses = [h["loss"] for h in record.get("history") or [] if isinstance(h.get("loss"), (int, float))]
        if losses:
            curves[stage] = losses
    return curves


def _eval_predictions(run: TrainedRun, outputs: TrainOutputs) -> np.ndarray | None:
    """Clusters of the images the metrics were computed on (probs.npy of the evaluate stage)."""
    if run.eval is run.train:
        return outputs.probs.argmax(1)
    path = run.path("probs.npy")
    probs = np.load(path) if path.exists() else None
    return probs.argmax(1) if probs is not None and len(probs) == len(run.eval) else None


def _neighbors(path: Path) -> np.ndarray | None:
    """mine/neighbors.npy for the merge hints' crossing pairs; None when the run has none."""
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:   # objects, a truncated or foreign file
        raise RunError(f"{path} is damaged ({str(e).splitlines()[0]}); rerun `scan mine --run-dir "
                       f"{path.parent.parent}` to recompute it") from None


def report_data(run: TrainedRun, outputs: TrainOutputs) -> ReportData:
    d = run.cfg.data
    in_sample = run.eval is run.train   # folders and .npz files have no split: metrics on the training images
    evaluated_on = (f"all {len(run.train):,} images (in-sample: there is no held-out split)" if in_sample else
                    f"the {len(run.eval):,} '{d.eval_split}' images (held out from training)")
    neighbors_file = run.path("mine", "neighbors.npy")
    trust = train_trust(run)   # leave-one-out, so a training image is judged like a new one
    unknown = trust.unknown
    return ReportData(
        source=str(d.path or d.dataset), run_dir=str(run.run_dir), images=run.train.images, ids=outputs.ids,
        probs=outputs.probs, features=outputs.features, seed=run.cfg.seed, names=load_names(run),
        summary={"images": f"{len(run.train):,}", "clusters": str(run.num_clusters),
                 "image size": "×".join(str(s) for s in run.info["image_shape"][1:]),
                 "final model": run.final_stage, "backbone": run.cfg.model.backbone,
                 f"unknown-like (ood_score > {trust.threshold:.3f})": f"{int(unknown.sum()):,}"},
        evaluated_on=evaluated_on, metrics=run.metrics,
        labels=run.train.labels, class_names=run.train.class_names or
        ([str(k) for k in range(run.info["num_classes"])] if run.info["num_classes"] else None),
        eval_pred=_eval_predictions(run, outputs), eval_labels=run.eval.labels,
        curves=_loss_histories(run), entropy_weight=run.cfg.cluster.entropy_weight,
        equal_sizes=run.cfg.cluster.size_prior == "uniform" and not run.cfg.cluster.candidates,
        neighbors=_neighbors(neighbors_file), trust=trust.confidence, map_file=Path(run.run_dir) / MAP_FILE,
        extra_columns={"probability": outputs.probs.max(1), "ood_score": trust.ood_score,
                       "unknown": unknown.astype(np.float32)})


def image_columns(data: ReportData) -> dict[str, np.ndarray]:
    """The values shown with every thumbnail, first one as its caption. An out-of-distribution
    score per image (scan.algo.ood) is one more entry: ReportData.extra_columns."""
    return {"confidence": data.confidence, **data.extra_columns}


# ------------------------------------------------------------------------ sections

def _stat(label: str, value) -> str:
    return f'<div class="stat"><div class="v">{escape(str(value))}</div><div class="k">{escape(label)}</div></div>'


def _summary(data: ReportData) -> str:
    return (f'<div class="card"><h2>Summary</h2><p class="source">Data: <code>{escape(data.source)}</code> · '
            f'run <code>{escape(data.run_dir)}</code></p>'
            f'<div class="stats">{"".join(_stat(k, v) for k, v in data.summary.items())}</div></div>')


def _metrics_table(data: ReportData) -> str:
    """Accuracy and friends of every evaluated stage (only when the run had labels)."""
    metrics = data.metrics
    stages = [s for s, m in metrics.items() if isinstance(m, dict) and "acc" in m]
    if not stages:
        return ""
    columns = [c for c in ("acc", "nmi", "ari", "top5") if any(c in metrics[s] for s in stages)]
    head = "".join(f"<th>{c.upper() if c != 'top5' else 'Top-5'}</th>" for c in columns)
    label = {"kmeans": "k-means (pretext features)", "kmeans_pixels": "k-means (raw pixels)"}
    rows = "".join(f"<tr><td>{label.get(s, escape(s))}</td>"
                   + "".join(f"<td>{metrics[s][c]:.3f}</td>" if c in metrics[s] else "<td>–</td>" for c in columns)
                   + "</tr>" for s in stages)
    note = f"on {escape(data.evaluated_on)}"
    if "neighbor_purity" in metrics:
        note += f" · neighbour purity {metrics['neighbor_purity']:.3f}"
    return (f'<div class="card"><h2>Metrics</h2><table class="metrics"><tr><th>stage</th>{head}</tr>{rows}</table>'
            f'<p class="note">{note}</p></div>')


def _confusion(data: ReportData, titles: list[str]) -> str:
    """True classes × clusters on the images the metrics use, each row normalised; clusters ordered
    by the class they match."""
    if data.eval_pred is None or data.eval_labels is None:
        return ""
    k, num_classes = data.num_clusters, len(data.class_names)
    counts = contingency(data.eval_pred, data.eval_labels, k, num_classes).T        # (classes, clusters)
    mapping = cluster_to_class(data.eval_pred, data.eval_labels, k, num_classes)
    order = np.lexsort((-counts.sum(0), mapping))
    matrix = counts[:, order] / np.maximum(counts.sum(1, keepdims=True), 1)
    chart = heatmap(matrix, data.class_names, [titles[c] for c in order])
    return (f'<div class="card"><h2>Confusion matrix</h2>{chart}'
            f'<p class="note">rows: true classes of {escape(data.evaluated_on)}, as in the metrics; '
            f'columns: clusters; each row sums to 100%</p></div>')


def _curves(data: ReportData) -> str:
    if not data.curves:
        return ""
    charts = "".join(line_chart(losses, f"{stage} loss") for stage, losses in data.curves.items())
    note = ""
    if "cluster" in data.curves and data.entropy_weight is not None:
        note = (f'<p class="note">The cluster loss goes below zero by design: SCAN loss = consistency − '
                f'{data.entropy_weight:g} × entropy of the mean prediction (cluster.entropy_weight), and that '
                f'entropy rewards using all clusters. Lower is better.</p>')
        if data.equal_sizes:
            # the README's opt-in for long tails, in the report where a user sees the sizes
            note += (f'<p class="note">That entropy also pulls the clusters towards equal sizes. If your kinds '
                     f'differ a lot in size, <code>scan recluster {data.typed_run_dir} --num-clusters '
                     f'{data.probs.shape[1]} --set "cluster.candidates=[graph]"</code> lets the nearest-neighbour '
                     f'graph&#x27;s own partition, whose sizes are its own, compete with the heads (on a 10:1 long '
                     f'tail of digits: accuracy 0.63 → 0.84; on balanced Fashion-MNIST it cost 0.03 on average '
                     f'over three seeds, 0.06 with one).</p>')
    return f'<div class="card"><h2>Training curves</h2><div class="curves">{charts}</div>{note}</div>'


def _structure(data: ReportData, titles: list[str]) -> str:
    """Why this number of clusters (the criterion per candidate, with data.num_clusters=auto) and how the
    clusters nest (the merge tree on the mined neighbours); empty when the run recorded neither."""
    choice, tree = data.metrics.get("num_clusters_choice"), data.metrics.get("merge_tree")
    parts, notes = [], []
    if choice:
        curve = {int(c): v for c, v in choice["curve"].items()}
        xs = sorted(curve)
        parts.append(line_chart([curve[c] for c in xs], "neighbour modularity", xs, "clusters",
                                choice["num_clusters"]))
        notes.append(f'{choice["num_clusters"]} clusters were chosen without labels: of the numbers tried '
                     f'({xs[0]}–{xs[-1]}), that partition of the nearest-neighbour graph keeps the most neighbour '
                     f'pairs together beyond what its cluster sizes alone would (neighbour modularity). The '
                     f'partitions are nested: the graph cut into {xs[-1]} pieces, then the most linked pieces joined '
                     f'two at a time, so a small kind keeps a cluster of its own. '
                     + (f'Close behind (within {CLOSE_SHARE:.0%} of its score): '
                        f'{", ".join(str(int(c)) for c in choice["close"])}. '
                        if choice.get("close") else '')
                     + f'Another number: <code>scan recluster {data.typed_run_dir} --num-clusters C</code> '
                     f'(seconds: it reuses the features and neighbours).')
    if tree and data.num_clusters >= 3:
        parts.append(dendrogram(tree, titles))
        notes.append('The merge tree joins first the clusters that the most neighbour pairs link for their sizes: '
                     'clusters that join low are likely parts of one kind (more clusters than kinds), those that join '
                     'last are the most distinct.')
    if not parts:
        return ""
    return (f'<div class="card"><h2>How many clusters, and how they nest</h2><div class="curves">{"".join(parts)}'
            f'</div>' + "".join(f'<p class="note">{n}</p>' for n in notes) + "</div>")


def _member_file(c: int, part: int) -> str:
    return f"{PAGES_DIR}/cluster-{c}-{part + 1}.html"


def _member_pages(data: ReportData, table: ImageTable, titles: list[str], members: dict[int, np.ndarray],
                  pixelated: bool) -> dict[str, str]:
    """Files of MEMBERS_PER_FILE members each for every cluster, linked to each other and to report.html."""
    files = {}
    for c, ordered in members.items():
        chunks = [ordered[s:s + MEMBERS_PER_FILE] for s in range(0, len(ordered), MEMBERS_PER_FILE)]
        for part, chunk in enumerate(chunks):
            links = " · ".join(f'<a href="{Path(_member_file(c, p)).name}">{p + 1}</a>' if p != part else
                               f"<b>{p + 1}</b>" for p in range(len(chunks)))
            body = (f'<header class="top"><div class="wrap"><h1>{escape(titles[c])}</h1><p class="sub">'
                    f'members {part * MEMBERS_PER_FILE + 1:,}–{part * MEMBERS_PER_FILE + len(chunk):,} of '
                    f'{len(ordered):,}, most confident first · <a href="../{REPORT_FILE}#cluster-{c}">back to the '
                    f'report</a></p></div></header><main class="wrap"><section class="cluster card" '
                    f'style="--c:{cluster_color(c)}"><p class="note">file {links}</p>'
                    f'{member_list(chunk, MEMBERS_PER_SCREEN, pixelated)}</section></main>')
            files[_member_file(c, part)] = page(f"{titles[c]} · {part + 1}", body, table, chunk)
    return files


def render_report(data: ReportData) -> dict[str, str]:
    """{file name relative to the run directory: HTML}: report.html, and member pages for big runs."""
    k = data.num_clusters
    pred = data.probs.argmax(1)
    confidence = data.confidence
    titles = [cluster_title(c, data.names) for c in range(k)]
    sizes = np.bincount(pred, minlength=k)
    pixelated = data.images.shape[-1] < PIXELATED_BELOW
    table = ImageTable(data.ids, pred, image_columns(data), data.images)
    one_file = len(pred) <= ONE_FILE_MAX
    members = {c: (m := np.flatnonzero(pred == c))[np.argsort(-confidence[m], kind="stable")] for c in range(k)}
    on_map = map_sample(len(pred), data.seed)
    xy = embed_2d_kept(data.features[on_map], data.seed, data.map_file)
    ctx = ClusterContext(pred, confidence, data.features, titles, data.labels, data.class_names or [], pixelated)
    hints = merge_hints(data.features, pred, k, data.neighbors)
    cards, shown = [], [on_map]
    for c in range(k):
        if one_file:
            listing = member_list(members[c], MEMBERS_PER_SCREEN, pixelated)
        else:
            parts = range(-(-len(members[c]) // MEMBERS_PER_FILE))
            listing = (f'<p class="note">{len(members[c]):,} members, in files of {MEMBERS_PER_FILE:,} (the report '
                       f'is split so that every page opens quickly): ' + " · ".join(
                           f'<a class="pages" href="{_member_file(c, p)}">{p + 1}</a>' for p in parts) + "</p>")
        card, views = cluster_card(c, ctx, hints[c], listing)
        cards.append(card)
        shown += [views] + ([members[c]] if one_file else [])
    chips = "".join(f'<a class="chip" href="#cluster-{c}" style="--c:{cluster_color(c)}"><span class="dot"></span>'
                    f'{escape(t)} <span class="n">{sizes[c]}</span></a>' for c, t in enumerate(titles))
    hint = "" if data.names else (f'<p class="note">Name clusters with <code>scan name {data.typed_run_dir} '
                                  f'0="a name" 1=…</code>, then rerun <code>scan report</code>.</p>')
    name = Path(data.source).name or data.source
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = (f'<header class="top"><div class="wrap"><h1>{k} clusters in <em>{escape(name)}</em></h1>'
            f'<p class="sub">SCAN unsupervised image classification · {len(pred):,} images · generated {stamp}</p>'
            f'</div></header><main class="wrap">{trust_card(data.metrics)}{_summary(data)}{_metrics_table(data)}'
            f'<div class="card"><h2>Clusters</h2><nav class="chips">{chips}</nav>{hint}</div>'
            f'{map_card(on_map, xy, pred, titles, len(pred), pixelated)}'
            f'<div class="grid2"><div class="card"><h2>Cluster sizes</h2>{bar_chart(sizes, titles)}</div>'
            f'{_confusion(data, titles)}</div>{_structure(data, titles)}{_curves(data)}{"".join(cards)}</main>'
            f'<footer>Prototypes are the members closest to the mean feature of the cluster\'s most confident '
            f'members. Most similar clusters: cosine similarity of the clusters\' mean features, and how many mined '
            f'neighbour pairs join them — candidates to merge. Hover an image for its file and confidence; click it '
            f'to open the original file.</footer>')
    files = {REPORT_FILE: page(f"SCAN clusters · {name}", body, table, np.concatenate(shown))}
    if not one_file:
        files.update(_member_pages(data, table, titles, members, pixelated))
    return files
