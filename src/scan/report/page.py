"""One self-contained report page: style sheet, the page's images as a JSON table, and a small script.

Every image a page shows is stored once, as a row of that table: its WebP thumbnail (data URI),
file id, link to the original, cluster and the per-image columns (confidence, ...). The script fills
each `<img data-i=...>` from it, pages through member lists and drives the map's preview panel, so
the map, the prototypes and the member grid share one copy of each thumbnail.
"""
from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from scan.report.script import SCRIPT
from scan.report.style import CSS

THUMBNAIL_MAX = 64     # side in pixels: ~1 KB a WebP, so 1,000 images stay well under 2 MB
THUMBNAIL_QUALITY = 65
PIXELATED_BELOW = 24   # thumbnails of smaller images are upscaled without smoothing (crisp 8x8 digits)


def thumbnail(image) -> str:
    """A (C, H, W) uint8 tensor as a small WebP data URI (lossy: ~20x smaller than PNG for photos)."""
    array = image.numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    pil.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=0)   # fastest: 100,000 to encode
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_link(image_id: str) -> str | None:
    """A file:// URL for an absolute path (folder data), None for an index (tensor data sets)."""
    path = Path(image_id)
    return path.as_uri() if path.is_absolute() else None


class ImageTable:
    """What a page may say about each image: `columns` maps a name to one value per image.

    Columns are shown in every tooltip and caption in insertion order; the first is the caption.
    An out-of-distribution score per image would be one more column (see report.image_columns).
    """

    def __init__(self, ids: list[str], clusters: np.ndarray, columns: dict[str, np.ndarray], images):
        self.ids, self.clusters, self.columns, self.images = ids, clusters, columns, images
        self._thumbs: dict[int, str] = {}

    def row(self, i: int) -> dict:
        if i not in self._thumbs:   # the overview and a member page may both show an image
            self._thumbs[i] = thumbnail(self.images[i])
        row = {"id": self.ids[i], "cluster": int(self.clusters[i]), "thumb": self._thumbs[i],
               **{name: round(float(values[i]), 4) for name, values in self.columns.items()}}
        link = file_link(self.ids[i])
        if link:
            row["href"] = link
        return row

    def json(self, indices) -> str:
        """The rows of `indices` as JSON that is safe inside a <script> element."""
        data = {"columns": list(self.columns), "rows": {int(i): self.row(int(i)) for i in sorted(set(indices))}}
        return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace("&", "\\u0026")


def thumbs(indices, pixelated: bool) -> str:
    """Placeholders the script fills from the page's table (so each thumbnail is stored once)."""
    klass = ' class="pixel"' if pixelated else ""
    figures = "".join(f'<figure class="thumb"><img{klass} data-i="{int(i)}" alt="image {int(i)}"><figcaption>'
                      f'</figcaption></figure>' for i in indices)
    return f'<div class="thumbs">{figures}</div>'


def member_list(indices: np.ndarray, page_size: int, pixelated: bool) -> str:
    """All `indices` as a grid the script pages through, `page_size` at a time."""
    pixel = " pixel" if pixelated else ""
    return (f'<div class="members{pixel}" data-page-size="{page_size}" '
            f'data-members="{escape(json.dumps([int(i) for i in indices]))}">'
            f'<div class="pager"><button class="prev">‹ previous</button><span class="page"></span>'
            f'<button class="next">next ›</button></div><div class="thumbs"></div></div>')


def page(title: str, body: str, table: ImageTable, indices) -> str:
    """A whole HTML document showing `body`, with the rows of `indices` inlined for the script."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{CSS}</style></head>
<body>{body}
<script type="application/json" id="scan-images">{table.json(indices)}</script>
<script>{SCRIPT}</script></body></html>
"""
