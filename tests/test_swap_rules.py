"""swap_ema_weights: which shadow an index names, what a failed undo raises, and groups that
leave the EMA between steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ema_optim import EMAOptimizer, _swap
from tests.reference import reference_shadows

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


@pytest.mark.parametrize(
    "index", [np.int64(1), np.int32(-2), torch.tensor(1), torch.tensor(-2, dtype=torch.int8)], ids=repr
)
def test_any_integer_that_operator_index_takes_names_a_shadow(index):
    """As for a sequence: numpy ints (np.argmin of validation losses) and integer 0-dim tensors."""
    model, opt = make()
    train(model, opt, 3)
    expected = [opt.state[p]["ema_1"].clone() for p in model.parameters()]
    with opt.swap_ema_weights(index):
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))


@pytest.mark.parametrize(
    "index", [True, 1.0, np.float64(1), torch.tensor(1.0), torch.tensor(True), "1"], ids=repr
)
def test_an_index_that_is_not_an_integer_is_refused_and_changes_nothing(index):
    model, opt = make()
    train(model, opt, 3)
    before = everything(model, opt)
    with pytest.raises(TypeError, match="index must be an int"):
        with opt.swap_ema_weights(index):
            pass  # pragma: no cover
    assert all(torch.equal(a, b) for a, b in zip(everything(model, opt), before))


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


# ---------------------------------------------------------------------------- a failed undo


class Undo:
    """A record whose undo succeeds, or fails with its own error."""

    def __init__(self, log: list, name: str, fails: bool = False) -> None:
        self.log, self.name, self.fails = log, name, fails

    def undo(self) -> None:
        self.log.append(self.name)
        if self.fails:
            raise RuntimeError(f"undo of {self.name} failed")


def test_swap_out_undoes_everything_then_raises_the_first_failure():
    log: list = []
    records = [Undo(log, "a"), Undo(log, "b", fails=True), Undo(log, "c"), Undo(log, "d", fails=True)]
    with pytest.raises(RuntimeError, match="undo of d failed") as err:  # last first: d fails first
        _swap.swap_out(records)
    assert log == ["d", "c", "b", "a"]  # every record was undone, also after the failures
    assert "undo of b" not in str(err.value)


# ---------------------------------------------------------------------------- a group leaves the EMA


def two_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    return model, EMAOptimizer(torch.optim.SGD(groups, lr=0.1), decay=DECAYS)


def test_a_group_turned_out_of_the_ema_between_steps():
    """SPEC: a group with "ema": False has no shadows and swapping leaves its params alone.
    Turned off after some steps: its shadows stop (kept as they were), the others go on under
    the shared counters."""
    model, opt = two_groups()
    kept, left = list(model[0].parameters()), list(model[2].parameters())
    initial = [p.detach().double().clone() for p in kept]
    history = []
    for n in range(6):
        if n == 3:
            frozen = {
                (i, k): opt.state[p][k].clone() for i, p in enumerate(left) for k in ("ema", "ema_1", "ema_2")
            }
            opt.param_groups[1]["ema"] = False
        train(model, opt, 1, seed=n)
        history.append([p.detach().double().clone() for p in kept])

    for i, p in enumerate(left):  # stopped, bit for bit
        assert all(torch.equal(opt.state[p][k], frozen[(i, k)]) for k in ("ema", "ema_1", "ema_2"))
    for i, p in enumerate(kept):  # the others: the float64 reference over all six steps
        for name, decay in zip(("ema", "ema_1", "ema_2"), DECAYS):
            ref = reference_shadows(initial[i], [h[i] for h in history], decay)[-1]
            torch.testing.assert_close(opt.state[p][name].double(), ref, atol=1e-6, rtol=1e-6)

    training = [p.detach().clone() for p in model.parameters()]
    for index, name in enumerate(("ema", "ema_1", "ema_2")):
        averages = [opt.state[p][name].clone() for p in kept]
        with opt.swap_ema_weights(index):
            assert all(torch.equal(p, a) for p, a in zip(kept, averages))
            assert all(torch.equal(p, t) for p, t in zip(model[2].parameters(), training[2:]))
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))

    for group in opt.state_dict()["param_groups"]:  # one set of counters, advanced by every step
        assert (group["ema_steps"], group["ema_updates"]) == (6, 6)


def test_resume_keeps_the_stopped_shadows_of_a_group_out_of_the_ema():
    """SPEC "Resume is exact": the stopped shadows are state like any other; once the group is
    back in the EMA, the uninterrupted run goes on from them."""
    model, opt = two_groups()
    train(model, opt, 3, seed=0)
    opt.param_groups[1]["ema"] = False
    train(model, opt, 2, seed=1)
    sd = opt.state_dict()
    model2, opt2 = two_groups()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    for p, q in zip(model[2].parameters(), model2[2].parameters()):
        for k in ("ema", "ema_1", "ema_2"):
            assert k in opt2.state[q] and torch.equal(opt2.state[q][k], opt.state[p][k])
