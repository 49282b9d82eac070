"""schedules.power: the formula, its arguments, and the shadow it gives inside EMAOptimizer."""

from __future__ import annotations

import math

import pytest
import torch

from ema_optim import EMAOptimizer, schedules


def test_formula_and_attributes():
    for d in (schedules.power(gamma=3.5), schedules.power(sigma_rel=0.1)):
        g = d.gamma
        assert d.sigma_rel == pytest.approx(math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), rel=1e-12)
        for t in (0, 1, 2, 7, 100, 10**6):
            assert d(t) == pytest.approx((t / (t + 1)) ** (g + 1), rel=1e-15, abs=0)
    assert schedules.power(sigma_rel=0.05).sigma_rel == 0.05
    assert schedules.power(sigma_rel=0.05).gamma == pytest.approx(16.972198602303443, rel=1e-14)
    assert schedules.power(gamma=7).gamma == 7.0


def test_gamma_zero_is_polyak():
    d, p = schedules.power(gamma=0), schedules.polyak()
    assert all(d(t) == p(t) for t in range(2000))
    assert d.sigma_rel == 12**-0.5
    assert schedules.power(sigma_rel=12**-0.5).gamma == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"gamma": 1.0, "sigma_rel": 0.1},
        {"gamma": -0.5},
        {"gamma": float("nan")},
        {"gamma": float("inf")},
        {"sigma_rel": 0.0},
        {"sigma_rel": -0.1},
        {"sigma_rel": 12**-0.5 + 1e-9},
        {"sigma_rel": 0.5},
        {"sigma_rel": float("nan")},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        schedules.power(**kwargs)


def test_sigma_rel_is_keyword_only():
    with pytest.raises(TypeError):
        schedules.power(None, 0.1)  # type: ignore[misc]


def _closed_form(weights: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """sum_s c_s w_s with c_s = (s^(g+1) - (s-1)^(g+1)) / k^(g+1), in float64."""
    k = len(weights)
    s = torch.arange(1, k + 1, dtype=torch.float64)
    c = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / k ** (gamma + 1)
    return sum(ci * w for ci, w in zip(c.tolist(), weights))


@pytest.mark.parametrize("update_every, update_after_step", [(100, 0), (100, 7), (1, 0)])
def test_shadow_is_the_profile_average(update_every, update_after_step):
    """The case ema-pytorch gets wrong: t counts EMA updates, so update_every needs no correction."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).double()
    opt = EMAOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        decay=schedules.power(sigma_rel=0.05),
        update_every=update_every,
        update_after_step=update_after_step,
    )
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    folded = []  # the weights at each EMA update
    steps = update_after_step + 30 * update_every
    for n in range(1, steps + 1):
        loss = torch.nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if n > update_after_step and (n - update_after_step) % update_every == 0:
            folded.append([p.detach().clone() for p in model.parameters()])
    gamma = opt.decay.gamma
    for i, p in enumerate(model.parameters()):
        expected = _closed_form([w[i] for w in folded], gamma)
        torch.testing.assert_close(opt.state[p]["ema"], expected, atol=1e-10, rtol=0)
    # the profile is not flat: the last fold carries a weight far from 1/30
    assert _closed_form([torch.ones(1)] * 29 + [torch.zeros(1)], gamma).item() < 0.6


def test_the_profile_is_a_value():
    """Its gamma cannot drift from its decay, and it pickles (closures do not)."""
    import copy
    import pickle

    d = schedules.power(sigma_rel=0.1)
    with pytest.raises(AttributeError):
        d.gamma = 3.0
    for twin in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert (twin.gamma, twin.sigma_rel) == (d.gamma, d.sigma_rel)
        assert [twin(t) for t in range(5)] == [d(t) for t in range(5)]
    assert "gamma=" in repr(d)


@pytest.mark.parametrize(
    "kwargs",
    [{"sigma_rel": 1e-200}, {"sigma_rel": 5e-324}, {"gamma": 1e200}, {"gamma": 1e101}, {"gamma": 1e308}],
)
def test_values_beyond_float64_are_a_value_error(kwargs):
    """Not an OverflowError from the arithmetic: a ValueError that says what the limit is."""
    with pytest.raises(ValueError, match="1e-100|1e\\+100"):
        schedules.power(**kwargs)


def test_the_extremes_that_are_allowed():
    for d in (schedules.power(gamma=1e100), schedules.power(sigma_rel=1e-100)):
        assert d.gamma == pytest.approx(1e100, rel=1e-12) and d.sigma_rel == pytest.approx(1e-100, rel=1e-12)
        assert d(0) == 0.0 and d(10**6) == 0.0  # the average is the latest weights


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 10**400}, r"^gamma .*float64"),
        ({"gamma": -(10**400)}, r"^gamma .*float64"),
        ({"sigma_rel": 10**400}, r"^sigma_rel .*float64"),
        ({"sigma_rel": -(10**400)}, r"^sigma_rel .*float64"),
    ],
)
def test_ints_beyond_float64_are_a_value_error(kwargs, match):
    """float() of such an int raises OverflowError: the value is out of range all the same."""
    with pytest.raises(ValueError, match=match):
        schedules.power(**kwargs)
