"""GradScaler skips, and no host read of a tensor value added by the wrapper."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ema_optim import EMAOptimizer, schedules

from .reference import reference_shadows


def _scaled_steps(make_inner, inf_at, dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(dtype)
    opt = EMAOptimizer(make_inner(model.parameters()), decay=0.8)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    params = list(model.parameters())
    initial, history = None, []
    for step in range(5):
        loss = model(torch.randn(8, 4).to(dtype)).float().pow(2).sum()
        scaler.scale(loss).backward()
        if step == inf_at:
            params[0].grad[0, 0] = float("inf")
        if initial is None:
            initial = [p.detach().double().clone() for p in params]
        before = (
            [p.detach().clone() for p in params],
            [opt.state[p]["ema"].clone() for p in params if "ema" in opt.state[p]],
        )
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == inf_at:
            assert all(torch.equal(a, b) for a, b in zip(before[0], params)), "weights changed on an inf step"
            assert all(torch.equal(a, opt.state[p]["ema"]) for a, p in zip(before[1], params)), (
                "shadows changed"
            )
        else:
            history.append([p.detach().double().clone() for p in params])
    return params, opt, initial, history


@pytest.mark.parametrize(
    "make_inner",
    [lambda ps: torch.optim.AdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)],
    ids=["adamw_foreach(scaler skips the step)", "adamw_fused(skip known on device only)"],
)
def test_grad_scaler_inf_step_changes_neither_weights_nor_shadows(make_inner):
    params, opt, initial, history = _scaled_steps(make_inner, inf_at=2)
    fused = opt._step_supports_amp_scaling
    assert fused == bool(getattr(opt.optimizer, "_step_supports_amp_scaling", False))
    if not fused:  # the skipped step never reached the optimizer: the reference is 4 plain steps
        for i, p in enumerate(params):
            ref = reference_shadows(initial[i], [h[i] for h in history], 0.8)[-1]
            torch.testing.assert_close(opt.state[p]["ema"].double(), ref, atol=2e-6, rtol=2e-6)
    else:  # the step ran with weight zero; the other steps are ordinary EMA updates
        assert opt._rt.counters.steps == 5
        for i, p in enumerate(params):
            ref = reference_shadows(initial[i], [h[i] for h in history], 0.8)[-1]
            torch.testing.assert_close(opt.state[p]["ema"].double(), ref, atol=2e-6, rtol=2e-6)


def test_grad_scaler_with_fused_inner_and_bf16_params():
    # the device-side skip on the mixed-dtype (cast scratch) path
    make = lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True)  # noqa: E731
    params, opt, initial, history = _scaled_steps(make, inf_at=1, dtype=torch.bfloat16)
    for i, p in enumerate(params):
        assert opt.state[p]["ema"].dtype == torch.float32
        ref = reference_shadows(initial[i], [h[i] for h in history], 0.8)[-1]
        torch.testing.assert_close(opt.state[p]["ema"].double(), ref, atol=2e-6, rtol=2e-6)


def test_wrapper_mirrors_inner_amp_flag():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert EMAOptimizer(torch.optim.AdamW(p, fused=True))._step_supports_amp_scaling
    assert not EMAOptimizer(torch.optim.SGD(p, lr=0.1))._step_supports_amp_scaling


# Ops that read a tensor's value on the host: on CUDA each is a device sync.
HOST_READS = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "nonzero",
    "equal",
    "masked_select",
    "unique",
    "_unique2",
}


class HostReadSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.hits[name] += 1
        return func(*args, **(kwargs or {}))


def _count_host_reads(wrap, decay, inner, steps=4, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = inner(model.parameters())
    if wrap:
        opt = EMAOptimizer(opt, decay=decay, **kwargs)
    spy = HostReadSpy()
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        with spy:
            opt.step()
        opt.zero_grad()
    return spy.hits


INNERS = [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "sgd"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True), "adamw_foreach"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False), "adamw_loop"),
]


@pytest.mark.parametrize("inner", [f for f, _ in INNERS], ids=[i for _, i in INNERS])
@pytest.mark.parametrize(
    "decay,kwargs",
    [
        (0.99, {}),
        (schedules.warmup(), {}),
        (schedules.polyak(), dict(bias_correction=True, update_after_step=1)),
    ],
    ids=["float", "warmup", "polyak_bias_corrected"],
)
def test_step_adds_no_host_read(inner, decay, kwargs):
    alone = _count_host_reads(False, decay, inner)
    wrapped = _count_host_reads(True, decay, inner, **kwargs)
    assert wrapped == alone  # non-capturable AdamW reads its CPU step counters; the EMA adds nothing


def test_spy_catches_a_host_read():
    # the check above is not vacuous: the spy sees the sync that a 0-dim weight in the
    # Scalar overload of _foreach_lerp_ would cause
    spy = HostReadSpy()
    a, b = [torch.zeros(3)], [torch.ones(3)]
    with spy:
        torch._foreach_lerp_(a, b, torch.tensor(0.5))
    assert spy.hits["_local_scalar_dense"] == 1


@pytest.mark.parametrize("decay", [0.99, schedules.warmup()], ids=["float", "warmup"])
def test_step_on_fake_cuda_tensors_reads_nothing_on_the_host(decay):
    # A CPU-only build can still run the step on fake "cuda" tensors: every kernel the
    # wrapper launches there (fp32 and bf16-with-fp32-shadow groups) must be sync-free.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = [
            torch.nn.Parameter(torch.empty(4, 4, device="cuda")),
            torch.nn.Parameter(torch.empty(8, device="cuda", dtype=torch.bfloat16)),
        ]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = EMAOptimizer(
            torch.optim.AdamW(params, lr=0.1, capturable=True, foreach=True), decay=decay, update_after_step=1
        )
        spy = HostReadSpy()
        with spy:
            for _ in range(3):
                opt.step()
        assert not spy.hits
        assert opt.state[params[1]]["ema"].dtype == torch.float32
        assert opt.state[params[1]]["ema"].device.type == "cuda"
