"""Several averages per param: ``decay=(d0, d1, ...)``, one shadow each (``ema``, ``ema_1``, ...)."""

from __future__ import annotations

import io

import pytest
import torch

from ema_optim import EMAOptimizer, _kernels, schedules

from .reference import reference_shadows

DECAYS = (0.9, schedules.warmup(0.99), schedules.power(sigma_rel=0.1))


def make(dtype=torch.float32, seed=0, decay=DECAYS, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    return model, EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=decay, **kwargs)


def train(model, opt, steps, seed=1, history=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        model(torch.randn(8, 4, generator=g).to(dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if history is not None:
            history.append([p.detach().double().clone() for p in model.parameters()])


def bits(t):
    return t.detach().reshape(-1).view(torch.uint8).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "timing",
    [{}, {"update_after_step": 2, "update_every": 3}, {"bias_correction": True}],
    ids=["plain", "after-every", "bias"],
)
def test_every_shadow_follows_its_own_decay_under_the_shared_timing(dtype, timing):
    model, opt = make(dtype, **timing)
    initial = [p.detach().double().clone() for p in model.parameters()]
    history = []
    train(model, opt, 10, history=history)
    tol = 2e-6 if dtype == torch.float32 else 1e-5  # fp32 shadows either way
    for i, p in enumerate(model.parameters()):
        for k, decay in enumerate(DECAYS):
            shadow = opt.state[p]["ema" if k == 0 else f"ema_{k}"]
            assert shadow.dtype == torch.float32 and shadow.shape == p.shape
            ref = reference_shadows(initial[i], [h[i] for h in history], decay, **timing)[-1]
            torch.testing.assert_close(shadow.double(), ref, atol=tol, rtol=tol)


def test_swap_index_puts_that_shadow_in_and_the_training_weights_back():
    model, opt = make()
    train(model, opt, 4)
    before = [bits(p) for p in model.parameters()]
    for k in range(len(DECAYS)):
        key = "ema" if k == 0 else f"ema_{k}"
        expected = [opt.state[p][key].clone() for p in model.parameters()]
        with opt.swap_ema_weights(k):
            assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
        assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), before))
    last = [opt.state[p]["ema_2"].clone() for p in model.parameters()]
    with opt.swap_ema_weights(-1):  # Python indexing: the last shadow
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), last))


def test_a_bad_value_from_any_schedule_changes_nothing():
    model, opt = make(decay=(0.9, lambda t: 0.5 if t < 2 else 1.5))
    train(model, opt, 2)
    before = [bits(p) for p in model.parameters()] + [bits(opt.state[p]["ema_1"]) for p in model.parameters()]
    with pytest.raises(ValueError, match="1.5 at t=2"):
        train(model, opt, 1)
    after = [bits(p) for p in model.parameters()] + [bits(opt.state[p]["ema_1"]) for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and opt._rt.counters.steps == 2


@pytest.mark.parametrize("index", [3, -4, 10])
def test_swap_index_outside_the_shadows_raises_and_changes_nothing(index):
    model, opt = make()
    train(model, opt, 2)
    before = [bits(p) for p in model.parameters()] + [
        bits(s) for s in opt.state[next(model.parameters())].values()
    ]
    with pytest.raises(IndexError, match="3 shadow"):
        with opt.swap_ema_weights(index):
            pass  # pragma: no cover
    after = [bits(p) for p in model.parameters()] + [
        bits(s) for s in opt.state[next(model.parameters())].values()
    ]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt._rt.swapped is None
    with pytest.raises(TypeError):
        with opt.swap_ema_weights(1.0):
            pass  # pragma: no cover


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_exact_for_every_shadow(dtype):
    model, opt = make(dtype, bias_correction=True)
    train(model, opt, 3)
    sd = roundtrip(opt.state_dict())
    assert {"ema", "ema_1", "ema_2"} <= set(sd["state"][0])
    assert {"ema_decay_prod", "ema_decay_prod_1", "ema_decay_prod_2"} <= set(sd["param_groups"][0])
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 3, seed=2)
    model2, opt2 = make(dtype, seed=5, bias_correction=True)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(sd)
    train(model2, opt2, 3, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(bits(p), bits(q))
        for key in ("ema", "ema_1", "ema_2"):
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(bits(opt.state[p][key]), bits(opt2.state[q][key]))


@pytest.mark.parametrize("saved, loading", [(1, 3), (3, 1), (2, 3)])
def test_a_dict_with_another_shadow_count_does_not_fit(saved, loading):
    model, opt = make(decay=DECAYS[:saved])
    train(model, opt, 2)
    sd = roundtrip(opt.state_dict())
    model2, opt2 = make(decay=DECAYS[:loading])
    train(model2, opt2, 1)
    before = [bits(s) for p in model2.parameters() for s in opt2.state[p].values() if torch.is_tensor(s)]
    with pytest.raises(ValueError, match="shadows|does not fit"):
        opt2.load_state_dict(sd)
    after = [bits(s) for p in model2.parameters() for s in opt2.state[p].values() if torch.is_tensor(s)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and opt2._rt.counters.steps == 1


def test_bf16_params_are_cast_once_per_chunk_for_all_shadows(monkeypatch):
    def casts(n):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300).bfloat16()) for _ in range(20)]
        opt = EMAOptimizer(torch.optim.SGD(params, lr=0.1), decay=(0.9,) * n)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        seen = []
        real = torch._foreach_copy_
        monkeypatch.setattr(
            torch, "_foreach_copy_", lambda dst, src, **kw: (seen.append(len(dst)), real(dst, src, **kw))
        )
        opt.step()
        monkeypatch.setattr(torch, "_foreach_copy_", real)
        return seen

    assert casts(1) == casts(2) == casts(3) and sum(casts(1)) == 20  # each param cast once per step


