"""Cases a review found: state_dict() inside the swap touches nothing, a load whose warning is
raised as an error changes nothing, buffer shadows follow when their group leaves the EMA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from ema_optim import EMAOptimizer, posthoc, schedules


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2 = torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(16, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def make(groups=None, **kwargs):
    torch.manual_seed(0)
    model = Net()
    params = groups(model) if groups else model.parameters()
    return model, EMAOptimizer(torch.optim.Adam(params, lr=0.1), buffers=model, **kwargs)


@pytest.mark.parametrize("ema_dtype", [None, torch.float64, torch.bfloat16], ids=["exchange", "copy", "bf16"])
def test_state_dict_inside_the_swap_leaves_the_block_s_changes_alone(ema_dtype):
    model, opt = make(decay=(0.9, schedules.power(gamma=2.0)), ema_dtype=ema_dtype)
    train(model, opt, 3)
    outside = copy.deepcopy(opt.state_dict())
    with opt.swap_ema_weights(1):
        with torch.no_grad():
            model.l1.weight.fill_(3.0)  # an edit inside the block
        inside = opt.state_dict()
        snap = posthoc.snapshot(opt, model)
        assert torch.all(model.l1.weight == 3.0)  # state_dict() and snapshot() did not undo it
        model.double()  # a conversion inside the block
        opt.state_dict()
        assert model.l1.weight.dtype == torch.float64 and model.bn.running_mean.dtype == torch.float64
    edited = (0, "ema_1")  # l1.weight's swapped shadow: the block's edit is its EMA now
    for i, s in outside["state"].items():
        for key, value in s.items():
            if key.startswith("ema") and (i, key) != edited:
                assert torch.equal(inside["state"][i][key], value), (i, key)
    assert torch.equal(snap["shadows"][0]["bn.running_mean"], outside["state"][0]["ema_1:bn.running_mean"])


def test_a_load_whose_warning_is_an_error_changes_nothing():
    model, opt = make(decay=0.9)
    train(model, opt, 3)
    torch.manual_seed(0)
    other = Net()
    plain = EMAOptimizer(torch.optim.Adam(other.parameters(), lr=0.1), decay=0.9)  # no buffers=
    train(other, plain, 5)
    before = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="without buffer shadows"):
            opt.load_state_dict(plain.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, s in before["state"].items():
        assert s.keys() == after["state"][i].keys()
        assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items() if torch.is_tensor(v))


def test_buffer_shadows_follow_when_their_group_leaves_the_ema():
    def groups(m):
        return [
            {"params": list(m.l1.parameters())},
            {"params": list(m.bn.parameters()) + list(m.l2.parameters())},
        ]

    model, opt = make(groups, decay=0.9)
    train(model, opt, 3)
    before = opt.state[model.l1.weight]["ema:bn.running_mean"].clone()
    opt.param_groups[0]["ema"] = False  # the group that held the buffer shadows
    train(model, opt, 1)
    sd = opt.state_dict()
    holders = [i for i, s in sd["state"].items() if "ema:bn.running_mean" in s]
    assert holders == [2]  # moved, not made anew beside the old ones
    expected = 0.9 * before.double() + 0.1 * model.bn.running_mean.double()
    torch.testing.assert_close(sd["state"][2]["ema:bn.running_mean"].double(), expected)
