"""swap_ema_weights: which shadow an index names, what a failed undo raises, and groups that
leave the EMA between steps."""

from __future__ import annotations

import pytest
import torch

from ema_optim import EMAOptimizer

DECAYS = (0.9, 0.5, 0.99)


def make(decay=DECAYS, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return model, EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=decay, **kwargs)


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 3, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def everything(model, opt) -> list[torch.Tensor]:
    """The params and every state tensor, as copies."""
    out = [p.detach().clone() for p in model.parameters()]
    return out + [v.clone() for p in model.parameters() for v in opt.state[p].values()]


# ---------------------------------------------------------------------------- the index


@pytest.mark.parametrize("index, shadow", [(-1, "ema_2"), (-2, "ema_1"), (-3, "ema"), (2, "ema_2")])
def test_negative_index_counts_from_the_end(index, shadow):
    model, opt = make()
    train(model, opt, 3)
    expected = [opt.state[p][shadow].clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    with opt.swap_ema_weights(index):
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("index", [-4, 3, 100, -100])
def test_index_outside_minus_n_to_n_minus_1_is_refused_and_changes_nothing(index):
    model, opt = make()
    train(model, opt, 3)
    before = everything(model, opt)
    with pytest.raises(IndexError, match=r"index must be in \[-3, 2\]"):
        with opt.swap_ema_weights(index):
            pass  # pragma: no cover
    assert all(torch.equal(a, b) for a, b in zip(everything(model, opt), before))
    with opt.swap_ema_weights(0):  # no swap left half-open
        pass
