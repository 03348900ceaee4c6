"""The folder-of-photos workflow as a new user meets it: run, report (checked in a real browser),
name, predict and export."""
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from scan.cli import main
from scan.report import render_report, write_files
from scan.report.cluster import merge_hints, prototypes

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from report_size import synthetic_data  # noqa: E402  (the benchmark's made-up runs, also tested here)

NUM_IMAGES = 300
ARTIFACTS = Path(__file__).parent / "artifacts"   # the browser screenshot is kept here to look at


def _digit_image(pixels: np.ndarray, index: int) -> Image.Image:
    """An 8x8 digit (0..16) as a 32x32 photo-like image in a mode that varies with `index`."""
    grey = Image.fromarray(np.uint8(pixels * 255 / 16)).resize((32, 32), Image.Resampling.BILINEAR)
    if index % 7 == 0:
        return grey                                                   # mode L
    tint = np.array([1.0, 0.85 + 0.15 * (index % 3) / 2, 0.7])        # warm ink, varying a little
    rgb = Image.fromarray(np.uint8(np.asarray(grey)[..., None] * tint))
    if index % 5 == 0:
        rgb.putalpha(255)                                             # mode RGBA
    return rgb


def write_photo_folder(root: Path) -> list[Path]:
    """A nested folder of digits as mixed PNG/JPEG files, plus a text file and a truncated JPEG."""
    digits = load_digits()
    written = []
    for i in range(NUM_IMAGES):
        image = _digit_image(digits.images[i], i)
        folder = root / str(digits.target[i]) / ("scans" if i % 4 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        as_png = image.mode == "RGBA" or i % 2 == 0
        path = folder / f"img{i:03d}.{'png' if as_png else 'jpg'}"
        image.save(path, quality=95)
        written.append(path)
    (root / "notes.txt").write_text("not an image\n")
    buffer = io.BytesIO()
    _digit_image(digits.images[0], 1).save(buffer, format="JPEG")
    (root / "3" / "broken.jpg").write_bytes(buffer.getvalue()[:200])
    return written


def scan(*args: str) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stdout)."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `scan run` over the photo folder, shared by the tests of this module."""
    from conftest import TINY
    base = tmp_path_factory.mktemp("folder")
    files = write_photo_folder(base / "photos")
    args = ["run", "--data", base / "photos", "--num-clusters", 10, "--labels-from-folders",
            "--out", base / "run", "--set", "data.image_size=16"]
    for override in TINY:
        args += ["--set", override]
    code, stdout = scan(*args)
    return {"code": code, "stdout": stdout, "run": base / "run", "files": files, "base": base}


def test_one_command_clusters_a_messy_folder_and_writes_assignments_and_report(trained):
    assert trained["code"] == 0
    run = trained["run"]
    assert f"report: {run / 'report.html'}" in trained["stdout"]
    rows = read_csv(run / "assignments.csv")
    assert len(rows) == NUM_IMAGES   # the text file and the truncated JPEG are skipped
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in trained["files"])
    assert set(rows[0]) == {"path", "cluster", "cluster_name", "confidence", "probability", "unknown", "ood_score",
                            "top3"}
    for row in rows:
        top3 = [item.split(":") for item in row["top3"].split()]
        assert len(top3) == 3 and top3[0][0] == row["cluster"]
        assert 0 < float(row["probability"]) <= 1 and 0 <= float(row["confidence"]) <= 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert "acc" in metrics["cluster"]   # --labels-from-folders: evaluated against the folder names


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; install.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


