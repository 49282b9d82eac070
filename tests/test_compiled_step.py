"""The compiled step (SPEC "The compiled step"): after the first step, ``torch.compile(opt.step)``
traces the inner optimizer's update and the EMA update into one graph, does not recompile as
a scheduled decay changes, and agrees with the float64 reference and with eager.

Graphs are recorded by a backend that lists the ops of every graph Dynamo hands it (and runs it
with ``aot_eager``: the graph boundaries are Dynamo's, whatever the backend; Inductor is too slow
to compile on 2 cores for every case, so one case runs it, and ``benchmarks/compiled.py`` counts
its kernels).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _use_grad_for_differentiable, register_optimizer_step_pre_hook

from ema_optim import EMAOptimizer, _runtime, schedules
from tests.reference import reference_shadows

_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.backends.debugging import aot_eager as _aot_eager  # noqa: E402

STEPS = 6


class ScaleAwareSGD(torch.optim.SGD):
    """A traceable scale-aware optimizer: GradScaler hands it ``grad_scale``/``found_inf``
    (as it does torch's fused ones) and it unscales and skips on the device, without a sync."""

    _step_supports_amp_scaling = True

    @_use_grad_for_differentiable
    def step(self, closure=None):
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if scale is not None:
                keep = 1.0 - found_inf.reshape(())
                factor = keep * group["lr"] / scale.reshape(())
                skip = found_inf.reshape(()).bool()
                grads = [g.mul(factor).masked_fill(skip, 0.0) for g in grads]  # inf * 0 is nan
                torch._foreach_sub_(params, grads)
            else:
                torch._foreach_add_(params, grads, alpha=-group["lr"])


class Recorder:
    """A backend that keeps, for every graph Dynamo hands it, the storages of its tensor inputs
    (then runs it with ``aot_eager``). A graph holds the EMA update if a shadow is among its
    inputs, and the inner update if a gradient is (the EMA never reads one)."""

    def __init__(self):
        self.graphs: list[set[int]] = []

    def __call__(self, gm, example_inputs):
        # Dynamo passes some tensors as inputs and installs others (an optimizer's state, which
        # it marks static) as attributes of the graph module
        attrs = [_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        tensors = [t for t in [*example_inputs, *attrs] if isinstance(t, torch.Tensor)]
        self.graphs.append({_ptr(t) for t in tensors})
        return _aot_eager(gm, example_inputs)


def _attr(gm, target):
    for name in target.split("."):
        gm = getattr(gm, name)
    return gm


def _ptr(t):
    return t.untyped_storage().data_ptr()


def _model(dtype=torch.float32, batchnorm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Linear(8, 1)]
    return nn.Sequential(*layers).to(dtype)


# name -> (inner factory, EMAOptimizer kwargs, param dtype, batchnorm, ops the inner update shows)
CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05), {}, torch.float32, False, ("add",)),
    "sgd-momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        {},
        torch.float32,
        False,
        ("add", "mul"),
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), {}, torch.float32, False, ("addcdiv", "sqrt")),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), {}, torch.float32, False, ("addcdiv", "sqrt")),
    "adamw-foreach": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        {},
        torch.float32,
        False,
        ("addcdiv", "sqrt"),
    ),
    "two-shadows": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        {"decay": (0.5, 0.9)},
        torch.float32,
        False,
        ("addcdiv",),
    ),
    "bf16": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        {},
        torch.bfloat16,
        False,
        ("addcdiv",),
    ),
    "schedule": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        {"decay": schedules.warmup(0.99), "bias_correction": True},
        torch.float32,
        False,
        ("addcdiv",),
    ),
    "buffers": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), {}, torch.float32, True, ("add",)),
    "grad-scaler": (lambda ps: ScaleAwareSGD(ps, lr=0.05), {}, torch.float32, False, ("sub",)),
}


