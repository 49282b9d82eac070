"""Hypothesis properties: reference agreement, swap identity, invisible save/load, schedules."""

from __future__ import annotations

import io
import math

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from ema_optim import EMAOptimizer, schedules

from .reference import reference_shadows

decays = st.floats(0.0, 1.0, allow_nan=False)


def _model(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(dtype)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    history = []
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model(torch.randn(5, 3, generator=g).to(dtype)).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        history.append([p.detach().double().clone() for p in model.parameters()])
    return history


@given(
    decay=decays,
    steps=st.integers(1, 12),
    update_after_step=st.integers(0, 5),
    update_every=st.integers(1, 4),
    bias_correction=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(decay=1.0, steps=3, update_after_step=0, update_every=1, bias_correction=True, seed=0)  # 0/0 limit
def test_shadow_equals_reference(decay, steps, update_after_step, update_every, bias_correction, seed):
    model = _model(seed)
    kwargs = dict(
        update_after_step=update_after_step, update_every=update_every, bias_correction=bias_correction
    )
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), decay=decay, **kwargs)
    initial = [p.detach().double().clone() for p in model.parameters()]
    history = _train(model, opt, steps, seed)
    for i, p in enumerate(model.parameters()):
        ref = reference_shadows(initial[i], [h[i] for h in history], decay, **kwargs)[-1]
        torch.testing.assert_close(opt.state[p]["ema"], ref, atol=1e-12, rtol=1e-12)
        # an average of the weights seen: within their range
        seen = torch.stack([initial[i]] + [h[i] for h in history])
        assert bool((opt.state[p]["ema"] >= seen.min(0).values - 1e-12).all())
        assert bool((opt.state[p]["ema"] <= seen.max(0).values + 1e-12).all())


@given(steps=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_polyak_is_the_arithmetic_mean(steps, seed):
    model = _model(seed)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=schedules.polyak())
    history = _train(model, opt, steps, seed)
    for i, p in enumerate(model.parameters()):
        mean = torch.stack([h[i] for h in history]).mean(0)
        torch.testing.assert_close(opt.state[p]["ema"], mean, atol=1e-12, rtol=1e-12)


@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    steps=st.integers(0, 4),
    action=st.sampled_from(["nothing", "raise", "modify", "forward"]),
    seed=st.integers(0, 2**16),
)
def test_swap_then_exit_is_the_identity(dtype, steps, action, seed):
    model = _model(seed, dtype)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.6)
    _train(model, opt, steps, seed)
    params = [p.detach().clone() for p in model.parameters()]
    shadows = [opt.state[p]["ema"].clone() for p in model.parameters() if "ema" in opt.state[p]]
    try:
        with opt.swap_ema_weights():
            if action == "forward":
                model(torch.randn(2, 3).to(dtype))
            elif action == "raise":
                raise ValueError
            elif action == "modify":
                with torch.no_grad():
                    model[0].bias.zero_()
    except ValueError:
        pass
    if action != "modify":
        assert all(
            torch.equal(a.view(-1).view(torch.uint8), p.detach().reshape(-1).view(torch.uint8))
            for a, p in zip(params, model.parameters())
        )
        assert all(torch.equal(s, opt.state[p]["ema"]) for s, p in zip(shadows, model.parameters()))
    elif steps > 0:  # edits hit the EMA (there is none before the first step); training weights come back
        assert all(torch.equal(a, p.detach()) for a, p in zip(params, model.parameters()))


@given(
    n1=st.integers(0, 6),
    n2=st.integers(1, 6),
    decay=st.one_of(decays, st.sampled_from(["warmup", "polyak"])),
    update_after_step=st.integers(0, 3),
    update_every=st.integers(1, 3),
    bias_correction=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_save_load_mid_run_is_invisible(
    n1, n2, decay, update_after_step, update_every, bias_correction, dtype
):
    decay = {"warmup": schedules.warmup(0.99), "polyak": schedules.polyak()}.get(decay, decay)
    kwargs = dict(
        decay=decay,
        update_after_step=update_after_step,
        update_every=update_every,
        bias_correction=bias_correction,
    )

    def build(seed):
        model = _model(seed, dtype)
        return model, EMAOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), **kwargs)

    model, opt = build(0)
    _train(model, opt, n1, 1)
    _train(model, opt, n2, 2)

    model_a, opt_a = build(0)
    _train(model_a, opt_a, n1, 1)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b, opt_b = build(99)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_b, opt_b, n2, 2)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["ema"], opt_b.state[q]["ema"])


@given(t=st.integers(0, 10**7))
def test_schedules_match_their_formulas(t):
    assert schedules.warmup(0.999, 2.0, 0.75, 0.1)(t) == min(max(1 - (1 + t / 2.0) ** -0.75, 0.1), 0.999)
    assert schedules.polyak()(t) == t / (t + 1)
    assert math.isclose(schedules.half_life(50)(t) ** 50, 0.5, rel_tol=1e-12)
    assert math.isclose(schedules.linear(0.9, 0.99, 1000)(t), 0.9 + min(t / 1000, 1) * 0.09, rel_tol=1e-12)
    c = schedules.cosine(0.9, 0.99, 1000)(t)
    assert math.isclose(
        c, 0.99 + (0.9 - 0.99) * (1 + math.cos(math.pi * min(t, 1000) / 1000)) / 2, rel_tol=1e-12
    )
    for d in (schedules.warmup()(t), schedules.linear(0.9, 0.99, 10)(t), schedules.cosine(0.99, 0.9, 10)(t)):
        assert 0.0 <= d <= 1.0