# Appended to a copy of a report page: once everything has loaded, hover and click the map, page
# through the first member grid that has two pages, and record what the browser rendered.
PROBE = """<script>
window.addEventListener("load", async () => {
  const seen = {};
  try { await look(seen); } catch (e) { seen.error = String(e); }
  document.body.setAttribute("data-probe", JSON.stringify(seen));
});
async function look(seen) {
  Object.assign(seen, {sections: document.querySelectorAll("section.cluster").length,
                svgs: document.querySelectorAll("svg").length, title: document.title});
  const dots = document.querySelectorAll("svg.map circle[data-i]"), panel = document.querySelector(".map-panel");
  seen.dots = Array.from(dots).map(d => +d.dataset.i);
  if (dots.length >= 3) {
    dots[0].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
    const img = panel.querySelector("img");
    seen.hover = {dot: +dots[0].dataset.i, src: img.src, caption: panel.querySelector(".cap").textContent};
    dots[1].dispatchEvent(new MouseEvent("click", {bubbles: true}));
    dots[2].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));   // pinned: must not change
    seen.pinned = {dot: +dots[1].dataset.i, caption: panel.querySelector(".cap").textContent,
                   link: panel.querySelector("a").getAttribute("href")};
  }
  const box = Array.from(document.querySelectorAll(".members")).find(
    b => JSON.parse(b.dataset.members).length > +b.dataset.pageSize);
  if (box) {
    const shown = () => Array.from(box.querySelectorAll("img")).map(i => +i.dataset.i);
    const before = shown();
    box.querySelector(".next").click();
    seen.paging = {members: JSON.parse(box.dataset.members), size: +box.dataset.pageSize, before,
                   after: shown(), label: box.querySelector(".page").textContent};
  }
  seen.links = Array.from(document.querySelectorAll("figure a.file")).map(a => a.getAttribute("href"));
  const images = Array.from(document.images);
  await new Promise(done => setTimeout(done, 1000));   // images added by paging load after the load event
  if (seen.hover) seen.hover.width = panel.querySelector("img").naturalWidth;
  seen.images = images.length;
  seen.broken = images.filter(img => !(img.complete && img.naturalWidth > 0)).length;
  seen.sources = Array.from(new Set(images.map(i => i.src.slice(0, 23))));
  seen.width = document.documentElement.scrollWidth;
}
</script>"""


def browser(*args: str, profile: Path) -> str:
    command = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def page_rows(text: str) -> dict:
    """The image table a report page inlines for its script: {image index: row}."""
    table = re.search(r'<script type="application/json" id="scan-images">(.*?)</script>', text, re.S).group(1)
    return {int(i): row for i, row in json.loads(table)["rows"].items()}


def probe(page: Path, tmp_path: Path, screenshot: Path | None = None) -> dict:
    """Open a copy of `page` (next to it, so relative links hold) in headless Chromium, return what PROBE saw."""
    copy = page.with_name("probe-" + page.name)
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shot = [f"--screenshot={screenshot}"] if screenshot else []
    dom = browser("--virtual-time-budget=10000", "--window-size=1200,2000", *shot, "--dump-dom",
                  copy.as_uri(), profile=tmp_path / "profile")
    copy.unlink()
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, "the probe script did not run"
    seen = json.loads(html.unescape(match.group(1)))
    assert "error" not in seen, seen["error"]
    return seen


def check_map_and_members(seen: dict, rows: dict, num_on_map: int) -> None:
    assert len(seen["dots"]) == len(set(seen["dots"])) == num_on_map   # one dot per (sampled) image
    assert set(seen["dots"]) <= set(rows)                              # each with its thumbnail in the page
    hover = seen["hover"]
    assert hover["src"] == rows[hover["dot"]]["thumb"] and hover["width"] > 0
    assert hover["caption"].startswith(rows[hover["dot"]]["id"] + " · confidence")
    pinned = seen["pinned"]
    assert pinned["caption"].startswith(rows[pinned["dot"]]["id"] + " · confidence")
    assert seen["broken"] == 0 and seen["images"] > 0
    assert all(src.startswith("data:image/webp;base64") for src in seen["sources"])


def test_report_renders_in_a_headless_browser(trained, tmp_path):
    report = trained["run"] / "report.html"
    text = report.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    seen = probe(report, tmp_path, shot)
    rows = page_rows(text)
    assert seen["sections"] == 10
    check_map_and_members(seen, rows, NUM_IMAGES)       # 300 images: all on the map
    assert len(rows) == NUM_IMAGES                      # and every member's thumbnail, once
    non_empty = len({row["cluster"] for row in rows.values()})
    assert seen["svgs"] >= 4 + non_empty                # map, sizes, confusion, curves; a histogram per cluster
    assert seen["pinned"]["link"] == Path(rows[seen["pinned"]["dot"]]["id"]).as_uri()
    files = {str(f) for f in trained["files"]}
    assert seen["links"] and all(link.startswith("file:///") for link in seen["links"])
    assert {Path(link[len("file://"):]).as_posix() for link in seen["links"]} <= files
    assert seen["width"] <= 1200        # nothing overflows the window sideways
    assert shot.stat().st_size > 10_000


