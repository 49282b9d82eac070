"""Error messages that tell what to do: following the hint once must be enough."""

from __future__ import annotations

import re

import pytest
import torch

from ema_optim import EMAOptimizer


def hint(message: str) -> str:
    """The code between backticks that the message tells to run."""
    found = re.findall(r"`([^`]+)`", message)
    assert found, f"no code to run in: {message}"
    return found[-1]


def make(buffers: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = EMAOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        decay=(0.9, 0.5, 0.2),
        buffers=model if buffers else None,
    )
    model(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_stale_param_shadows_are_dropped_in_one_round():
    model, opt = make()
    p = model[0].weight
    p.data = torch.randn(5, 3)  # a new shape: every shadow of p is stale
    with pytest.raises(ValueError, match=r"param 0 of param group 0 \(shape \(5, 3\)\)") as err:
        opt.step()
    exec(hint(str(err.value)), {"opt": opt, "p": p})
    opt.step()  # one round was enough
    for k in ("ema", "ema_1", "ema_2"):  # restarted from the current weights
        assert torch.equal(opt.state[p][k], p.detach())
    assert opt.state[model[0].bias]["ema"].shape == (4,)  # other params keep theirs


def test_stale_buffer_shadows_are_dropped_in_one_round():
    model, opt = make(buffers=True)
    model[1].running_mean = torch.arange(5.0)  # replaced by name with another shape
    with pytest.raises(ValueError, match=r"averaged buffer '1\.running_mean' now has shape \(5,\)") as err:
        opt.step()
    exec(hint(str(err.value)), {"opt": opt})
    opt.step()
    held = opt.state[opt.param_groups[0]["params"][0]]
    for k in ("ema", "ema_1", "ema_2"):
        assert torch.equal(held[f"{k}:1.running_mean"], torch.arange(5.0))
        assert held[f"{k}:1.running_var"].shape == (4,)  # the other buffer keeps its shadows