def _run(name, compiled, steps=STEPS, backend=None):
    """Train ``steps`` steps; returns (model, opt, initial weights, float64 weights after each
    step, graphs compiled at each step)."""
    factory, kwargs, dtype, batchnorm, _ = CASES[name]
    model = _model(dtype, batchnorm)
    opt = EMAOptimizer(
        factory(list(model.parameters())),
        **{"decay": 0.9, **kwargs},
        buffers=model if batchnorm else None,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0) if name == "grad-scaler" else None
    recorder = Recorder()
    step = torch.compile(opt.step, backend=backend or recorder) if compiled else opt.step
    if scaler is not None:
        step = _scaler_step(scaler, opt, step)
    g = torch.Generator().manual_seed(1)
    initial = [p.detach().double().clone() for p in model.parameters()]
    weights, graphs = [], []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        before = len(recorder.graphs)
        step()
        opt.zero_grad(set_to_none=False)  # the same gradient tensors at every step (see Recorder)
        if scaler is not None:
            scaler.update()
        graphs.append(recorder.graphs[before:])
        weights.append([p.detach().double().clone() for p in model.parameters()])
    return model, opt, initial, weights, graphs


def _scaler_step(scaler, opt, step):
    def run():
        scaler.step(opt) if step is opt.step else _scaled(scaler, opt, step)

    return run


def _scaled(scaler, opt, step):
    # GradScaler.step(opt) calls opt.step(); route that call to the compiled step.
    original = opt.step
    opt.step = step
    try:
        scaler.step(opt)
    finally:
        opt.step = original


def _ops(graph):
    return " ".join(graph)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    _dynamo.reset()
    with _dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        yield
    _dynamo.reset()


@pytest.mark.parametrize("name", list(CASES))
def test_one_graph_holds_the_inner_update_and_the_ema(name):
    model, opt, _, _, graphs = _run(name, compiled=True)
    shadows = {_ptr(v) for s in opt.state.values() for k, v in s.items() if k.startswith("ema")}
    grads = {_ptr(p.grad) for p in model.parameters()}
    # the second step compiles the steady-state body (Dynamo may trace a frame twice);
    # later steps reuse it
    with_ema = [g for g in graphs[1] if g & shadows]
    assert with_ema, "no graph of the second step updates the shadows"
    assert all(g & grads for g in with_ema), "the EMA update is in a graph without the inner update"
    assert all(g == [] for g in graphs[2:]), "recompiled after the second step"


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_matches_the_float64_reference(name):
    model, opt, initial, weights, _ = _run(name, compiled=True)
    kwargs = {"decay": 0.9, **CASES[name][1]}
    decays = kwargs["decay"] if isinstance(kwargs["decay"], tuple) else (kwargs["decay"],)
    tol = 1e-2 if CASES[name][2] == torch.bfloat16 else 1e-5
    for i, p in enumerate(model.parameters()):
        for k, decay in enumerate(decays):
            want = reference_shadows(
                initial[i],
                [w[i] for w in weights],
                decay,
                bias_correction=kwargs.get("bias_correction", False),
            )[-1]
            shadow = opt.state[p]["ema" if k == 0 else f"ema_{k}"]
            # fp32 shadows of bf16 params: the reference folds the same bf16 weights in float64
            torch.testing.assert_close(shadow.double(), want, atol=tol * 1e-1, rtol=tol)
    assert opt.state_dict()["param_groups"][0]["ema_updates"] == STEPS