def test_folder_runs_say_in_sample_and_the_confusion_matrix_uses_the_metrics_images(trained):
    text = (trained["run"] / "report.html").read_text()
    assert "on all 300 images (in-sample" in text             # metrics
    assert "rows: true classes of all 300 images (in-sample" in text
    assert "'val'" not in text and "&#x27;val&#x27;" not in text
    assert "SCAN loss = consistency − 5 × entropy" in text     # why the cluster loss is negative


def test_report_confidence_is_the_trust_measure_and_shows_the_ood_score(trained):
    """The report ranks and histograms by the neighbour-agreement confidence of trust.pt (the softmax
    maximum sits at 1.00 for nearly every image after self-labelling) and shows ood_score/unknown."""
    import json
    import re

    from scan.use.inference import open_trained_run, train_trust
    text = (trained["run"] / "report.html").read_text()
    table = json.loads(re.search(r'<script type="application/json" id="scan-images">(.*?)</script>', text, re.S).group(1))
    assert table["columns"] == ["confidence", "probability", "ood_score", "unknown"]
    trust = train_trust(open_trained_run(trained["run"], "cpu"))
    rows = table["rows"]
    for i, row in list(rows.items())[:20]:
        assert row["confidence"] == round(float(trust.confidence[int(i)]), 4)
        assert row["ood_score"] == round(float(trust.ood_score[int(i)]), 4)
    assert len({row["confidence"] for row in rows.values()}) > 10     # it ranks images
    assert (f'<div class="v">{int(trust.unknown.sum()):,}</div><div class="k">unknown-like '
            f'(ood_score &gt; {trust.threshold:.3f})</div>') in text


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    """The benchmark's synthetic 1,000-image run, with a hostile file name and cluster name."""
    data = synthetic_data(1000, k=10)
    data.ids[7] = "/photos/<img src=x onerror=alert(1)>&\"'.jpg"
    data.names = {0: "<script>alert(2)</script>"}
    out = tmp_path_factory.mktemp("big")
    write_files(out, render_report(data))
    return data, out


def test_a_1000_image_report_is_one_file_under_2_mb_and_works_in_a_browser(big_report, tmp_path):
    data, out = big_report
    assert [p.name for p in out.rglob("*.html")] == ["report.html"]
    report = out / "report.html"
    assert report.stat().st_size < 2_000_000                    # measured: ~1.2 MB
    text = report.read_text()
    assert "data:image/png" not in text and "data:image/jpeg" not in text
    rows = page_rows(text)
    assert len(rows) == 1000 and all(r["thumb"].startswith("data:image/webp;base64,") for r in rows.values())
    seen = probe(report, tmp_path)
    check_map_and_members(seen, rows, 1000)
    paging = seen["paging"]                                     # ~100 members a cluster, 60 a screen
    assert paging["before"] == paging["members"][:paging["size"]]
    assert paging["after"] == paging["members"][paging["size"]:2 * paging["size"]]
    assert paging["label"].startswith("page 2 of 2")
    pred = data.probs.argmax(1)
    cluster = pred[paging["members"][0]]
    assert sorted(paging["members"]) == np.flatnonzero(pred == cluster).tolist()      # all of its members
    assert data.probs.max(1)[paging["members"]].tolist() == sorted(data.probs.max(1)[paging["members"]], reverse=True)


def test_hostile_file_and_cluster_names_stay_text(big_report, tmp_path):
    data, out = big_report
    text = (out / "report.html").read_text()
    assert "<img src=x" not in text and "<script>alert" not in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert page_rows(text)[7]["id"] == data.ids[7]               # the name itself survives, as data
    assert page_rows(text)[7]["href"] == "file:///photos/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26%22%27.jpg"
    assert probe(out / "report.html", tmp_path)["title"] == "SCAN clusters · photos"


