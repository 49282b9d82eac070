"""ema_state_dict under DDP and FSDP2 (CPU, gloo, 2 processes; harness of test_distributed.py).

FSDP2 all-gathers its own sharded parameters in its pre-forward hook, so a
``functional_call`` that replaces them would silently run the training weights: it must
raise instead, and the swap is the teacher recipe there. References: the float64 rule
(tests/reference.py) on the weights the ranks had, and an unsharded model loaded with the
gathered shadows.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from ema_optim import EMAOptimizer, ema_state_dict

from .test_distributed import (
    DECAY,
    batch,
    check_reference,
    fsdp2,
    full,
    full64,
    make_model,
    spawn,
    train_step,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def _worker(rank: int, world: int) -> None:
    _fsdp2(rank, world)
    _ddp(rank, world)


def _fsdp2(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    model = fsdp2(make_model(), world)
    params = list(model.parameters())
    opt = EMAOptimizer(torch.optim.AdamW(params, lr=0.05), decay=DECAY)
    initial, history = full64(params), []
    for step in range(3):
        train_step(model, opt, batch(step, rank))
        history.append(full64(params))

    # The averaged entries are the sharded shadows themselves.
    avg = ema_state_dict(opt, model)
    assert list(avg) == list(model.state_dict())
    for (name, p), value in zip(model.named_parameters(), avg.values()):
        assert isinstance(value, DTensor) and value is opt.state[p]["ema"], name

    # functional_call would run the live shards: it raises before the forward, nothing changed.
    x = batch(99, 0)
    before = [p.detach().to_local().clone() for p in params]
    shadows = [opt.state[p]["ema"].to_local().clone() for p in params]
    given = dict(avg)
    try:
        with torch.no_grad():
            functional_call(model, avg, (x,))
    except RuntimeError as e:
        assert "FSDP2" in str(e) and "swap_ema_weights" in str(e), e
    else:
        raise AssertionError("functional_call on an FSDP2 model with ema_state_dict() did not raise")
    assert all(avg[k] is v for k, v in given.items()), "functional_call wrote into the dict"
    for p, b, s in zip(params, before, shadows):
        assert isinstance(p, nn.Parameter) and torch.equal(p.detach().to_local(), b)
        assert torch.equal(opt.state[p]["ema"].to_local(), s)

    # The recipe: the swap around the teacher forward (exact), and an export of the gathered average.
    gathered = {k: full(v) for k, v in ema_state_dict(opt, model).items()}
    plain = make_model()
    plain.load_state_dict(gathered, strict=True)
    with torch.no_grad():
        expected = plain(x)
        with opt.swap_ema_weights():
            teacher = model(x)
    torch.testing.assert_close(teacher, expected, atol=1e-6, rtol=1e-6)

    # Training goes on; the shadows follow the rule.
    train_step(model, opt, batch(3, rank))
    history.append(full64(params))
    check_reference(opt, params, initial, history)


def _ddp(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=DECAY)
    for step in range(3):
        train_step(model, opt, batch(step, rank))
    x = batch(99, 0)
    avg = ema_state_dict(opt, model)  # keys "module.*", as the wrapper's state dict
    assert list(avg) == list(model.state_dict()) and all(k.startswith("module.") for k in avg)
    with torch.no_grad():
        teacher = functional_call(model, avg, (x,))
        inner = functional_call(model.module, ema_state_dict(opt, model.module), (x,))
        with opt.swap_ema_weights():
            expected = model(x)
    assert torch.equal(teacher, expected) and torch.equal(inner, expected)
    train_step(model, opt, batch(3, rank))  # the wrapper still trains afterwards


def test_fsdp2_refuses_functional_call_and_the_swap_is_exact_ddp_works():
    spawn(_worker, 2)