@pytest.mark.parametrize("name", ["adamw-foreach", "bf16", "two-shadows", "grad-scaler", "buffers"])
def test_compiled_step_agrees_with_eager(name):
    compiled = _run(name, compiled=True)
    eager = _run(name, compiled=False)
    # compiled kernels may round differently: a few fp32 roundings, or one bf16 one
    tol = 1e-2 if CASES[name][2] == torch.bfloat16 else 1e-5
    for a, b in zip(compiled[0].state_dict().values(), eager[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    sd_c, sd_e = compiled[1].state_dict(), eager[1].state_dict()
    for i, entry in sd_e["state"].items():
        for key, value in entry.items():
            if key.startswith("ema"):
                torch.testing.assert_close(sd_c["state"][i][key], value, atol=tol, rtol=tol)


def test_inductor_fuses_and_matches_the_reference():
    # The real compiler once: the EMA in Inductor's kernels, still the formula.
    model, opt, initial, weights, _ = _run("two-shadows", compiled=True, backend="inductor", steps=3)
    for i, p in enumerate(model.parameters()):
        for k, decay in enumerate((0.5, 0.9)):
            want = reference_shadows(initial[i], [w[i] for w in weights], decay)[-1]
            torch.testing.assert_close(opt.state[p][("ema", "ema_1")[k]].double(), want, atol=1e-6, rtol=1e-5)


def _vector_widths(step, calls=3):
    """The vector widths of the loops in the code Inductor generated at the last of ``calls``
    calls of ``step`` that compiled something (its steady state)."""
    from torch._inductor.utils import run_and_get_code

    widths = None
    for _ in range(calls):
        _, codes = run_and_get_code(step)
        if codes:
            widths = set(re.findall(r"x0\+=static_cast<int64_t>\((\d+)L\)", " ".join(codes)))
    return widths


def test_inductor_keeps_the_inner_kernels_vector_width_with_bf16_params():
    # fp32 shadows of bf16 params fused into a bf16 AdamW kernel: the kernel still runs at the
    # inner update's vector width (AVX-512: 32 lanes), not at float32's (16), which doubled the
    # per-element cost of the inner update's scalar work (+0.9 of the step on CPU).
    def params():
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(4096).to(torch.bfloat16)) for _ in range(2)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    with torch._inductor.config.patch(fx_graph_cache=False):
        inner = _vector_widths(torch.compile(torch.optim.AdamW(params(), lr=1e-3, foreach=True).step))
        opt = EMAOptimizer(torch.optim.AdamW(params(), lr=1e-3, foreach=True), decay=0.999)
        wrapper = _vector_widths(torch.compile(opt.step))
    assert inner and wrapper == inner, (inner, wrapper)


def test_no_recompile_over_twenty_steps_with_a_schedule():
    *_, graphs = _run("schedule", compiled=True, steps=20)
    assert all(g == [] for g in graphs[2:]), [len(g) for g in graphs]


def test_swap_state_dict_and_exact_resume_inside_a_compiled_loop(tmp_path):
    def loop(model, opt, step, start, stop, g):
        for n in range(start, stop):
            x = torch.randn(16, 6, generator=g)
            model(x).pow(2).mean().backward()
            step()
            opt.zero_grad()
            if n % 2 == 1:  # evaluate the EMA model inside the loop
                before = [p.detach().clone() for p in model.parameters()]
                with opt.swap_ema_weights():
                    model(x)
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    def build():
        model = _model()
        opt = EMAOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True), decay=schedules.warmup()
        )
        return model, opt, torch.compile(opt.step, backend="aot_eager")

    model, opt, step = build()
    g = torch.Generator().manual_seed(2)
    loop(model, opt, step, 0, 8, g)

    model_a, opt_a, step_a = build()
    g_a = torch.Generator().manual_seed(2)
    loop(model_a, opt_a, step_a, 0, 4, g_a)
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    model_b, opt_b, step_b = build()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    loop(model_b, opt_b, step_b, 4, 8, g_a)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["ema"], opt_b.state[q]["ema"])
    assert opt.state_dict()["param_groups"][0]["ema_updates"] == 8
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 8


