"""The accelerator path (bf16 autocast, channels-last, fused optimizers, torch.compile), run on the CPU.

CUDA is never needed: `Runtime(autocast_dtype=..., force_channels_last=True)` imposes the CUDA
choices on the CPU, fused optimizers are forced with `fused=True`, and torch.compile runs with a
counting backend that hands back the traced graph (inductor needs ~1 min per model on 2 cores).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn

import scan.pipeline.run
import scan.pipeline.stages.cluster
import scan.pipeline.stages.pretext
import scan.pipeline.stages.selflabel
from scan.cli import main
from scan.core.checkpoint import load_torch
from scan.nets.models import Backbone, ClusteringModel, resnet_small
from scan.pipeline import load_config, open_run, run_pipeline
from scan.train.engine import Runtime, StageError, build_optimizer, compile_backbones, optimizer_step
from scan.use.inference import open_trained_run

TRAINING_STAGES = (scan.pipeline.stages.pretext, scan.pipeline.stages.cluster, scan.pipeline.stages.selflabel)


def tiny_model(width: int = 8) -> ClusteringModel:
    return ClusteringModel(Backbone(resnet_small(1, width=width), 1), num_clusters=4, num_heads=2)


@pytest.fixture
def conv_calls():
    """(autocast on, autocast dtype, input channels-last, weight channels-last, output dtype) of every
    training forward (gradients on) of a convolution wider than one channel (for one channel both
    layouts are the same)."""
    calls = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.in_channels > 1 and torch.is_grad_enabled():
            calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                          inputs[0].is_contiguous(memory_format=torch.channels_last),
                          module.weight.is_contiguous(memory_format=torch.channels_last), output.dtype))
    handle = nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


@pytest.fixture
def fused_optimizers(monkeypatch):
    """Every training stage builds its optimizer with fused=True (what CUDA parameters get by
    default); returns the optimizers built."""
    built = []

    def forced(*args, **kwargs):
        built.append(build_optimizer(*args, **{**kwargs, "fused": True}))
        return built[-1]
    for module in TRAINING_STAGES:
        monkeypatch.setattr(module, "build_optimizer", forced)
    return built


@pytest.fixture
def one_thread():
    """bf16 autocast on the CPU runs many small oneDNN kernels: with two threads on 2 cores shared with
    other work a TINY run took 16-30 s (measured, load ~3), with one 3-4.5 s (and as long on idle cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cuda_path_trains_every_stage_on_the_cpu(tmp_path, tiny_overrides, monkeypatch, conv_calls,
                                                      fused_optimizers, one_thread):
    monkeypatch.setattr(scan.pipeline.run, "Runtime",
                        functools.partial(Runtime, autocast_dtype=torch.bfloat16, force_channels_last=True))
    cfg = load_config("digits", tiny_overrides + ["selflabel.optimizer=sgd", "model.width=16"])
    run = open_run(cfg, tmp_path / "run")
    assert run.rt.precision is torch.bfloat16 and run.rt.force_channels_last
    metrics = run_pipeline(run)
    # bf16 training still learns: measured (seed 0, one thread) cluster 0.347, selflabel 0.375 on the held-out
    # images; seeds 1, 2 (plain optimizers): cluster 0.381, 0.339, selflabel 0.389, 0.339. Chance is 0.1.
    assert metrics["cluster"]["acc"] >= 0.26 and metrics["selflabel"]["acc"] >= 0.26, metrics
    # selflabel refines cluster: measured +0.028 (seeds 1, 2: +0.008, 0.000)
    assert metrics["selflabel"]["acc"] >= metrics["cluster"]["acc"] - 0.02, metrics
    # every training forward ran under bf16 autocast on channels-last inputs and weights
    assert len(conv_calls) > 10
    assert set(conv_calls) == {(True, torch.bfloat16, True, True, torch.bfloat16)}
    # pretext and cluster (Adam) fused, self-labelling (SGD) multi-tensor
    kinds = [(type(o).__name__, o.defaults.get("fused"), o.defaults.get("foreach")) for o in fused_optimizers]
    assert kinds == [("Adam", True, None), ("Adam", True, None), ("SGD", None, True)]
    assert all(o.state for o in fused_optimizers)   # they stepped


def test_the_cpu_default_stays_full_precision_with_the_per_parameter_optimizer(conv_calls):
    rt = Runtime(torch.device("cpu"))
    assert rt.precision is None
    model = rt.prepare(tiny_model(width=16))
    assert rt.channels_last   # every convolution >= 16 channels wide: safe on the CPU
    with rt.autocast():
        model(rt.batch(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)))
    assert set(conv_calls) == {(False, torch.bfloat16, True, True, torch.float32)}   # bf16 = the CPU's unused default
    opt = build_optimizer(model.parameters(), "adam", 1e-3, 0.0)
    assert opt.defaults["fused"] is None and opt.defaults["foreach"] is None

    narrow = tiny_model(width=8)   # its backward corrupts the heap on 48-px images in channels-last
    Runtime(torch.device("cpu")).prepare(narrow)
    assert not narrow.backbone.trunk.layers[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="narrower than 16 channels"):
        Runtime(torch.device("cpu"), force_channels_last=True).prepare(narrow)