def test_one_lerp_per_shadow_and_group():
    model, opt = make(decay=(0.9, 0.99))
    train(model, opt, 1)
    groups = opt._rt.layout.groups
    assert len(groups) == 1 and len(groups[0].shadows) == 2
    calls = []
    real = torch._foreach_lerp_
    try:
        torch._foreach_lerp_ = lambda s, e, w: (calls.append(len(s)), real(s, e, w))
        _kernels.lerp_(groups, [0.0, 0.0])
    finally:
        torch._foreach_lerp_ = real
    assert calls == [4, 4]


def test_gradscaler_skip_changes_no_shadow():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, fused=True), decay=(0.8, 0.95))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(4):
        scaler.scale(model(torch.randn(8, 4)).pow(2).sum()).backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
            before = [opt.state[p][k].clone() for p in model.parameters() for k in ("ema", "ema_1")]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            after = [opt.state[p][k] for p in model.parameters() for k in ("ema", "ema_1")]
            assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_offloaded_shadows_equal_on_device_bitwise(monkeypatch):
    model, opt = make()
    train(model, opt, 5)
    monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
    model_o, opt_o = make(ema_device="cpu")
    train(model_o, opt_o, 5)
    sd, sd_o = opt.state_dict(), opt_o.state_dict()
    assert all(g.staged is not None for g in opt_o._rt.layout.groups)
    for i in sd["state"]:
        for key in ("ema", "ema_1", "ema_2"):
            assert torch.equal(bits(sd["state"][i][key]), bits(sd_o["state"][i][key]))


def test_compiled_step_with_two_scheduled_shadows_does_not_recompile():
    _dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.testing import CompileCounterWithBackend

    def run(compiled):
        _dynamo.reset()
        model, opt = make(decay=(schedules.warmup(0.99), schedules.power(gamma=7.0)), bias_correction=True)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter, dynamic=False) if compiled else opt.step
        x, seen = torch.randn(16, 4), []
        with _dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
            for _ in range(12):
                model(x).pow(2).mean().backward()
                step()
                opt.zero_grad()
                seen.append(counter.frame_count)
        _dynamo.reset()
        return model, opt, seen

    model, opt, seen = run(True)
    model_e, opt_e, _ = run(False)
    assert seen[-1] > 0 and seen[3:] == [seen[3]] * 9, seen
    for p, q in zip(model.parameters(), model_e.parameters()):
        for key in ("ema", "ema_1"):
            torch.testing.assert_close(opt.state[p][key], opt_e.state[q][key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, error", [((), ValueError), ((0.9, 1.5), ValueError), ((0.9, "x"), TypeError)])
def test_bad_decay_sequences_are_refused(bad, error):
    with pytest.raises(error, match="decay"):
        EMAOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), decay=bad)