def test_big_runs_are_split_into_member_pages(tmp_path, monkeypatch):
    import scan.report.map
    import scan.report.write
    # the same layout as 100,000 images, at a size a test can afford
    monkeypatch.setattr(scan.report.write, "ONE_FILE_MAX", 100)
    monkeypatch.setattr(scan.report.write, "MEMBERS_PER_FILE", 40)
    monkeypatch.setattr(scan.report.map, "MAP_MAX_POINTS", 50)
    data = synthetic_data(200, k=2)
    (tmp_path / "report_pages").mkdir()
    (tmp_path / "report_pages" / "cluster-1-9.html").write_text("left by an earlier, larger report")
    (tmp_path / "report_pages" / "notes.txt").write_text("not ours")
    write_files(tmp_path, render_report(data))
    sizes = np.bincount(data.probs.argmax(1), minlength=2)
    expected = {f"cluster-{c}-{p + 1}.html" for c in range(2) for p in range(-(-sizes[c] // 40))}
    assert {p.name for p in (tmp_path / "report_pages").iterdir()} == expected | {"notes.txt"}
    text = (tmp_path / "report.html").read_text()
    assert "50 of the 200 images, drawn at random" in text
    assert len(re.findall(r'<circle [^>]*data-i="', text)) == 50                  # one dot per sampled image
    assert len(page_rows(text)) < 200                          # the overview holds the map sample and the cards only
    seen = probe(tmp_path / "report_pages" / "cluster-0-2.html", tmp_path)
    members = seen["paging"]["members"] if "paging" in seen else None
    assert seen["broken"] == 0 and seen["images"] > 0 and seen["links"]
    first = page_rows((tmp_path / "report_pages" / "cluster-0-1.html").read_text())
    second = page_rows((tmp_path / "report_pages" / "cluster-0-2.html").read_text())
    assert len(first) == 40 and not set(first) & set(second) and members is None   # 40 a file, fits one screen
    assert set(first) | set(second) <= set(np.flatnonzero(data.probs.argmax(1) == 0).tolist())
    assert 'href="report_pages/cluster-0-2.html"' in text and 'href="../report.html#cluster-0"' in \
        (tmp_path / "report_pages" / "cluster-0-2.html").read_text()


def test_the_confusion_matrix_uses_the_images_the_metrics_use():
    data = synthetic_data(60, k=3)
    data.labels = np.zeros(60, dtype=int)                      # training labels: all class 0
    data.eval_labels = np.array([0, 1, 2] * 4)                 # a held-out split of 12, perfectly clustered
    data.eval_pred = np.array([2, 0, 1] * 4)
    data.class_names = ["a", "b", "c"]
    data.evaluated_on = "the 12 'test' images (held out from training)"
    text = render_report(data)["report.html"]
    confusion = text[text.index("Confusion matrix"):text.index("each row sums")]
    assert confusion.count(">100</text>") == 3                 # a diagonal: the eval split, not the training one
    assert "rows: true classes of the 12 &#x27;test&#x27; images (held out" in confusion


def test_merge_hints_rank_clusters_by_mean_feature_similarity_and_count_crossing_neighbours():
    # clusters 0, 1, 2 point at 0°, 10° and 90°: 0 and 1 are the pair to merge
    angles = np.radians([0, 0, 10, 10, 90, 90])
    features = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1], [5], [2], [1], [3], [1]])
    pred = np.array([0, 0, 1, 1, 2, 2])
    neighbors = np.array([[1], [2], [3], [0], [5], [0]])          # pairs 1-2 and 3-0 cross 0|1, 5-0 crosses 2|0
    hints = merge_hints(features, pred, 4, neighbors, top=2)     # cluster 3 is empty: never a hint
    assert [(h.other, round(h.similarity, 4), h.crossing) for h in hints[0]] == \
        [(1, round(np.cos(np.radians(10)), 4), 2), (2, 0.0, 1)]
    assert [h.other for h in hints[2]] == [1, 0] and hints[3] == []
    assert merge_hints(features, pred, 4, None)[0][0].crossing is None


def test_runs_that_pull_towards_equal_sizes_say_how_to_keep_unequal_ones(trained):
    data = synthetic_data(40, k=4)
    data.run_dir = "/runs/my <photos>"
    plain = render_report(data)["report.html"]
    assert "towards equal sizes" not in plain                  # the made-up run: no such setting recorded
    data.equal_sizes = True
    text = render_report(data)["report.html"]
    # the run directory as it must be typed: quoted for the shell, then escaped for the page
    assert ('scan recluster &#x27;/runs/my &lt;photos&gt;&#x27; --num-clusters 4 --set "cluster.candidates=[graph]"'
            in text)
    assert "scan name &#x27;/runs/my &lt;photos&gt;&#x27; 0=" in text
    # a run from scratch with the defaults (uniform sizes, no candidates) says it in its report
    assert "cluster.candidates=[graph]" in (trained["run"] / "report.html").read_text()