def test_a_narrow_backbone_on_larger_images_trains_without_corrupting_memory():
    """resnet_small at width 8 on 48-px images: in channels-last, torch 2.13's CPU backward corrupts the heap
    (the process dies: segfault, 'double free'); `prepare` must keep such a model in the plain layout.
    In a subprocess, so that a crash fails this test instead of killing the suite."""
    import subprocess
    import sys
    code = ("import torch; from scan.nets.models import resnet_small; from scan.train.engine import Runtime\n"
            "rt = Runtime(torch.device('cpu')); m = rt.prepare(resnet_small(3, width=8))\n"
            "for _ in range(10): m(rt.batch(torch.randint(0, 256, (28, 3, 48, 48), dtype=torch.uint8))).square().sum().backward()\n"
            "print(rt.channels_last)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "False", (done.returncode, done.stderr[-500:])


@pytest.mark.parametrize("name, flag", [("adam", "fused"), ("adamw", "fused"), ("sgd", "foreach")])
def test_fused_optimizers_take_the_same_step_as_the_plain_ones(name, flag):
    torch.manual_seed(0)
    plain, fast = tiny_model(), tiny_model()
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(8, 1, 8, 8)
    for model, fused in ((plain, None), (fast, True)):
        opt = build_optimizer(model.parameters(), name, 0.01, 1e-4, fused=fused)
        assert opt.defaults[flag] is fused
        for _ in range(3):
            optimizer_step(opt, model(x).logsumexp(-1).mean(), "test", 0)
    for p, q in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_device_without_fused_adam_kernels_gets_the_multi_tensor_adam(monkeypatch):
    real_adam = torch.optim.Adam

    def adam_without_fused_kernels(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real_adam(params, **kwargs)
    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused_kernels)
    opt = build_optimizer(tiny_model().parameters(), "adam", 1e-3, 0.0, fused=True)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_a_non_finite_loss_stops_before_the_weights_change():
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    opt = build_optimizer(model.parameters(), "adam", 0.1, 0.0, fused=True)
    with pytest.raises(StageError, match="loss became nan in epoch 3"):
        optimizer_step(opt, model(torch.rand(2, 1, 8, 8)).sum() * float("nan"), "cluster", 2)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


class CountingCompile:
    """Stands in for torch.compile: records what is compiled and compiles it with a backend that
    counts the graphs dynamo traced and runs them as traced."""

    def __init__(self):
        self.compiled, self.graphs = [], 0
        self.real = torch.compile

    def backend(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward

    def __call__(self, fn, **kwargs):
        self.compiled.append((fn.__self__, kwargs.get("backend")))
        return self.real(fn, backend=self.backend)


def test_compiled_backbones_keep_their_state_dict_keys_both_ways():
    torch.manual_seed(0)
    compiled, plain = tiny_model(), tiny_model()
    keys = list(compiled.state_dict())
    compile_backbones(compiled, backend="eager")
    assert list(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    plain.load_state_dict(compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(compiled(x), plain(x))


def test_compile_flag_compiles_every_training_backbone_and_its_models_load_uncompiled(tmp_path, tiny_overrides,
                                                                                    monkeypatch):
    counting = CountingCompile()
    monkeypatch.setattr(torch, "compile", counting)
    args = ["run", "--compile", "--no-report", "--out", str(tmp_path / "run")]   # the report is not looked at
    for o in tiny_overrides + ["selflabel.enabled=false"]:
        args += ["--set", o]
    assert main(args) == 0
    run = open_trained_run(tmp_path / "run", device="cpu")
    assert run.cfg.compile   # saved with the run; using a trained run does not compile (inference.py)
    # pretext (SimCLR), cluster and evaluate each compile the backbone they were handed, with inductor
    assert [type(m) for m, _ in counting.compiled] == [Backbone] * len(counting.compiled)
    assert len(counting.compiled) >= 2 and {b for _, b in counting.compiled} == {"inductor"}
    assert counting.graphs > 0   # dynamo traced them: the compiled forward is what trained
    backbone = load_torch(tmp_path / "run" / "pretext" / "backbone.pt")
    assert backbone and not any("_orig_mod" in k for k in backbone)
    assert run.final_stage == "cluster"
    plain = run.model   # an uncompiled model loads the compiled run's weights
    assert not plain.backbone._compiled_call_impl


def test_a_cpu_batch_bound_for_the_gpu_is_pinned_then_copied_as_uint8(monkeypatch):
    pinned, copies = [], []
    monkeypatch.setattr(Runtime, "cuda", property(lambda self: True))   # a CPU-only torch cannot pin memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.dtype) or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, *a, **k: copies.append((self.dtype, k)) or real_to(self, *a, **k))
    rt = Runtime(torch.device("cpu"))
    rt.prepare(tiny_model())
    copies.clear()
    x = rt.batch(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))
    assert pinned == [torch.uint8] and copies[0] == (torch.uint8, {"non_blocking": True})
    assert x.dtype == torch.float32 and bool((x == 1).all())
