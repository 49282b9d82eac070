"""ema_device="cpu": the background update of offloaded shadows (ema_optim/_offload.py).

These machines have no GPU, so the shadows and params share the CPU and the optimizer would
update in place. The tests force the offload pipeline (staging copy, background fold, waits)
on CPU tensors; only the CUDA side stream and events are not exercised here.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer, _kernels, _offload, schedules

from .reference import reference_shadows


@pytest.fixture
def force_offload(monkeypatch):
    monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)


@pytest.fixture
def gate(monkeypatch):
    """While the gate is closed (``gate.clear()``), background folds wait until it opens."""
    opened = threading.Event()
    opened.set()
    fold = _offload._fold

    def held(*args):
        assert opened.wait(timeout=30), "the gate was never opened"
        fold(*args)

    monkeypatch.setattr(_offload, "_fold", held)
    yield opened
    opened.set()


def make(dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=0.05, **kwargs.pop("inner", {}))
    kwargs.setdefault("ema_device", "cpu")  # CPU params: offloaded only where a test forces it
    return model, EMAOptimizer(inner, **kwargs)


def train(model, opt, steps, seed=1, history=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g).to(dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if history is not None:
            history.append([p.detach().double().clone() for p in model.parameters()])


def shadows(opt, model):
    sd = opt.state_dict()  # waits for the pending update
    return [sd["state"][i]["ema"] for i in range(len(list(model.parameters())))]


CONFIGS = {
    "fp32-schedule-bias": (torch.float32, dict(decay=schedules.warmup(0.95), bias_correction=True)),
    "fp32-after-every": (torch.float32, dict(decay=0.8, update_after_step=2, update_every=2)),
    "bf16-fp32-shadows": (torch.bfloat16, dict(decay=0.9)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_offloaded_shadows_equal_on_device_bitwise(name, monkeypatch):
    dtype, kwargs = CONFIGS[name]
    model, opt = make(dtype, **kwargs)
    initial = [p.detach().double().clone() for p in model.parameters()]
    history = []
    train(model, opt, 7, history=history)
    expected = shadows(opt, model)
    assert all(g.staged is None for g in opt._rt.layout.groups)  # the on-device run is really on-device

    monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
    model_o, opt_o = make(dtype, ema_device="cpu", **kwargs)
    train(model_o, opt_o, 7)
    assert all(g.staged is not None for g in opt_o._rt.layout.groups), "the offload pipeline must be used"
    got = shadows(opt_o, model_o)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype == torch.float32
        assert torch.equal(g, e)
    # and both follow the float64 reference
    for i, e in enumerate(expected):
        ref = reference_shadows(initial[i], [h[i] for h in history], **kwargs)[-1]
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(e.double(), ref, rtol=tol, atol=tol)


def held_run(gate, decay, steps):
    """A run whose last update is held behind the gate, its reference run, and the reference's
    shadows after the same steps."""
    model, opt = make(decay=decay)
    reference_model, reference = make(decay=decay)
    train(reference_model, reference, steps - 1)
    train(reference_model, reference, 1, seed=2)
    expected = shadows(reference, reference_model)
    train(model, opt, steps - 1)
    opt._rt.offload.wait()  # the earlier folds are done; hold the next one
    gate.clear()
    train(model, opt, 1, seed=2)  # returns with the last update held behind the gate
    return model, opt, reference_model, reference, expected


def test_step_returns_while_the_fold_is_pending_and_readers_wait(force_offload, gate):
    model, opt, _, _, expected = held_run(gate, decay=0.7, steps=3)
    pending = opt._rt.offload._pending
    assert pending is not None and not pending.done()
    # what a reader that does not wait would see (the inner optimizer's state): step 2's shadows
    inner_state = opt.optimizer.state
    assert not any(torch.equal(inner_state[p]["ema"], e) for p, e in zip(model.parameters(), expected))

    threading.Timer(0.2, gate.set).start()
    got = [opt.state[p]["ema"] for p in model.parameters()]  # opt.state waits for the fold
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_an_edit_through_opt_state_after_step_is_not_overwritten_by_the_fold(force_offload, gate):
    model, opt, _, _, _ = held_run(gate, decay=0.5, steps=2)
    threading.Timer(0.2, gate.set).start()
    p = next(model.parameters())
    opt.state[p]["ema"].fill_(100.0)  # waits for the pending fold first
    opt._rt.offload.wait()
    assert torch.all(opt.state_dict()["state"][0]["ema"] == 100.0)


@pytest.mark.parametrize("reader", ["swap", "deepcopy", "pickle", "load_state_dict", "next_step"])
def test_every_reader_waits_for_the_pending_update(force_offload, gate, reader):
    model, opt, reference_model, reference, expected = held_run(gate, decay=0.6, steps=2)
    assert not opt._rt.offload._pending.done()
    threading.Timer(0.2, gate.set).start()
    if reader == "swap":
        with opt.swap_ema_weights():
            got = [p.detach().clone() for p in model.parameters()]
    elif reader in ("deepcopy", "pickle"):
        clone = copy.deepcopy(opt) if reader == "deepcopy" else pickle.loads(pickle.dumps(opt))
        got = [clone.state[p]["ema"] for p in clone.param_groups[0]["params"]]
        train(model, opt, 1)  # the original goes on; the copy has its own pipeline
        assert clone._rt.offload is not opt._rt.offload
    elif reader == "load_state_dict":
        opt.load_state_dict(reference.state_dict())  # must not race with the fold into the old shadows
        got = shadows(opt, model)
    else:
        train(reference_model, reference, 1, seed=3)
        train(model, opt, 1, seed=3)
        expected = shadows(reference, reference_model)
        got = shadows(opt, model)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_a_failed_fold_is_reported_at_the_next_wait(force_offload, monkeypatch):
    model, opt = make(decay=0.5)
    train(model, opt, 1)

    def broken(*args):
        raise MemoryError("no host memory")

    monkeypatch.setattr(_offload, "_fold", broken)
    train(model, opt, 1)  # the failure happens in the background: step() itself succeeds
    with pytest.raises(RuntimeError, match="background update of the offloaded EMA shadows") as info:
        opt.state_dict()
    assert isinstance(info.value.__cause__, MemoryError)
    monkeypatch.undo()
    monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
    train(model, opt, 1)  # reported once; the optimizer goes on
    opt.state_dict()


def test_gradscaler_skip_and_tensor_weight_through_the_offload(monkeypatch):
    # A scale-aware fused inner optimizer: the skip is known on the device only, so the
    # weight is a tensor; the background fold must use this step's value.
    def run(offload):
        if offload:
            monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
        model, opt = make(decay=0.75, inner={"fused": True}, ema_device="cpu" if offload else None)
        assert opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        g = torch.Generator().manual_seed(3)
        for i in range(5):
            x = torch.randn(8, 5, generator=g)
            scaler.scale(model(x).pow(2).mean()).backward()
            if i == 2:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        monkeypatch.undo()
        return shadows(opt, model)

    on_device, offloaded = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(on_device, offloaded))


def test_without_offload_nothing_runs_in_the_background():
    model, opt = make(decay=0.5, ema_device="cpu")  # CPU params: the shadows are already there
    train(model, opt, 2)
    assert all(g.staged is None for g in opt._rt.layout.groups)
    assert opt._rt.offload._pending is None


def test_compiled_step_with_offload_equals_compiled_on_device(monkeypatch):
    def run(offload):
        if offload:
            monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
        model, opt = make(decay=schedules.warmup(0.9), ema_device="cpu" if offload else None)
        step = torch.compile(opt.step, backend="aot_eager")
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(8, 5, generator=g)).pow(2).mean().backward()
            step()
            opt.zero_grad()
        monkeypatch.undo()
        return shadows(opt, model)

    # The offloaded fold runs eagerly in the background; the compiled update on the device
    # is traced (compiled kernels may round differently: on torch 2.7 they do, by an ulp).
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_offload_benchmark_runs_on_cpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "offload.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "offload-sync" in result.stdout and "no claim" in result.stdout


def test_a_fold_that_failed_stops_the_next_step_before_it_changes_anything(force_offload, monkeypatch):
    release = threading.Event()

    def slow_failure(*args):
        release.wait(timeout=30)
        raise ZeroDivisionError("fold failed")

    model, opt = make(decay=0.5)
    train(model, opt, 1)
    monkeypatch.setattr(_offload, "_fold", slow_failure)
    train(model, opt, 1)
    assert not opt._rt.offload._pending.done()  # the next step starts while the fold still runs
    threading.Timer(0.2, release.set).start()
    params = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 5)).sum().backward()
    with pytest.raises(RuntimeError, match="background update") as info:
        opt.step()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert opt.state_dict()["param_groups"][0]["ema_steps"] == 2


@pytest.mark.parametrize("device", ["cuda:1", "meta", "nonsense"])
def test_ema_device_other_than_cpu_is_refused(device):
    with pytest.raises(ValueError, match="ema_device must be None"):
        make(ema_device=device)