def test_extra_per_image_columns_show_with_every_thumbnail():
    data = synthetic_data(30, k=2)
    data.extra_columns = {"ood": np.linspace(0, 1, 30)}          # e.g. an out-of-distribution score
    text = render_report(data)["report.html"]
    rows = page_rows(text)
    assert rows[29]["ood"] == 1.0 and rows[0]["ood"] == 0.0
    assert '"columns":["confidence","ood"]' in text


def test_names_show_in_report_assignments_and_predictions(trained, tmp_path, capsys):
    run = trained["run"]
    assert scan("name", run, "0=zeros", "3=red cars")[0] == 0
    assert json.loads((run / "names.json").read_text())["names"] == {"0": "zeros", "3": "red cars"}
    code, _ = scan("report", run)                       # a rerun of report keeps the names
    assert code == 0 and "red cars" in (run / "report.html").read_text()
    named = {r["cluster"]: r["cluster_name"] for r in read_csv(run / "assignments.csv")}
    assert named.get("3", "red cars") == "red cars" and named.get("0", "zeros") == "zeros"
    assert all(name == "" for cluster, name in named.items() if cluster not in ("0", "3"))
    code, stdout = scan("predict", run, trained["base"] / "photos")
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert code == 0 and len(rows) == NUM_IMAGES
    assert all(r["cluster_name"] == {"0": "zeros", "3": "red cars"}.get(r["cluster"], "") for r in rows)
    assert scan("name", run, "3=")[0] == 0              # an empty name removes it
    assert json.loads((run / "names.json").read_text())["names"] == {"0": "zeros"}


@pytest.mark.parametrize("args, message", [
    (["name", "{run}", "cats"], "'cats' must look like CLUSTER=NAME"),
    (["name", "{run}", "10=cats"], "has clusters 0..9, not 10"),
    (["name", "{tmp}", "0=cats"], "not a scan run directory"),
    (["report", "{tmp}/missing"], "not a scan run directory"),
    (["predict", "{run}", "{tmp}/missing.png"], "missing.png does not exist"),
    (["predict", "{run}", "{photos}/notes.txt"], "notes.txt: not a readable image"),
    (["export", "{tmp}"], "not a scan run directory"),
])
def test_user_errors_are_one_line(trained, tmp_path, capsys, args, message):
    paths = {"run": trained["run"], "tmp": tmp_path, "photos": trained["base"] / "photos"}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_suggested_commands_quote_a_run_directory_with_spaces(trained, tmp_path, capsys):
    # a folder "My Photos" gives a run directory with a space: the command a message suggests must still run
    where = tmp_path / "My Photos-seed0"
    where.mkdir()
    assert main(["name", str(where), "0=cats"]) == 2
    assert f"train one with `scan run --out '{where}'`" in capsys.readouterr().err
    copy = tmp_path / "my run"
    shutil.copytree(trained["run"], copy)
    (copy / "names.json").unlink(missing_ok=True)
    assert main(["name", str(copy)]) == 0
    assert f"no cluster is named yet: scan name '{copy}' 0=NAME" in capsys.readouterr().err
    assert main(["name", str(copy), "3=cats"]) == 0
    assert f"saved; `scan report '{copy}'` shows" in capsys.readouterr().err


def test_predict_classifies_unseen_images_like_the_training_ones(trained, tmp_path):
    run = trained["run"]
    digits = load_digits()
    unseen = tmp_path / "new.webp"
    _digit_image(digits.images[NUM_IMAGES + 1], 1).save(unseen)
    seen = trained["files"][5]
    out = tmp_path / "pred.csv"
    assert scan("predict", run, unseen, seen, "--out", out)[0] == 0
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(unseen), str(seen)]
    assert 0 <= int(rows[0]["cluster"]) < 10
    training = {r["path"]: r for r in read_csv(run / "assignments.csv")}
    assert rows[1]["cluster"] == training[str(seen)]["cluster"]
    assert abs(float(rows[1]["probability"]) - float(training[str(seen)]["probability"])) < 1e-3


