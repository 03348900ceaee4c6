"""The stage contract: what a stage declares, and the ordered registry of stages.

A stage module (`scan/pipeline/stages/<name>.py`) declares itself once with `register_stage(Stage(...))`:
its name, the stages it needs, the config sections it reads, the non-config inputs it
depends on, whether it is enabled and whether it writes `<name>/model.pt`. Its fingerprint
(stored in `<name>/done.json`; a rerun skips the stage while it is unchanged) is derived from
that declaration and from the fingerprints of the enabled stages it needs, so adding a stage
touches its own file only. Stages run in registration order (`scan/pipeline/stages/__init__.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from scan.config import flatten
from scan.core.hashing import stable_hash
from scan.core.registry import Registry


def _always(cfg) -> bool:
    return True


def _no_inputs(run) -> tuple:
    return ()


def _reads_all(cfg) -> tuple:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable                          # run(Run) -> dict: the stage's record (done.json or metrics)
    needs: tuple[str, ...] = ()            # stages whose artifacts it reads
    sections: tuple[str, ...] = ()         # config sections (or top-level fields) it reads
    inputs: Callable = _no_inputs          # inputs(Run) -> tuple: what else it depends on (data hash, C)
    enabled: Callable = _always            # enabled(Config) -> bool; disabled stages are skipped in a chain
    # ignores(Config) -> dotted fields of its sections it does not read under this config ("seed",
    # "augment.strong_strength"): changing them must not recompute the stage
    ignores: Callable = _reads_all
    writes_model: bool = False             # writes <name>/model.pt, a clustering model
    description: str = ""


STAGES: Registry[Stage] = Registry("stage")


def register_stage(stage: Stage) -> Stage:
    return STAGES.add(stage.name, stage)


def _registry() -> Registry[Stage]:
    import scan.pipeline.stages  # noqa: F401  (registers the built-in stages, in pipeline order)
    return STAGES


def stage_names() -> tuple[str, ...]:
    return tuple(_registry().in_order())


def get_stage(name: str) -> Stage:
    return _registry().get(name)


def model_stages() -> tuple[str, ...]:
    return tuple(name for name in stage_names() if get_stage(name).writes_model)


def stage_enabled(cfg, name: str) -> bool:
    return get_stage(name).enabled(cfg)


def stage_settings(cfg, name: str) -> dict:
    """{section: value} of the config sections the stage reads, less the fields it ignores under `cfg`."""
    stage, c = get_stage(name), cfg.to_dict()
    settings = {s: c[s] for s in stage.sections}
    for dotted in stage.ignores(cfg):
        section, _, key = dotted.partition(".")
        if key:
            settings[section] = {k: v for k, v in settings[section].items() if k != key}
        else:
            settings.pop(section, None)
    return settings


def fingerprint(run, name: str) -> str:
    """Hash of the settings the stage reads, its inputs and the fingerprints of the enabled stages it needs."""
    stage = get_stage(name)
    upstream = [fingerprint(run, need) for need in stage.needs if stage_enabled(run.cfg, need)]
    return stable_hash(name, stage_settings(run.cfg, name), stage.inputs(run), upstream)


def stage_basis(run, stage: str) -> dict:
    """What a stage's fingerprint hashes, readable: its settings (flat keys), a hash of its other
    inputs and the fingerprints of the stages it needs. Kept in done.json so that a rerun can say
    what changed, not only that something did."""
    spec = get_stage(stage)
    return {"settings": dict(flatten(json.loads(json.dumps(stage_settings(run.cfg, stage))))),
            "inputs": stable_hash(spec.inputs(run)),
            "upstream": {need: run.fingerprint(need) for need in spec.needs if stage_enabled(run.cfg, need)}}


def what_changed(old: dict | None, new: dict) -> str:
    """'cluster.epochs 3 -> 2, the output of mine' from two stage_basis records (old: from done.json)."""
    unknown = "its configuration or inputs"
    if not old:   # written before done.json kept its basis
        return unknown
    before, after = old.get("settings", {}), new["settings"]
    parts = [f"{k} {before.get(k, '(unset)')} -> {after.get(k, '(unset)')}"
             for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if old.get("inputs") != new["inputs"]:
        parts.append("its inputs (the data or the number of clusters)")
    upstream = set(old.get("upstream", {}).items()) ^ set(new["upstream"].items())
    parts += [f"the output of {name}" for name in sorted({name for name, _ in upstream})]
    return ", ".join(parts) or unknown
