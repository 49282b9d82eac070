"""The EMA update against the float64 reference, for every inner optimizer, decay and dtype."""

from __future__ import annotations

import pytest
import torch

from ema_optim import EMAOptimizer, schedules

from .reference import reference_shadows

# (atol, rtol) of the shadow against the float64 reference: a few float32 roundings per update.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-6, 2e-6)}


class SignSGD(torch.optim.Optimizer):
    """A minimal third-party optimizer: w <- w - lr * sign(g), with a per-param counter in its state."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["count"] = 0
                state["count"] += 1
                p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


INNER = [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), "sgd_momentum"),
    (lambda ps: torch.optim.Adam(ps, lr=0.01), "adam"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True), "adamw_foreach"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False), "adamw_loop"),
    (lambda ps: torch.optim.RMSprop(ps, lr=0.01), "rmsprop"),
    (lambda ps: torch.optim.Adagrad(ps, lr=0.05), "adagrad"),
    (lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=3), "lbfgs"),
    (lambda ps: SignSGD(ps, lr=0.01), "custom"),
]

DECAYS = [
    (dict(decay=0.9), "const"),
    (dict(decay=schedules.warmup(max_decay=0.99, power=0.75)), "warmup"),
    (dict(decay=0.8, bias_correction=True), "bias_corr"),
    (dict(decay=schedules.linear(0.5, 0.95, 4), bias_correction=True), "sched_bias_corr"),
    (dict(decay=0.7, update_after_step=3, update_every=2), "after_every"),
]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model.to(dtype)


def run_and_check(make_inner, ema_kwargs, dtype, steps=8, closure=False):
    model = make_model(dtype)
    opt = EMAOptimizer(make_inner(list(model.parameters())), **ema_kwargs)
    params = list(model.parameters())
    torch.manual_seed(1)
    data = [(torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)) for _ in range(steps)]
    initial, history, shadows = None, [], []
    for x, y in data:

        def loss_fn(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            return loss

        if initial is None:
            initial = [p.detach().double().clone() for p in params]
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        history.append([p.detach().double().clone() for p in params])
        shadows.append([opt.state[p]["ema"].double().clone() for p in params])

    for i in range(len(params)):
        ref = reference_shadows(initial[i], [h[i] for h in history], **ema_kwargs)
        for n in range(steps):
            atol, rtol = TOL[dtype]
            torch.testing.assert_close(
                shadows[n][i], ref[n], atol=atol, rtol=rtol, msg=f"param {i} step {n + 1}"
            )
    # the shadows moved away from the weights (the check is not vacuous)
    assert any(not torch.equal(opt.state[p]["ema"].double(), p.double()) for p in params)
    return model, opt


@pytest.mark.parametrize("make_inner", [f for f, _ in INNER], ids=[i for _, i in INNER])
@pytest.mark.parametrize("ema_kwargs", [k for k, _ in DECAYS], ids=[i for _, i in DECAYS])
def test_matches_reference_float64(make_inner, ema_kwargs):
    closure = make_inner is INNER[6][0]  # LBFGS needs a closure
    run_and_check(make_inner, ema_kwargs, torch.float64, closure=closure)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make_inner", [INNER[0][0], INNER[3][0], INNER[6][0]], ids=["sgd", "adamw", "lbfgs"])
@pytest.mark.parametrize("ema_kwargs", [k for k, _ in DECAYS], ids=[i for _, i in DECAYS])
def test_matches_reference_low_precision(make_inner, ema_kwargs, dtype):
    model, opt = run_and_check(make_inner, ema_kwargs, dtype, closure=make_inner is INNER[6][0])
    for p in model.parameters():
        assert opt.state[p]["ema"].dtype == torch.float32


def test_bf16_slow_decay_tracks_reference_and_does_not_stall():
    # decay 0.9999 over 1,000 steps: each update moves the EMA by ~1e-4 of the gap, far below
    # a bf16 ulp; a bf16 shadow would never move. The fp32 shadow must follow the fp64 reference.
    w = torch.nn.Parameter(torch.zeros(256, dtype=torch.bfloat16))
    opt = EMAOptimizer(torch.optim.SGD([w], lr=1.0 / 1024), decay=0.9999)
    initial, history = w.detach().double().clone(), []
    for _ in range(1000):
        w.grad = -torch.ones_like(w)
        opt.step()
        history.append(w.detach().double().clone())
    ref = reference_shadows(initial, history, 0.9999)[-1]
    shadow = opt.state[w]["ema"].double()
    assert ref.min() > 0.01  # the reference moved (a bf16 shadow would stay at 0)
    torch.testing.assert_close(shadow, ref, atol=1e-6, rtol=1e-5)


def test_shadows_start_from_weights_at_first_step_not_at_construction():
    model = make_model(torch.float64)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    with torch.no_grad():  # e.g. a checkpoint loaded into the model after building the optimizer
        for p in model.parameters():
            p.fill_(3.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # w: 3 -> 2.9, ema = 0.5 * 3 + 0.5 * 2.9
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["ema"], torch.full_like(p, 2.95), rtol=0, atol=1e-12)


def test_frozen_params_are_averaged_and_ema_false_groups_are_not():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    skipped = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    counter = torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    inner = torch.optim.SGD([{"params": [a, frozen, counter]}, {"params": [skipped], "ema": False}], lr=1.0)
    opt = EMAOptimizer(inner, decay=0.5)
    for _ in range(2):
        a.grad, skipped.grad = -torch.ones(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)
        with torch.no_grad():
            frozen.add_(4.0)  # changed outside the optimizer, e.g. by a schedule of its own
        opt.step()
    # a: 0 -> 1 -> 2, ema 0.5 -> 1.25; frozen: 4 at the first step (the start), then 8: ema 4 -> 6
    assert torch.equal(opt.state[a]["ema"], torch.full((3,), 1.25, dtype=torch.float64))
    assert torch.equal(opt.state[frozen]["ema"], torch.full((3,), 6.0, dtype=torch.float64))
    assert "ema" not in opt.state[skipped] and "ema" not in opt.state[counter]
    with opt.swap_ema_weights():
        assert torch.equal(skipped.detach(), torch.full((3,), 2.0, dtype=torch.float64))
        assert torch.equal(a.detach(), torch.full((3,), 1.25, dtype=torch.float64))


def test_add_param_group_gets_shadows_at_next_step_and_shares_counters():
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.full((2,), 10.0, dtype=torch.float64))
    opt = EMAOptimizer(torch.optim.SGD([a], lr=1.0), decay=schedules.polyak(), update_after_step=1)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": [b]})
            assert "ema" not in opt.state[b]
            with torch.no_grad():
                b.fill_(20.0)  # the shadow starts from the weights at the next step()
        a.grad = -torch.ones(2, dtype=torch.float64)
        b.grad = -torch.ones(2, dtype=torch.float64)
        opt.step()
    # steps 1..4: a = 1, 2, 3, 4; step 1 copies, then polyak over t = 0, 1, 2 -> mean(2, 3, 4) = 3.
    assert torch.equal(opt.state[a]["ema"], torch.full((2,), 3.0, dtype=torch.float64))
    # b joins at step 3 (weights 20 -> 21, then 22); t = 1 there: ema = (1/2) * 20 + (1/2) * 21,
    # then t = 2: (2/3) * 20.5 + (1/3) * 22 = 21.
    torch.testing.assert_close(opt.state[b]["ema"], torch.full((2,), 21.0, dtype=torch.float64))


def test_param_without_grads_at_first_then_with_grads_works_with_adam():
    # Adam creates its state when len(state) == 0: a shadow alone must not hide that.
    a = torch.nn.Parameter(torch.ones(3))
    late = torch.nn.Parameter(torch.ones(3))
    ref_late = torch.nn.Parameter(torch.ones(3))
    opt = EMAOptimizer(torch.optim.Adam([a, late], lr=0.1), decay=0.9)
    ref = torch.optim.Adam([ref_late], lr=0.1)
    for step in range(4):
        a.grad = torch.ones(3)
        if step >= 2:
            late.grad = torch.full((3,), 0.5)
            ref_late.grad = torch.full((3,), 0.5)
            ref.step()
        opt.step()
    assert torch.equal(late.detach(), ref_late.detach())
    assert set(opt.state[late]) == {"step", "exp_avg", "exp_avg_sq", "ema"}


def test_ema_dtype_and_default_shadow_dtypes():
    p32 = torch.nn.Parameter(torch.randn(4))
    p16 = torch.nn.Parameter(torch.randn(4).half())
    pbf = torch.nn.Parameter(torch.randn(4).bfloat16())
    opt = EMAOptimizer(torch.optim.SGD([p32, p16, pbf], lr=0.1), decay=0.9)
    for p in (p32, p16, pbf):
        p.grad = torch.ones_like(p)
    opt.step()
    assert [opt.state[p]["ema"].dtype for p in (p32, p16, pbf)] == [torch.float32] * 3
    opt64 = EMAOptimizer(torch.optim.SGD([p32], lr=0.1), decay=0.9, ema_dtype=torch.float64)
    opt64.step()
    assert opt64.state[p32]["ema"].dtype == torch.float64


def test_decay_edges():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    copy = EMAOptimizer(torch.optim.SGD([w], lr=1.0), decay=0.0)
    w.grad = -torch.ones(2, dtype=torch.float64)
    copy.step()
    assert torch.equal(copy.state[w]["ema"], w.detach())
    v = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    frozen = EMAOptimizer(torch.optim.SGD([v], lr=1.0), decay=1.0)
    for _ in range(3):
        v.grad = -torch.ones(2, dtype=torch.float64)
        frozen.step()
    assert torch.equal(frozen.state[v]["ema"], torch.zeros(2, dtype=torch.float64))
    # decay 1 with bias correction is 0/0: the limit (b -> 1) is the arithmetic mean.
    u = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    mean = EMAOptimizer(torch.optim.SGD([u], lr=1.0), decay=1.0, bias_correction=True)
    for _ in range(3):
        u.grad = -torch.ones(2, dtype=torch.float64)
        mean.step()
    assert torch.equal(mean.state[u]["ema"], torch.full((2,), 2.0, dtype=torch.float64))


def test_optimizer_surface_is_shared_with_inner():
    model = make_model(torch.float32)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = EMAOptimizer(inner, decay=0.9)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert calls == ["pre", "post"]
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    plateau.step(1.0)
    plateau.step(2.0)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_returns_closure_loss():
    model = make_model(torch.float32)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 4)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("decay", [0.9, schedules.warmup(0.99)], ids=["const", "warmup"])
def test_low_precision_params_of_every_size_go_through_the_cast_scratch_exactly(dtype, decay):
    # Sizes around the scratch (4,096 elements here): packed batches, a param that fills a
    # batch alone, params larger than the scratch (split in pieces), a large non-contiguous one.
    torch.manual_seed(0)
    shapes = [(10,), (3000,), (2000,), (70, 300), (1,), (40000,)]
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(300, 90).to(dtype).t()))  # non-contiguous, large
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.05), decay=decay)
    initial, history = [p.detach().double().clone() for p in params], []
    for _ in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        history.append([p.detach().double().clone() for p in params])
    groups = opt._rt.layout.groups
    plan = groups[0].casts
    assert plan is not None and len(plan.large) == 3 and len(plan.batches) >= 2  # all paths are used
    for i, p in enumerate(params):
        ref = reference_shadows(initial[i], [h[i] for h in history], decay)[-1]
        assert opt.state[p]["ema"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["ema"].double(), ref, atol=2e-6, rtol=2e-6)
