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
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from scan.cli import main
from scan.report import prototypes

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


# Appended to a copy of the report: once everything has loaded, record what the browser rendered.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.setAttribute("data-probe", JSON.stringify({
    sections: document.querySelectorAll("section.cluster").length,
    images: images.length,
    broken: images.filter(img => !(img.complete && img.naturalWidth > 0)).length,
    svgs: document.querySelectorAll("svg").length,
    width: document.documentElement.scrollWidth}));
});
</script>"""


def browser(*args: str, profile: Path) -> str:
    command = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def test_report_renders_in_a_headless_browser(trained, tmp_path):
    report = trained["run"] / "report.html"
    text = report.read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    # One browser start for both: the DOM after the load event, and a screenshot to look at.
    dom = browser("--virtual-time-budget=10000", "--window-size=1200,2000", f"--screenshot={shot}", "--dump-dom",
                  probe.as_uri(), profile=tmp_path / "profile")
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, "the probe script did not run"
    seen = json.loads(html.unescape(match.group(1)))
    assert seen["sections"] == 10
    assert seen["images"] >= 10 and seen["broken"] == 0
    assert seen["svgs"] >= 3            # sizes, confusion matrix, training curves
    assert seen["width"] <= 1200        # nothing overflows the window sideways
    assert shot.stat().st_size > 10_000


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
