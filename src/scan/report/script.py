"""The report's only script, inlined into every page: it fills thumbnails from the page's image table
(`<script id="scan-images">`), pages through member grids and shows the map's preview panel.

No network, no library: it runs from a file opened on disk. Text goes in with textContent, never
innerHTML, so a hostile file name stays text.
"""

SCRIPT = r"""
(() => {
const data = JSON.parse(document.getElementById("scan-images").textContent);
const fmt = v => typeof v === "number" ? v.toFixed(3) : String(v);
const tip = r => r.id + data.columns.map(c => ` · ${c} ${fmt(r[c])}`).join("");
function fill(img) {
  const r = data.rows[img.dataset.i];
  if (!r) return;
  img.src = r.thumb;
  img.title = tip(r);
  const cap = img.closest("figure") && img.closest("figure").querySelector("figcaption");
  if (cap && data.columns.length) cap.textContent = r[data.columns[0]].toFixed(2);
}
function figure(i, pixel) {
  const r = data.rows[i], fig = document.createElement("figure"), img = document.createElement("img");
  fig.className = "thumb";
  img.dataset.i = i;
  img.alt = "image " + i;
  if (pixel) img.className = "pixel";
  if (r && r.href) {   // the original file, for folder data
    const a = document.createElement("a");
    a.href = r.href;
    a.className = "file";
    a.appendChild(img);
    fig.appendChild(a);
  } else fig.appendChild(img);
  fig.appendChild(document.createElement("figcaption"));
  fill(img);
  return fig;
}
document.querySelectorAll("img[data-i]").forEach(fill);
document.querySelectorAll(".members").forEach(box => {
  const ids = JSON.parse(box.dataset.members), size = +box.dataset.pageSize;
  const pages = Math.max(1, Math.ceil(ids.length / size)), pixel = box.classList.contains("pixel");
  const grid = box.querySelector(".thumbs"), label = box.querySelector(".page");
  const prev = box.querySelector(".prev"), next = box.querySelector(".next");
  let page = 0;
  const show = () => {
    grid.replaceChildren(...ids.slice(page * size, (page + 1) * size).map(i => figure(i, pixel)));
    label.textContent = `page ${page + 1} of ${pages} · ${ids.length} images`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  };
  prev.addEventListener("click", () => { page = Math.max(0, page - 1); show(); });
  next.addEventListener("click", () => { page = Math.min(pages - 1, page + 1); show(); });
  show();
});
const map = document.querySelector("svg.map"), panel = document.querySelector(".map-panel");
if (map && panel) {
  let pinned = null;
  const preview = dot => {
    const r = data.rows[dot.dataset.i];
    let img = panel.querySelector("img");
    if (!img) {   // created on first use: an <img> without a source would count as broken
      img = document.createElement("img");
      panel.prepend(img);
    }
    img.src = r.thumb;
    img.className = panel.classList.contains("pixel") ? "pixel" : "";
    panel.querySelector(".cap").textContent = tip(r);
    const a = panel.querySelector("a");
    a.hidden = !r.href;
    if (r.href) a.href = r.href;
  };
  map.addEventListener("mouseover", e => { if (!pinned && e.target.dataset.i) preview(e.target); });
  map.addEventListener("click", e => {   // a click pins the preview; a click on empty space frees it
    if (pinned) pinned.classList.remove("pinned");
    pinned = e.target.dataset.i ? e.target : null;
    if (pinned) { pinned.classList.add("pinned"); preview(pinned); }
  });
}
})();
"""
