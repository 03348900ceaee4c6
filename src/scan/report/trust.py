"""The report's first card: can these clusters be trusted? Our clusters against k-means on raw
pixels and on our features, by scores that need no labels, and every stage's self-check."""
from __future__ import annotations

from html import escape

NAMES = {"ours": "our clusters", "kmeans_pixels": "k-means on raw pixels", "kmeans_features": "k-means on our features"}
ACCURACY_KEYS = {"ours": None, "kmeans_pixels": "kmeans_pixels", "kmeans_features": "kmeans"}
STATUS_COLOURS = {"ok": "#1a7f37", "rescued": "#9a6700", "warning": "#bc4c00", "failed": "#cf222e"}


def trust_card(metrics: dict) -> str:
    scores, checks = metrics.get("unsupervised") or {}, metrics.get("checks") or {}
    if not scores and not checks:
        return ""
    final = metrics.get("final_stage")
    with_acc = any(isinstance(metrics.get(k), dict) for k in ("kmeans_pixels", final or ""))
    head = "<tr><th></th><th>neighbour agreement</th><th>size balance</th><th>confidence</th>" + \
           ("<th>ACC</th>" if with_acc else "") + "</tr>"
    rows = ""
    for name, s in scores.items():
        key = final if name == "ours" else ACCURACY_KEYS.get(name)
        acc = metrics.get(key, {}).get("acc") if key else None
        cells = [s.get("neighbor_agreement"), s.get("size_balance"), s.get("confidence")] + ([acc] if with_acc else [])
        rows += f"<tr><td>{escape(NAMES.get(name, name))}</td>" + "".join(
            f"<td>{v:.3f}</td>" if isinstance(v, float) else "<td>–</td>" for v in cells) + "</tr>"
    items = "".join(
        f'<li><b style="color:{STATUS_COLOURS.get(c.get("status"), "#000")}">{escape(stage)}: '
        f'{escape(str(c.get("status")))}</b> — {escape(str(c.get("message", "")))}'
        + (f' <i>Fix: {escape(str(c["fix"]))}</i>' if c.get("fix") and c.get("status") != "ok" else "") + "</li>"
        for stage, c in checks.items())
    return (f'<div class="card"><h2>Can these clusters be trusted?</h2>'
            f'<table class="metrics">{head}{rows}</table>'
            f'<p class="note">Neighbour agreement: share of mined neighbour pairs put in the same cluster (training '
            f'images, no labels needed). Size balance: entropy of the cluster sizes / log C (1 = equal sizes).</p>'
            f'<ul class="checks">{items}</ul></div>')
