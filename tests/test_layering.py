"""The floor plan is checked, not remembered: packages along the pipeline, each importing only
those below it (benchmarks/layout.py holds the layering and counts it)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("layout", ROOT / "benchmarks" / "layout.py")
layout = importlib.util.module_from_spec(spec)
sys.modules["layout"] = layout
spec.loader.exec_module(layout)
SRC = ROOT / "src" / "scan"


def test_every_top_level_entry_has_a_layer():
    names = {layout.entry(m) for m in layout.module_names(SRC)} - set(layout.TOP)
    assert names == set(layout.LAYERS)


def test_no_import_runs_back_up_the_layering():
    assert layout.layout(SRC)["back_up"] == []


def test_no_import_circle_spans_packages():
    assert layout.layout(SRC)["package_circles"] == []


def test_the_check_sees_an_import_that_runs_back_up(tmp_path):
    # a planted violation: core importing the pipeline is found, with its line
    pkg = tmp_path / "scan"
    for name in ("core", "pipeline"):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "run.py").write_text("from scan.core import errors\n")
    (pkg / "core" / "errors.py").write_text("import os\n\n\ndef f():\n    from scan.pipeline.run import x\n")
    found = layout.layout(pkg)
    assert found["back_up"] == ["scan.core.errors:5 imports scan.pipeline.run"]
    assert found["function_level"] == ["scan.core.errors:5 imports scan.pipeline.run"]
    assert found["package_circles"] == [["core", "pipeline"]]
