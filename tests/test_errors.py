"""Every bad input in SPEC.md gives its error, and leaves everything as it was."""

from __future__ import annotations

import math

import pytest
import torch

from ema_optim import EMAOptimizer, schedules


def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


CONSTRUCTOR_ERRORS = [
    (dict(optimizer=None), TypeError, "torch.optim.Optimizer"),
    (dict(optimizer=torch.nn.Linear(2, 2)), TypeError, "torch.optim.Optimizer"),
    (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\], got 1.5"),
    (dict(decay=-0.1), ValueError, r"\[0, 1\]"),
    (dict(decay=math.nan), ValueError, r"\[0, 1\]"),
    (dict(decay="0.9"), TypeError, "decay must be a float"),
    (dict(decay=torch.tensor(0.9)), TypeError, "decay must be a float"),
    (dict(decay=True), TypeError, "decay must be a float"),
    (dict(update_after_step=-1), ValueError, "update_after_step must be >= 0"),
    (dict(update_after_step=1.5), TypeError, "update_after_step must be an int"),
    (dict(update_every=0), ValueError, "update_every must be >= 1"),
    (dict(update_every=2.0), TypeError, "update_every must be an int"),
    (dict(bias_correction="yes"), TypeError, "bias_correction"),
    (dict(ema_dtype=torch.int32), TypeError, "ema_dtype"),
    (dict(ema_dtype="float32"), TypeError, "ema_dtype"),
]


@pytest.mark.parametrize(
    "kwargs,exc,match", CONSTRUCTOR_ERRORS, ids=[str(k) for k, _, _ in CONSTRUCTOR_ERRORS]
)
def test_constructor_errors(kwargs, exc, match):
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer", None) if "optimizer" in kwargs else sgd()
    with pytest.raises(exc, match=match):
        EMAOptimizer(optimizer, **kwargs)


def test_wrapping_twice_is_refused():
    with pytest.raises(TypeError, match="already an EMAOptimizer"):
        EMAOptimizer(EMAOptimizer(sgd()))


SCHEDULE_ERRORS = [
    (lambda: schedules.warmup(power=0), ValueError),
    (lambda: schedules.warmup(power=-1), ValueError),
    (lambda: schedules.warmup(inv_gamma=0), ValueError),
    (lambda: schedules.warmup(max_decay=1.5), ValueError),
    (lambda: schedules.warmup(min_decay=0.5, max_decay=0.4), ValueError),
    (lambda: schedules.half_life(0), ValueError),
    (lambda: schedules.half_life(-3), ValueError),
    (lambda: schedules.linear(0.5, 0.9, 0), ValueError),
    (lambda: schedules.linear(-0.5, 0.9, 10), ValueError),
    (lambda: schedules.cosine(0.5, 1.9, 10), ValueError),
    (lambda: schedules.cosine(0.5, 0.9, 0), ValueError),
    (lambda: schedules.linear(0.5, math.nan, 3), ValueError),
    (lambda: schedules.linear(0.5, 0.9, 2.5), TypeError),
    # ints beyond float64 (float() raises OverflowError): out of range all the same
    (lambda: schedules.half_life(10**400), ValueError),
    (lambda: schedules.warmup(power=10**400), ValueError),
    (lambda: schedules.warmup(inv_gamma=-(10**400)), ValueError),
    (lambda: schedules.linear(0.5, 10**400, 3), ValueError),
]


@pytest.mark.parametrize("build,exc", SCHEDULE_ERRORS)
def test_schedule_argument_errors(build, exc):
    with pytest.raises(exc):
        build()


@pytest.mark.parametrize("bad", [1.5, -0.01, math.nan, "x"])
def test_schedule_value_outside_range_changes_nothing(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    values = {0: 0.5, 1: 0.5, 2: bad}
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), decay=lambda t: values[t])
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    model(torch.randn(4, 3)).sum().backward()
    before = (
        [p.detach().clone() for p in model.parameters()],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        opt._rt.counters,
    )
    with pytest.raises((ValueError, TypeError), match="decay schedule"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    for saved, p in zip(before[1], model.parameters()):
        assert all(torch.equal(v, opt.state[p][k]) for k, v in saved.items())
    assert before[2] == opt._rt.counters


def test_failing_inner_step_changes_no_shadow_or_counter():
    model = torch.nn.Linear(3, 2)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)

    def closure():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(closure)
    assert all("ema" not in opt.state[p] for p in model.parameters())
    assert opt._rt.counters.steps == 0


def test_load_state_dict_of_wrong_type():
    opt = EMAOptimizer(sgd())
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        opt.load_state_dict([1, 2])


def test_schedules_take_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert schedules.warmup(max_decay=np.float32(0.5))(10**6) == pytest.approx(0.5)
    assert schedules.half_life(np.int64(10))(0) == pytest.approx(0.5**0.1)
    assert schedules.linear(0.5, 0.9, np.int64(4))(4) == pytest.approx(0.9)
