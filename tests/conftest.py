import io
import os
import shutil
import sys
from contextlib import redirect_stdout

import pytest

# pytest-xdist runs the suite in several worker processes (pyproject's addopts): each takes its share of
# the cores, and idle OpenMP threads sleep instead of spinning on cores the other workers need. Set
# before any test module imports torch, and inherited by the `scan` subprocesses the tests start.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Tests spread over the workers one by one (`--dist loadgroup`), except those sharing a module-scoped
    fixture (a trained run, a torchrun launch): they stay on one worker, so the fixture is built once.
    One group per fixture, not per module, so a module's two expensive fixtures can build side by side."""
    groups = {}
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, defs in (fixtures.name2fixturedefs.items() if fixtures else ())
                        if defs[-1].scope == "module")
        if shared:
            groups[item] = f"{item.module.__name__}.{shared[0]}"
            item.add_marker(pytest.mark.xdist_group(groups[item]))
    # The longest first (tests marked slow, with the rest of their group): the workers then finish together
    # instead of one starting a minute-long test when the others have run out of work.
    slow = {groups.get(item, item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: groups.get(item, item) not in slow)


@pytest.fixture(autouse=True)
def _umap_only_where_asked(request, monkeypatch):
    """umap-learn unimportable, as without the `umap` extra, except in tests marked `umap`: its first embedding
    in a process compiles numba code for ~10 s, which every frozen-feature run of the suite would pay for a
    candidate (cluster.candidates) that the tests marked `umap` cover."""
    if request.node.get_closest_marker("umap") is None:
        monkeypatch.setitem(sys.modules, "umap", None)


class _AxesLayout:
    """t-SNE's interface for the report's map, laying the points out on their first two principal axes."""

    def __init__(self, n_components, **settings):
        self.n_components = n_components

    def fit_transform(self, x):
        from sklearn.decomposition import PCA
        return PCA(self.n_components, random_state=0).fit_transform(x)


@pytest.fixture(scope="session", autouse=True)
def _maps_without_tsne():
    """The report's map without t-SNE for the whole session (before any shared run writes a report): a map of
    1,437 images takes ~3 s of t-SNE, which every report of the suite would pay for a layout that the tests
    marked `tsne` (and the subprocesses the tests start) compute for real."""
    from scan.report import map as report_map
    real = report_map.TSNE
    report_map.TSNE = _AxesLayout
    yield real
    report_map.TSNE = real


@pytest.fixture(autouse=True)
def _tsne_where_asked(request, monkeypatch, _maps_without_tsne):
    if request.node.get_closest_marker("tsne") is not None:
        from scan.report import map as report_map
        monkeypatch.setattr(report_map, "TSNE", _maps_without_tsne)


# Tiny settings so a whole pipeline runs in seconds on 2 CPU cores.
TINY = ["model.width=8", "pretext.epochs=2", "pretext.batch_size=128", "cluster.epochs=2",
        "cluster.num_heads=3", "cluster.restarts=1", "selflabel.epochs=2", "selflabel.threshold=0.5",
        "mine.num_neighbors=5", "quiet=true"]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def mined_run(tmp_path_factory):
    """A run directory whose pretext and mine stages are done with the TINY settings (shared: copy it)."""
    from scan.pipeline import load_config, open_run
    from scan.pipeline.stages.mine import stage_mine
    from scan.pipeline.stages.pretext import stage_pretext
    path = tmp_path_factory.mktemp("shared") / "mined"
    run = open_run(load_config("digits", list(TINY)), path)
    stage_pretext(run)
    stage_mine(run)
    return path


def copy_run(mined_run, tmp_path, overrides):
    """An open Run in a copy of `mined_run`, with the TINY settings plus `overrides`."""
    from scan.pipeline import load_config, open_run
    target = tmp_path / "run"
    shutil.copytree(mined_run, target)
    return open_run(load_config("digits", list(TINY) + overrides), target)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory in which the whole pipeline ran with the TINY settings, pretext to evaluate, from
    scratch (independently of `mined_run`); shared: copy it (`copy_run`) before changing it."""
    from scan.pipeline import load_config, open_run, run_pipeline
    path = tmp_path_factory.mktemp("shared") / "trained"
    run_pipeline(open_run(load_config("digits", list(TINY)), path))
    return path


def run_cli(*args) -> int:
    """`scan ARGS` in this process, its stdout discarded; returns the exit code."""
    from scan.cli import main
    with redirect_stdout(io.StringIO()):
        return main([str(a) for a in args])


def one_error_line(capsys, *needles: str) -> str:
    """The command's stderr is exactly one `scan: error:` line (no traceback) holding every needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scan: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
