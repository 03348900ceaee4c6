"""The pipeline: the stage contract and the stages (pretext, mine, cluster, selflabel, refine,
evaluate), a run opened for work, the automatic defaults and the resolution of a configuration.

    cfg = load_config("digits", ["cluster.epochs=5"])
    metrics = run_pipeline(open_run(cfg, "runs/digits"))
"""
import importlib

# name -> module that defines it. Imported on first use, not here: `scan --help` resolves options with
# scan.pipeline.resolve without importing torch, and the stages' training code is imported only by training
_EXPORTS = {"STAGES": "chain", "run_pipeline": "chain", "summary_line": "chain", "check_choices": "choices",
            "load_config": "choices", "Run": "run", "open_run": "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scan.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scan.pipeline.{_EXPORTS[name]}"), name)
