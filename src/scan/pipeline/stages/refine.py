"""Optional stage, refine: SPC (hierarchical pseudo-labels, label propagation, mixup) from the
latest model; writes refine/model.pt."""
from __future__ import annotations

import time

from scan.core.checkpoint import atomic_torch_save, seed_everything
from scan.core.errors import StageError
from scan.pipeline.run import Run, load_stage_model, trained_stages
from scan.pipeline.stage import Stage, register_stage
from scan.train.refine import train_spc


def stage_refine(run: Run) -> dict:
    """SPC refinement (hierarchical pseudo-labels + mixup) of the latest model; writes refine/model.pt.

    Starts from the self-labelled model when self-labelling ran, else from the cluster model.
    """
    cfg, rt = run.cfg, run.rt
    if cfg.refine.method == "none":
        raise StageError("refine.method is 'none': pass --refine spc (to scan evaluate as well) to refine with SPC")
    if (record := run.done("refine")) is not None:
        return record
    source = ([s for s in trained_stages(run) if s != "refine"] or ["cluster"])[-1]
    seed_everything(cfg.seed + 3)
    model = rt.prepare(load_stage_model(run, source))
    inputs = run.source.refine_inputs(model)
    start = time.time()
    history, rounds = train_spc(model, inputs, len(run.train), cfg.refine, rt, run.path("refine"),
                                run.fingerprint("refine"), run.train.labels, run.info["num_classes"])
    atomic_torch_save(run.path("refine", "model.pt"), model.state_dict())
    return run.finish("refine", seconds=time.time() - start, source=source, rounds=rounds, history=history)


register_stage(Stage("refine", stage_refine, needs=("cluster", "selflabel"), sections=("seed", "refine", "augment"),
                     enabled=lambda cfg: cfg.refine.method != "none", writes_model=True,
                     # our form is what runs before the setting existed computed: their fingerprints stay valid
                     ignores=lambda cfg: ("refine.form",) if cfg.refine.form == "ours" else (),
                     description="SPC refinement (--refine spc)"))