def test_prototypes_are_the_members_closest_to_the_mean_of_the_ten_most_confident():
    # Members 0..9 are confident, at ±10°..±50° around 0°: their mean feature points at 0°.
    # Member 10 (0°, unsure) is closest to that mean; member 11 (90°) is far from it.
    angles = np.radians([10, -10, 20, -20, 30, -30, 40, -40, 50, -50, 0, 90])
    features = np.stack([np.cos(angles), np.sin(angles)], 1) * 3.0   # scale must not matter (cosine)
    confidence = np.array([0.9] * 10 + [0.1, 0.2])
    members = np.arange(12)
    assert prototypes(members, confidence, features, 3).tolist() == [10, 0, 1]
    # fewer than ten members: all of them make the mean (50°, -50°, 0°, 90° -> 23.6°)
    assert prototypes(members[8:], confidence, features, 2).tolist() == [10, 8]


@pytest.mark.tsne
def test_map_of_repeated_images_puts_each_repeat_on_one_point():
    """30 identical images crashed t-SNE (a segmentation fault, the whole process); repeats now share a point."""
    from sklearn.manifold import TSNE

    from scan.report import map as report_map
    from scan.report.map import embed_2d
    assert report_map.TSNE is TSNE   # the real one here (conftest lays maps out on two axes elsewhere)
    assert np.array_equal(embed_2d(np.zeros((30, 16)), 0), np.zeros((30, 2)))
    x = np.random.default_rng(0).normal(size=(40, 16))
    x[20:] = x[0]
    xy = embed_2d(x, 0)
    assert np.allclose(xy[20:], xy[0]) and not np.allclose(xy[1], xy[0])
    assert np.array_equal(embed_2d(x[:20], 0), xy[:20])   # the distinct images land where they would alone


def test_the_map_layout_is_kept_while_the_features_are_unchanged(tmp_path, monkeypatch):
    """`scan name` and `scan report` on an unchanged model reuse the t-SNE layout (most of a report's time);
    other features, another seed, or a damaged or foreign file give a fresh layout, never an error."""
    from scan.report import map as report_map
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    keep = tmp_path / "report_map.npz"
    calls = []
    real = report_map.embed_2d
    monkeypatch.setattr(report_map, "embed_2d", lambda f, s: calls.append(len(f)) or real(f, s))
    first = report_map.embed_2d_kept(x, 0, keep)
    assert calls == [40] and keep.is_file()
    assert np.array_equal(report_map.embed_2d_kept(x.copy(), 0, keep), first) and calls == [40]   # kept
    report_map.embed_2d_kept(x[:30], 0, keep)                        # other features: computed and replaced
    report_map.embed_2d_kept(x[:30], 1, keep)                        # another seed
    assert calls == [40, 30, 30]
    for junk in (b"", b"PK\x03\x04 not a zip", b"\x93NUMPY junk"):
        keep.write_bytes(junk)
        assert np.array_equal(report_map.embed_2d_kept(x, 0, keep), first)
    assert calls == [40, 30, 30, 40, 40, 40]
    assert np.array_equal(report_map.embed_2d_kept(x, 0, None), first) and len(calls) == 7   # None: not kept


def test_naming_clusters_reuses_the_runs_map(trained, monkeypatch):
    """The report of a finished run keeps its map; naming a cluster re-renders without a new t-SNE."""
    from scan.report import map as report_map
    run = trained["run"]
    assert (run / "report_map.npz").is_file()                   # `scan run` wrote the report and its map
    monkeypatch.setattr(report_map, "embed_2d", lambda *a: pytest.fail("the map was computed again"))
    assert scan("name", run, "1=ones")[0] == 0 and scan("report", run)[0] == 0
    assert "ones" in (run / "report.html").read_text()
    assert scan("name", run, "1=")[0] == 0


def test_no_report_skips_only_the_report_which_scan_report_writes_later(trained, tmp_path):
    from conftest import TINY
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    for made in ("report.html", "report_map.npz", "assignments.csv"):
        (run / made).unlink()
    args = ["run", "--data", trained["base"] / "photos", "--num-clusters", 10, "--labels-from-folders",
            "--out", run, "--set", "data.image_size=16", "--no-report"]
    code, stdout = scan(*args, *[a for o in TINY for a in ("--set", o)])
    assert code == 0 and len(stdout.splitlines()) == 1 and "report:" not in stdout   # the summary line alone
    assert (run / "assignments.csv").is_file() and not (run / "report.html").exists()
    assert scan("report", run)[0] == 0 and (run / "report.html").is_file()
