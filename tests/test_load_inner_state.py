"""load_state_dict takes the inner state that torch's own optimizers take, and no more.

torch's test_optim ``test_load_nontensor_step``: a state dict whose ``step`` is a Python number
(as older torch versions saved it) loads into a stepped optimizer, which then steps as before.
The wrapper must accept it too, and its next step must match plain torch doing the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ema_optim import EMAOptimizer

# (optimizer class, kwargs): torch.optim optimizers whose per-param state holds a "step"
INNERS = [
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01}),
    (torch.optim.ASGD, {"lr": 0.01, "t0": 1}),
    (torch.optim.Adadelta, {}),
    (torch.optim.Adagrad, {"lr": 0.01}),
    (torch.optim.Adamax, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01}),
    (torch.optim.RAdam, {"lr": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01}),
    (torch.optim.Rprop, {"lr": 0.01}),
]
if hasattr(torch.optim, "Adafactor"):
    INNERS.append((torch.optim.Adafactor, {"lr": 0.01}))

# The one-number state entries that torch's optimizers turn back into tensors on load.
SCALAR_ENTRIES = ("step", "eta", "mu", "mu_product")


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(2, 3, generator=g)) for _ in range(2)]


def step(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], n: int) -> None:
    g = torch.Generator().manual_seed(100 + n)
    for p in ps:
        p.grad = torch.rand(p.shape, generator=g)
    opt.step()


def as_numbers(sd: dict, keys: tuple[str, ...]) -> dict:
    """A copy of ``sd`` with the one-element tensors under ``keys`` turned into Python floats."""
    sd = copy.deepcopy(sd)
    for entry in sd["state"].values():
        for k in keys:
            if k in entry and torch.is_tensor(entry[k]):
                entry[k] = entry[k].item()
    return sd


@pytest.mark.parametrize("keys", [("step",), SCALAR_ENTRIES], ids=["step", "all-scalars"])
@pytest.mark.parametrize("cls, kwargs", INNERS, ids=[cls.__name__ for cls, _ in INNERS])
def test_load_nontensor_step(cls, kwargs, keys):
    wrapped_ps, plain_ps, steady_ps = params(), params(), params()
    wrapped = EMAOptimizer(cls(wrapped_ps, **kwargs), decay=(0.9, 0.5))
    plain = cls(plain_ps, **kwargs)
    steady = EMAOptimizer(cls(steady_ps, **kwargs), decay=(0.9, 0.5))  # never reloaded
    for n in range(3):
        for opt, ps in ((wrapped, wrapped_ps), (plain, plain_ps), (steady, steady_ps)):
            step(opt, ps, n)

    sd = as_numbers(wrapped.state_dict(), keys)
    assert any(isinstance(e.get("step"), float) for e in sd["state"].values())
    wrapped.load_state_dict(sd)
    plain.load_state_dict(as_numbers(plain.state_dict(), keys))
    for n in range(3, 5):
        for opt, ps in ((wrapped, wrapped_ps), (plain, plain_ps), (steady, steady_ps)):
            step(opt, ps, n)

    for p, q, r in zip(wrapped_ps, plain_ps, steady_ps):
        assert torch.equal(p, q) and torch.equal(p, r)
        for name in ("ema", "ema_1"):
            assert torch.equal(wrapped.state[p][name], steady.state[r][name])
    assert wrapped.state_dict()["param_groups"][0]["ema_steps"] == 5


@pytest.mark.parametrize("bad", ["3", None, [3.0], torch.ones(2)])
def test_a_step_that_is_not_a_number_is_still_refused(bad):
    ps = params()
    opt = EMAOptimizer(torch.optim.Adam(ps, lr=0.01), decay=0.9)
    step(opt, ps, 0)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = bad
    before = [opt.state[p]["step"].clone() for p in ps]
    with pytest.raises(ValueError, match=r"state\[0\]\['step'\] must be a number or a one-element tensor"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[p]["step"], b) for p, b in zip(ps, before))


# ---------------------------------------------------------------- inner keys that look like shadows


class SGDWithOwnAverage(torch.optim.SGD):
    """An inner optimizer that keeps state entries named like shadows but not shadows:
    ``"ema_0"`` (its own running mean of the weights) and ``"ema_01"`` (a count)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "ema_0" not in state:
                    state["ema_0"], state["ema_01"] = torch.zeros_like(p), torch.zeros(())
                state["ema_01"] += 1
                state["ema_0"].lerp_(p, 1 / state["ema_01"])
        return loss


def test_ema_0_and_ema_01_are_inner_state_not_shadows():
    from ema_optim import _shadows

    for name in ("ema_0", "ema_01", "ema_00", "ema_", "ema_x", "ema_0:bn.running_mean"):
        assert not _shadows.is_key(name) and not _shadows.is_param_key(name), name
    for name in ("ema", "ema_1", "ema_10", "ema:bn.running_mean", "ema_2:bn.running_mean"):
        assert _shadows.is_key(name), name

    ps = params()
    opt = EMAOptimizer(SGDWithOwnAverage(ps, lr=0.1), decay=(0.9, 0.5))
    for n in range(3):
        step(opt, ps, n)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"ema_0", "ema_01", "ema", "ema_1"}

    again = params(seed=1)
    fresh = EMAOptimizer(SGDWithOwnAverage(again, lr=0.1), decay=(0.9, 0.5))
    step(fresh, again, 0)
    fresh.load_state_dict(sd)
    for p, q in zip(ps, again):
        with torch.no_grad():
            q.copy_(p)
        for k in ("ema_0", "ema_01", "ema", "ema_1"):  # the inner entries went to the inner optimizer
            assert torch.equal(fresh.state[q][k], opt.state[p][k]), k
    with fresh.swap_ema_weights(1):  # the swap puts shadow 1 in, never "ema_0"
        assert all(torch.equal(q, opt.state[p]["ema_1"]) for p, q in zip(ps, again))
    for n in range(3, 5):  # and resumes exactly
        step(opt, ps, n)
        step(fresh, again, n)
    for p, q in zip(ps, again):
        assert torch.equal(p, q)
        assert all(
            torch.equal(fresh.state[q][k], opt.state[p][k]) for k in ("ema_0", "ema_01", "ema", "ema_1")
        )
