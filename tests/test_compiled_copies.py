"""The traced EMA update (``_kernels._traced_lerp_``): a weight of 1 (a copy)
under torch.compile must neither recompile as a schedule reaches it (SPEC "The compiled step": no
recompilation when a scheduled decay changes) nor fail for complex shadows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

from ema_optim import EMAOptimizer
from tests.test_compiled_step import ScaleAwareSGD, _scaler_step


class Count:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return aot_eager(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs_per_step(opt, p, steps):
    count = Count()
    step = torch.compile(opt.step, backend=count)
    per = []
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        before = count.graphs
        step()
        per.append(count.graphs - before)
    return per


def _every(m):
    return lambda t: 0.0 if t % m == 0 else 0.5  # a hard reset every m updates


@pytest.mark.parametrize("periods", [(3,), (2, 3, 5, 7)], ids=["one-shadow", "four-shadows"])
def test_a_schedule_reaching_zero_does_not_recompile(periods):
    # With the copy decided on the host, each new combination of shadows at weight 1 was a new
    # graph: one recompile for one shadow, and past Dynamo's recompile limit (8) for four (the
    # step then ran eagerly).
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16))
    decay = tuple(_every(m) for m in periods)
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), decay=decay)
    per = _graphs_per_step(opt, p, 24)
    assert all(n == 0 for n in per[2:]), per


def test_bias_correction_after_the_copy_phase_recompiles_only_at_the_phase_change():
    # The first EMA update after update_after_step has weight 1 with bias_correction.
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), decay=0.9, bias_correction=True, update_after_step=3)
    per = _graphs_per_step(opt, p, 10)
    assert all(n == 0 for n in per[4:]), per


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    "kwargs",
    [{"decay": (0.0, 0.9)}, {"decay": 0.9, "bias_correction": True, "update_after_step": 1}],
    ids=["hard-target", "bias-correction"],
)
def test_compiled_weight_of_one_with_complex_params(dtype, kwargs):
    # A complex shadow's weight is complex: a copy cannot be told by ``weight > 0``.
    def train(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(8, dtype=dtype))
        opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), **kwargs)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(4):
            p.grad = torch.randn_like(p)
            step()
        return {k: v for k, v in opt.state[p].items() if k.startswith("ema")}

    eager, compiled = train(False), train(True)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k])
    assert torch.equal(compiled["ema"], eager["ema"]) or "bias_correction" in kwargs


def test_a_gradscaler_skip_with_a_schedule_reaching_zero_keeps_the_shadows():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64))
    opt = EMAOptimizer(ScaleAwareSGD([p], lr=0.1), decay=(_every(2), 0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    scaler.scale(torch.ones(()))
    step = _scaler_step(scaler, opt, torch.compile(opt.step, backend="aot_eager"))
    for n in range(1, 9):
        p.grad = torch.randn(64) * scaler.get_scale()
        skip = n in (3, 4)  # one at t % 2 == 0 (weight 1), one not
        if skip:
            p.grad[0] = float("inf")
            before = [opt.state[p][k].clone() for k in ("ema", "ema_1")]
        step()
        scaler.update()
        if skip:
            assert all(torch.equal(opt.state[p][k], b) for k, b in zip(("ema", "ema_1"), before)), n