class NoGradSGD(torch.optim.Optimizer):
    """A third-party optimizer whose step is not torch's standard wrapper."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_a_non_standard_inner_step_falls_back_and_stays_correct():
    model = _model()
    inner = NoGradSGD(model.parameters(), lr=0.05)
    assert _runtime.traced_body(inner) is None
    opt = EMAOptimizer(inner, decay=0.8)
    step = torch.compile(opt.step, backend="aot_eager")
    _assert_follows_the_reference(model, opt, step, decay=0.8, seed=3, loss=lambda y: y.pow(2).mean())


def _assert_follows_the_reference(model, opt, step, decay, seed, loss):
    """Four steps of ``step``; then each shadow against the float64 reference."""
    initial = [p.detach().double().clone() for p in model.parameters()]
    weights = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        loss(model(torch.randn(8, 6, generator=g))).backward()
        step()
        opt.zero_grad()
        weights.append([p.detach().double().clone() for p in model.parameters()])
    for i, p in enumerate(model.parameters()):
        want = reference_shadows(initial[i], [w[i] for w in weights], decay)[-1]
        torch.testing.assert_close(opt.state[p]["ema"].double(), want, atol=1e-6, rtol=1e-5)


STANDARD = [
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.ASGD,
    torch.optim.Adadelta,
    torch.optim.Rprop,
]


@pytest.mark.parametrize("cls", STANDARD, ids=lambda c: c.__name__)
def test_what_the_fused_step_relies_on_in_this_torch(cls):
    # torch's stock steps are hooked by Optimizer (profile_hook_step) around the grad-mode
    # wrapper _use_grad_for_differentiable around the update: the one traced body reaches the
    # update two __wrapped__ below the class's step, and graph_break() exists.
    inner = cls([nn.Parameter(torch.zeros(2))], lr=0.1)
    body = _runtime.traced_body(inner)
    assert body is not None and body.__name__ == "step" and body is not type(inner).step
    assert "differentiable" in inner.defaults
    assert callable(torch._dynamo.graph_break)
    # LBFGS is not traced (Dynamo disables its step): it keeps the step in parts
    assert _runtime.traced_body(torch.optim.LBFGS([nn.Parameter(torch.zeros(2))])) is None


def test_the_fused_step_keeps_grad_mode_hooks_and_profiler_record():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = EMAOptimizer(inner, decay=0.9)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append(("pre", torch.is_grad_enabled())))
    inner.register_step_post_hook(lambda o, a, k: seen.append(("post", torch.is_grad_enabled())))
    for _ in range(2):
        model(torch.ones(2, 6)).sum().backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        assert torch.is_grad_enabled()
    names = [e.name for e in prof.events()]
    assert "Optimizer.step#AdamW.step" in names and "Optimizer.step#EMAOptimizer.step" in names
    assert seen == [("pre", True), ("post", True)] * 2


def test_an_lr_scheduler_on_the_inner_optimizer_sees_the_compiled_step():
    # Dynamo drops attribute stores on an optimizer in traced code: the step must be marked
    # as called (for the scheduler's "lr_scheduler.step() before optimizer.step()" check) eagerly.
    model = _model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5), decay=0.8)
    scheduler = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    step = torch.compile(opt.step, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*lr_scheduler\.step\(\)")
        for _ in range(3):
            model(torch.ones(2, 6)).sum().backward()
            step()
            opt.zero_grad()
            assert getattr(opt.optimizer, "_opt_called", False)
            scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.125


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_ema_averages_the_weights_an_inner_post_hook_leaves(compiled):
    # A post hook on the inner optimizer that edits the weights (a constraint after each step)
    # is part of the inner step: the EMA folds in the weights it leaves, at every step.
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.5)

    def constrain(opt, args, kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.2, 0.2)

    inner.register_step_post_hook(constrain)
    opt = EMAOptimizer(inner, decay=0.5)
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    _assert_follows_the_reference(model, opt, step, decay=0.5, seed=4, loss=lambda y: y.pow(2).sum())


def test_lbfgs_with_a_scheduler_built_before_dynamo_wrapped_its_step_runs_global_hooks_once():
    # Dynamo wraps LBFGS.step in its disable at its first compile; an LR scheduler built on the
    # inner optimizer before that patched the instance with the step as it was. The global step
    # hooks still run once per step, for the wrapper.
    class LateLBFGS(torch.optim.LBFGS):
        pass

    model = nn.Linear(3, 1)
    inner = LateLBFGS(model.parameters(), lr=0.5, max_iter=2)
    torch.optim.lr_scheduler.StepLR(inner, step_size=10)
    LateLBFGS.step = torch._dynamo.disable(LateLBFGS.step)  # what Dynamo does to LBFGS
    opt = EMAOptimizer(inner, decay=0.8)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(o))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).pow(2).mean()
        loss.backward()
        return loss

    try:
        opt.step(closure)
        opt.step(closure)
    finally:
        handle.remove()
    assert calls == [opt, opt]
    assert inner._opt_called


def test_the_fused_step_runs_the_inner_pre_hooks_in_the_callers_grad_mode(monkeypatch):
    # with no post hook on the inner optimizer, a steady-state step is the one body (not in parts)
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = EMAOptimizer(inner, decay=0.9)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append(torch.is_grad_enabled()))
    model(torch.ones(2, 6)).sum().backward()
    opt.step()  # the first step installs the shadows: in parts

    def in_parts(*args):
        raise AssertionError("a steady-state step ran in parts")

    monkeypatch.setattr(_runtime, "inner_step", in_parts)
    for _ in range(2):
        model(torch.ones(2, 6)).sum().backward()
        opt.step()
        assert torch.is_grad_enabled()
    assert seen == [True] * 3


class Assign(torch.optim.Optimizer):
    """Moves each weight to its gradient (divided by GradScaler's scale, a power of 2; a step
    with ``found_inf`` leaves the weights): any weights, to the bit, through a standard step."""

    _step_supports_amp_scaling = True

    def __init__(self, params):
        super().__init__(params, {"differentiable": False})

    @_use_grad_for_differentiable
    def step(self, closure=None):
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if scale is None:
                    p.copy_(p.grad)
                else:
                    p.copy_(torch.where(found_inf.reshape(()) > 0, p, p.grad / scale.reshape(())))


def _targets(n, size=256):
    """Weights for each step, alternating between magnitudes 1 and 1e-6: a copy computed as
    ``ema + (w - ema) * 1`` rounds there (``w - ema`` loses digits of the small weight)."""
    g = torch.Generator().manual_seed(9)
    return [torch.rand(size, generator=g).add_(0.5).mul_(1e-6 if k % 2 else 1.0) for k in range(n)]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"decay": 0.0}, "ema"),
        ({"decay": (0.9, 0.0)}, "ema_1"),
        ({"decay": 0.9, "update_after_step": 100}, "ema"),
    ],
    ids=["hard-copy", "one-of-two", "copy-phase"],
)
def test_compiled_copies_are_exact(kwargs, key):
    # A weight of 1 (decay 0: a hard target) and the copy phase give the weights bit for bit,
    # compiled as eagerly.
    p = nn.Parameter(torch.ones(256))
    opt = EMAOptimizer(Assign([p]), **kwargs)
    step = torch.compile(opt.step, backend="aot_eager")
    for n, target in enumerate(_targets(6)):
        p.grad = target
        step()
        assert torch.equal(p, target)
        assert torch.equal(opt.state[p][key], p), n


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.9, "bias_correction": True, "update_after_step": 1},
        {"decay": lambda t: 0.0 if t == 0 else 0.9, "update_after_step": 1},
    ],
    ids=["bias-correction", "schedule-at-zero"],
)
def test_a_compiled_first_update_of_weight_one_is_exact(kwargs):
    # SPEC: with bias correction the first update yields ema = w_1; a schedule returning 0
    # copies. Compiled too, when the weights moved far from the shadow (1 -> 1e-6), where
    # ema + (w - ema) * 1 rounds.
    p = nn.Parameter(torch.ones(256))
    opt = EMAOptimizer(Assign([p]), **kwargs)
    step = torch.compile(opt.step, backend="aot_eager")
    for n, target in enumerate(_targets(2), start=1):
        p.grad = target
        step()
        assert torch.equal(opt.state[p]["ema"], p), n  # step 1: the copy phase; 2: the update


def test_the_compiled_copy_phase_under_a_gradscaler_is_exact():
    # Under a GradScaler the copy phase is an update of weight 1 (0 at a skip, on the device).
    p = nn.Parameter(torch.ones(256))
    opt = EMAOptimizer(Assign([p]), decay=0.9, update_after_step=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    scaler.scale(torch.ones(()))  # sets the scale up
    step = _scaler_step(scaler, opt, torch.compile(opt.step, backend="aot_eager"))
    for n, target in enumerate(_targets(6), start=1):
        p.grad = target * scaler.get_scale()  # a power of 2: exact
        step()
        scaler.update()
        assert torch.equal(p, target)
        assert torch.equal(opt.state[p]["ema"], p), n


def test_a_compiled_gradscaler_skip_keeps_the_shadows_and_a_copy_stays_exact():
    # GradScaler skips a step with inf gradients on the device (found_inf): the shadows keep
    # their values bit for bit, also one whose weight is 1 (a hard target updated every 2nd
    # step, so it differs from the weights when the skip comes); the other copies are exact.
    p = nn.Parameter(torch.ones(256))
    opt = EMAOptimizer(Assign([p]), decay=(0.0, 0.5), update_every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    scaler.scale(torch.ones(()))  # sets the scale up
    step = _scaler_step(scaler, opt, torch.compile(opt.step, backend="aot_eager"))
    for n, target in enumerate(_targets(8), start=1):
        p.grad = target * scaler.get_scale()  # a power of 2: exact
        if n == 6:
            p.grad[0] = float("inf")
            before = [opt.state[p][k].clone() for k in ("ema", "ema_1")]
            assert not torch.equal(before[0], p)
        step()
        scaler.update()
        if n == 6:
            assert all(torch.equal(opt.state[p][k], b) for k, b in zip(("ema", "ema_1"), before))
        elif n % 2 == 0:
            assert torch.equal(p, target)
            assert torch.equal(opt.state[p]["ema"], p), n


class SetTo(torch.optim.Optimizer):
    """Sets each weight to a float32 target (``self.targets``), rounded to the weight's dtype by
    the copy: a compiled kernel computes the new bf16/fp16 weight in float32 and rounds it."""

    def __init__(self, params):
        super().__init__(params, {"differentiable": False})
        self.targets = []

    @_use_grad_for_differentiable
    def step(self, closure=None):
        for p, t in zip(self.param_groups[0]["params"], self.targets):
            p.copy_(t)


def _hard_values(dtype, n=4096, seed=0):
    """float32 values that round in ``dtype``: random ones, ties at its rounding position, zeros,
    and for fp16 its subnormal range and the edge of its range (inf from 65520 on)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
    drop = 16 if dtype == torch.bfloat16 else 13  # the float32 mantissa bits the dtype drops
    ties = ((x.view(torch.int32) >> drop << drop) | (1 << (drop - 1))).view(torch.float32)
    if dtype == torch.bfloat16:  # exact for 2**-126 <= |w| < 2**112: its whole normal range in practice
        return torch.cat([x, ties, torch.tensor([0.0, -0.0, 2.0**-126, -(2.0**111) * 1.99])])
    sub = (torch.rand(n, generator=g) - 0.5) * (4 * torch.finfo(dtype).tiny)
    edge = torch.tensor([65504.0, 65519.0, 65520.0, -65530.0, 0.0, -0.0])
    return torch.cat([x, ties, sub, edge])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_fp32_shadows_average_the_low_precision_weights_as_stored(dtype):
    # Inductor hands a fused kernel's later reads of a bf16/fp16 result the float32 value it
    # computed before rounding (unless emulate_precision_casts): the EMA must still average the
    # weights the model holds, as the eager step does. A decay of 0 copies them: to the bit.
    targets = [_hard_values(dtype, seed=k) for k in range(3)]
    p = nn.Parameter(torch.zeros_like(targets[0], dtype=dtype))
    inner = SetTo([p])
    opt = EMAOptimizer(inner, decay=(0.0, 0.5), ema_dtype=torch.float32)
    step = torch.compile(opt.step)  # Inductor: the fused kernel is where the rounding is skipped
    stored = []
    for t in targets:
        inner.targets = [t]
        step()
        stored.append(p.detach().clone())
        assert torch.equal(p.detach(), t.to(dtype))
        assert torch.equal(opt.state[p]["ema"], p.detach().float())  # the copy: the weight as stored
    # the average of the stored weights, to float32 rounding (not half an ulp of ``dtype``)
    want = reference_shadows(torch.zeros(p.shape, dtype=torch.float64), [s.double() for s in stored], 0.5)[-1]
    finite = torch.isfinite(want)
    got = opt.state[p]["ema_1"].double()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-7, atol=1e-30)
