"""torch.compile: a changing decay must not recompile the step, and the EMA must match eager.

The decay of a schedule changes at every update. If it reached a compiled frame as a
Python float it would be a guard and recompile every step (after ``recompile_limit``
recompiles Dynamo silently falls back to eager). The recompile limit is raised here so
that per-step recompiles would show as a growing count instead of hiding behind that
fallback.

Backend: ``aot_eager`` (Dynamo capture plus AOT autograd, graphs run eagerly). It goes
through the same guards and recompiles as inductor, which is too slow to compile for CI
on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from ema_optim import EMAOptimizer, schedules

_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

STEPS = 20
SETTLED = 3  # compiles may still grow during the first steps (state created lazily, then guarded)
ATOL = RTOL = 1e-5  # fp32: compiled and eager AdamW may differ by a few roundings


def _setup(bias_correction=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = EMAOptimizer(inner, decay=schedules.warmup(), bias_correction=bias_correction)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    return model, opt, x, y


def _train(compile_step: bool, compile_model: bool, bias_correction=False, dynamic=None):
    """20 training steps; returns (model, opt, compiles seen after each step)."""
    _dynamo.reset()
    model, opt, x, y = _setup(bias_correction)
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter, dynamic=dynamic) if compile_model else model
    step = torch.compile(opt.step, backend=counter, dynamic=dynamic) if compile_step else opt.step
    seen = []
    with _dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        for _ in range(STEPS):
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            step()
            opt.zero_grad()
            seen.append(counter.frame_count)
    _dynamo.reset()
    return model, opt, seen


@pytest.fixture(scope="module")
def eager():
    return _train(compile_step=False, compile_model=False)


def _assert_matches(run, eager_run):
    model, opt, _ = run
    model_e, opt_e, _ = eager_run
    assert opt._rt.counters.updates == opt_e._rt.counters.updates == STEPS
    for p, q in zip(model.parameters(), model_e.parameters()):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(opt.state[p]["ema"], opt_e.state[q]["ema"], atol=ATOL, rtol=RTOL)
    # the EMA really moved away from both its start and the weights (a warm-up decay is in use)
    p0 = next(model.parameters())
    assert not torch.equal(opt.state[p0]["ema"], p0.detach())


# The weight reaches the compiled frame as a 0-dim tensor filled in place outside the graph
# (EMAOptimizer._weight_as_tensor) and the counters are read and written only outside it
# (_plan/_commit), so neither becomes a guard.
@pytest.mark.parametrize(
    "compile_step, compile_model",
    [
        pytest.param(True, False, id="compiled-step"),
        pytest.param(False, True, id="compiled-model"),
        pytest.param(True, True, id="both"),
    ],
)
def test_no_recompile_per_step_and_matches_eager(eager, compile_step, compile_model):
    run = _train(compile_step, compile_model)
    _assert_settled(run[2])
    _assert_matches(run, eager)


def _assert_settled(seen):
    assert seen[-1] > 0, "nothing was compiled"
    assert seen[SETTLED:] == [seen[SETTLED]] * (STEPS - SETTLED), f"compiles per step kept growing: {seen}"
    assert seen[-1] <= 8, f"too many compiled frames for 20 steps: {seen}"


def test_no_recompile_with_bias_correction_and_static_shapes():
    # Nothing that changes per step (counters, decay product) may be visible to Dynamo, not even
    # in the param groups, which it guards value by value: with dynamic=False a changing int
    # there would recompile every step.
    run = _train(compile_step=True, compile_model=False, bias_correction=True, dynamic=False)
    _assert_settled(run[2])
    _assert_matches(run, _train(compile_step=False, compile_model=False, bias_correction=True))
