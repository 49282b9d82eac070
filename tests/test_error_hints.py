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


def anchor_index(sd: dict) -> int:
    return next(i for i, s in sd["state"].items() if "ema:1.running_var" in s)


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            torch.zeros(5),
            r"the shadow 'ema_1:1\.running_var' of the buffer '1\.running_var' has shape "
            r"\(5,\), the buffer has \(4,\)",
        ),
        (
            torch.zeros(4, dtype=torch.int64),
            r"the shadow 'ema_1:1\.running_var' of the buffer "
            r"'1\.running_var' must be a real floating tensor like the buffer, got a torch\.int64 tensor",
        ),
        (
            torch.zeros(4, device="meta"),
            r"the shadow 'ema_1:1\.running_var' of the buffer '1\.running_var' "
            r"is a meta tensor",
        ),
    ],
)
def test_a_bad_buffer_shadow_is_named_as_a_buffer_shadow(bad, match):
    model, opt = make(buffers=True)
    sd = opt.state_dict()
    sd["state"][anchor_index(sd)]["ema_1:1.running_var"] = bad
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(sd)
    assert "param" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in opt.state[model[0].weight].items())
