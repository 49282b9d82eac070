"""The training-loop recipes of docs/integrations.md, checked against a float64 EMA reference.

Each test runs the recipe as a user would write it, records the weights the optimizer saw
(before the first step, and after every step that really happened) and compares the shadows
with the EMA rule recomputed from those records in float64. The reference below is written
from SPEC.md, not from ema_optim.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from ema_optim import EMAOptimizer

DECAY = 0.8
TOL = 2e-6  # absolute, float32 weights of order 1, against float64


def ema_reference(
    initial: list[torch.Tensor], after_steps: list[list[torch.Tensor]], decay: float
) -> list[torch.Tensor]:
    """ema starts as the weights when step() is first called; then ema = d*ema + (1-d)*w after each step."""
    ema = [w.double() for w in initial]
    for weights in after_steps:
        ema = [decay * e + (1.0 - decay) * w.double() for e, w in zip(ema, weights)]
    return ema


class Recorder:
    """The weights before the first step and after each step, as float64 copies."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.initial: list[torch.Tensor] | None = None
        self.after: list[list[torch.Tensor]] = []

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().double().clone() for p in self.params]

    def before_step(self) -> None:
        if self.initial is None:
            self.initial = self.snapshot()

    def after_step(self) -> None:
        self.after.append(self.snapshot())


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def batches(n: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


def assert_shadows_match(opt: EMAOptimizer, rec: Recorder, decay: float = DECAY) -> None:
    assert rec.initial is not None and rec.after, "no step was recorded"
    expected = ema_reference(rec.initial, rec.after, decay)
    for p, ref in zip(rec.params, expected):
        shadow = opt.state[p]["ema"]
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), ref, rtol=0, atol=TOL)
    # the shadows average: they differ from the final weights
    assert any(not torch.equal(opt.state[p]["ema"], p.detach()) for p in rec.params)


def test_recipe_torch_compile():
    model = make_model()
    compiled = torch.compile(model)  # shares its parameters with `model`
    opt = EMAOptimizer(torch.optim.AdamW(compiled.parameters(), lr=1e-2), decay=DECAY)
    rec = Recorder(model)
    for x, y in batches(4):
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        rec.before_step()
        opt.step()
        opt.zero_grad()
        rec.after_step()
    assert_shadows_match(opt, rec)

    # The compiled model evaluates the EMA weights inside the swap, and the training weights after it.
    x = batches(1, seed=2)[0][0]
    shadows = {name: opt.state[p]["ema"].clone() for name, p in model.named_parameters()}
    expected = torch.func.functional_call(model, shadows, (x,))
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        compiled(x)  # compile the no-grad graph first
        graphs = counters["stats"]["unique_graphs"]
        with opt.swap_ema_weights():
            got = compiled(x)
        after = compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs, "the swap must not recompile"
    torch.testing.assert_close(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))
    torch.testing.assert_close(after, model(x).detach())


def test_recipe_autocast_bf16_gradscaler_with_inf_step():
    model = make_model()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=DECAY)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    rec = Recorder(model)
    bad_step = 3
    for i, (x, y) in enumerate(batches(6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if i == bad_step:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow: this step must be skipped
        scaler.unscale_(opt)  # unscale before clipping, as torch's AMP recipe does
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        weights_before = [p.detach().clone() for p in model.parameters()]
        shadows_before = [
            s.clone() for s in (opt.state[p].get("ema") for p in model.parameters()) if s is not None
        ]
        scale_before = scaler.get_scale()
        rec.before_step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == bad_step:
            assert scaler.get_scale() < scale_before
            assert all(torch.equal(a, p) for a, p in zip(weights_before, model.parameters()))
            assert all(
                torch.equal(a, opt.state[p]["ema"]) for a, p in zip(shadows_before, model.parameters())
            )
        else:
            rec.after_step()
    assert len(rec.after) == 5
    assert_shadows_match(opt, rec)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_recipe_gradient_accumulation():
    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), decay=DECAY)
    rec = Recorder(model)
    accumulation = 3
    for i, (x, y) in enumerate(batches(9)):
        loss = nn.functional.mse_loss(model(x), y) / accumulation
        loss.backward()
        if (i + 1) % accumulation == 0:
            rec.before_step()
            opt.step()  # one optimizer step, one EMA update, per `accumulation` micro-batches
            opt.zero_grad()
            rec.after_step()
    assert len(rec.after) == 3
    assert_shadows_match(opt, rec)


def test_recipe_gradient_clipping():
    model = make_model()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=DECAY)
    rec = Recorder(model)
    max_norm = 0.05
    norms = []
    for x, y in batches(5):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        rec.before_step()
        opt.step()
        opt.zero_grad()
        rec.after_step()
    assert all(n > max_norm for n in norms), "the recipe should exercise clipping"
    # The step used the clipped gradients: each SGD update has norm lr * max_norm.
    deltas = [
        torch.cat([(a - b).flatten() for a, b in zip(rec.after[k], rec.after[k - 1])]) for k in range(1, 5)
    ]
    for d in deltas:
        assert d.norm().item() == pytest.approx(0.1 * max_norm, rel=1e-4)
    assert_shadows_match(opt, rec)
