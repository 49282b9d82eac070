"""schedules.scaled: the EMA scaling rule of Busbridge et al. (2023), decay -> decay ** kappa.

The references are the rule's own statement (one update of the kappa-times larger batch
forgets what kappa updates of the base batch forgot: products of decays over the same
data) and the float64 update rule of tests/reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from ema_optim import EMAOptimizer, schedules

from .reference import reference_shadows


@pytest.mark.parametrize("decay,kappa", [(0.999, 4), (0.9, 1), (0.99, 0.5), (0.0, 3), (1.0, 2.5)])
def test_constant_gives_the_constant_power(decay, kappa):
    got = schedules.scaled(decay, kappa)
    assert isinstance(got, float)  # still a constant: the optimizer records it
    assert got == decay**kappa


# (schedule, tolerance): the rule is exact for a constant and a discretisation of it where the
# decay moves (warmup's fast start costs a few percent)
SCHEDULES = {
    "cosine": (schedules.cosine(0.99, 0.9999, steps=4000), 0.005),
    "linear": (schedules.linear(0.9, 0.999, steps=1000), 0.01),
    "warmup": (schedules.warmup(0.9999, power=3 / 4), 0.05),
    "half_life": (schedules.half_life(300), 1e-9),
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kappa", [2, 8])
def test_schedule_forgets_over_the_same_data_what_the_base_run_forgot(name, kappa):
    """log prod(decays) over scaled updates 1..n-1 matches that over base updates kappa..kappa*n-1,
    the same data (update 0 is left out: warmup starts at decay 0)."""
    base, tol = SCHEDULES[name]
    n = 500
    expected = sum(math.log(base(t)) for t in range(kappa, kappa * n))
    got = sum(math.log(schedules.scaled(base, kappa)(t)) for t in range(1, n))
    assert abs(got - expected) <= tol * abs(expected), (got, expected)
    # reading the schedule at t instead of kappa * t would miss it by far: the test can fail
    misread = sum(kappa * math.log(base(t)) for t in range(1, n))
    if name != "half_life":
        assert abs(misread - expected) > 5 * abs(got - expected) + tol * abs(expected) / 2


def test_schedule_value_and_kappa_types():
    base = schedules.linear(0.5, 0.9, steps=8)
    assert schedules.scaled(base, 2)(3) == base(6) ** 2
    assert schedules.scaled(base, 0.5)(4) == base(2.0) ** 0.5  # a smaller batch: kappa < 1
    assert "scaled(" in schedules.scaled(base, 2).__qualname__


def test_optimizer_with_a_scaled_decay_follows_the_rule():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = EMAOptimizer(torch.optim.SGD([w], lr=0.3), decay=schedules.scaled(schedules.linear(0.5, 0.9, 4), 2))
    initial, weights = w.detach().clone(), []
    for _ in range(6):
        w.grad = torch.sin(w.detach())
        opt.step()
        weights.append(w.detach().clone())
    expected = reference_shadows(initial, weights, lambda t: (0.5 + min(2 * t / 4, 1) * 0.4) ** 2)[-1]
    torch.testing.assert_close(opt.state[w]["ema"], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0.99, 0), ValueError, "kappa must be a finite number > 0"),
        ((0.99, -2), ValueError, "kappa must be a finite number > 0"),
        ((0.99, float("inf")), ValueError, "kappa must be a finite number > 0"),
        ((0.99, float("nan")), ValueError, "kappa must not be NaN"),
        ((0.99, True), TypeError, "kappa must be a real number"),
        ((0.99, "4"), TypeError, "kappa must be a real number"),
        ((1.5, 2), ValueError, r"decay must be in \[0, 1\]"),
        (("0.9", 2), TypeError, "decay must be a real number"),
        ((schedules.power(gamma=7.0), 2), ValueError, "pass them unchanged"),
        ((schedules.polyak(), 2), ValueError, "pass them unchanged"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        schedules.scaled(*args)


def test_a_bad_value_of_the_schedule_is_refused_by_the_step_before_anything_changes():
    w = torch.nn.Parameter(torch.ones(2))
    opt = EMAOptimizer(
        torch.optim.SGD([w], lr=1.0), decay=schedules.scaled(lambda t: 0.5 if t < 2 else 1.5, 2)
    )
    w.grad = torch.ones(2)
    opt.step()  # t = 0 reads the base schedule at 0
    before = (w.detach().clone(), opt.state[w]["ema"].clone())
    with pytest.raises(ValueError, match=r"returned 1.5 at t=1"):
        opt.step()  # t = 1 reads it at 2: out of range
    assert torch.equal(w.detach(), before[0]) and torch.equal(opt.state[w]["ema"], before[1])
