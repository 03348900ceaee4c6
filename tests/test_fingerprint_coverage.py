"""Every config section a stage reads is in its fingerprint (issue 26, item 3).

A stage declares the sections its fingerprint covers (`Stage.sections`, less what `ignores` drops under a
config); a setting it reads outside them would let a rerun reuse a result computed under another value
(the mine stage once read `augment` for its multi-view miner without covering it). Each stage runs here
under a configuration that records which top-level sections are read, and must stay within its own.
"""
import pytest

from scan.config import Config
from scan.pipeline.stage import get_stage

# read by every stage, deliberately outside fingerprints: where and how a run executes, not what it computes
# (data: the data's content hash is an input of the stages that read images)
RUNTIME = {"device", "quiet", "compile", "log", "sync_batchnorm", "data", "to_dict"}
# properties of Config that read sections
DERIVED = {"pretext_seed": {"seed", "pretext"}}


class RecordingConfig:
    """Stands in for a Config: every attribute comes from it, and the top-level names read are recorded."""

    def __init__(self, cfg: Config):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._cfg, name)

    def to_dict(self) -> dict:   # the fingerprint itself reads every section: not a read by the stage
        return self._cfg.to_dict()

    def sections_read(self) -> set[str]:
        out = set()
        for name in self.read - RUNTIME:
            out |= DERIVED.get(name, {name})
        return out


def covered(stage_name: str, cfg: Config) -> set[str]:
    """The sections in the stage's fingerprint: its own, less those it ignores under `cfg`, and through the
    fingerprints of the stages it needs (enabled ones), theirs."""
    stage = get_stage(stage_name)
    whole_sections_ignored = {d for d in stage.ignores(cfg) if "." not in d}
    sections = set(stage.sections) - whole_sections_ignored
    for need in stage.needs:
        if get_stage(need).enabled(cfg):
            sections |= covered(need, cfg)
    return sections


@pytest.mark.parametrize("stage_name, overrides", [
    ("pretext", ["pretext.epochs=1"]),
    ("mine", []),                                        # knn: augment is ignored, so it must not be read
    ("mine", ["mine.method=multiview", "mine.head_epochs=1"]),
    ("choose", ["data.num_clusters=auto", "choose.max_clusters=4"]),
    ("cluster", ["cluster.epochs=1"]),
    ("selflabel", ["selflabel.epochs=1"]),
])
def test_a_stage_reads_only_the_sections_its_fingerprint_covers(mined_run, tmp_path, monkeypatch, stage_name,
                                                                 overrides):
    from conftest import copy_run

    import scan.pipeline.stages.choose as choose
    from scan.pipeline.stages.cluster import stage_cluster
    real_record = choose.record_run_config

    def record_unrecorded(run):   # the configuration snapshots read every section by design
        recording, run.cfg = run.cfg, run.cfg._cfg
        try:
            real_record(run)
        finally:
            run.cfg = recording
    monkeypatch.setattr(choose, "record_run_config", record_unrecorded)
    run = copy_run(mined_run, tmp_path, overrides)
    if stage_name == "selflabel":
        stage_cluster(run)   # its input
    recording = RecordingConfig(run.cfg)
    run.cfg = recording
    run.records.clear()
    (run.path(stage_name, "done.json")).unlink(missing_ok=True)   # computed afresh, not reused
    get_stage(stage_name).run(run)
    outside = recording.sections_read() - covered(stage_name, recording._cfg)
    assert not outside, f"{stage_name} reads {sorted(outside)} outside its fingerprint"


def test_the_recording_sees_a_read_outside_the_fingerprint(mined_run, tmp_path, monkeypatch):
    """A planted read of `refine` in the cluster stage is caught."""
    from conftest import copy_run

    import scan.pipeline.stages.cluster as cluster
    run = copy_run(mined_run, tmp_path, ["cluster.epochs=1"])
    real = cluster._warn_collapse

    def reads_refine(run, pred, stage):
        run.cfg.refine.rounds
        return real(run, pred, stage)
    monkeypatch.setattr(cluster, "_warn_collapse", reads_refine)
    recording = RecordingConfig(run.cfg)
    run.cfg = recording
    cluster.stage_cluster(run)
    assert recording.sections_read() - covered("cluster", recording._cfg) == {"refine"}
