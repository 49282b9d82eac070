"""Host cost: the wrapper's own Python work per step does not grow with the number of params.

Counted as the Python lines run and the functions called (``sys.settrace``/``sys.setprofile``)
by ``EMAOptimizer.step()`` beyond those its inner optimizer's step runs on the same params: a
deterministic count, not a timing, that also sees loops written inline. Every tensor of one
(device, dtype) group goes through one foreach call.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ema_optim import EMAOptimizer

INNERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.0),  # keeps no per-param state
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.0),
}


def calls(fn) -> int:
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "c_call":
            count += 1

    def trace(frame, event, arg):
        nonlocal count
        count += 1  # a call, a line, a return
        return trace

    sys.setprofile(profile)
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return count


def own_calls(make_inner, n, frozen=0, **kwargs) -> int:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(n + frozen)]
    for p in params[:n]:  # the last `frozen` params never get a grad: their inner state stays empty
        p.grad = torch.randn(8)
    kwargs.setdefault("decay", 0.99)
    plain, wrapped = make_inner(params), EMAOptimizer(make_inner(params), **kwargs)
    for _ in range(3):  # steady state: shadows and inner state exist
        plain.step()
        wrapped.step()
    return calls(wrapped.step) - calls(plain.step)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize(
    "kwargs", [{}, {"decay": (0.9, 0.99)}, {"update_every": 2}], ids=["one", "two", "every2"]
)
def test_wrapper_calls_per_step_do_not_grow_with_the_param_count(inner, kwargs):
    counts = [own_calls(INNERS[inner], n, **kwargs) for n in (10, 100, 1000)]
    assert counts[0] == counts[1] == counts[2], counts


def test_params_whose_inner_state_stays_empty_cost_nothing_per_step():
    # AdamW keeps no state for params that never had a grad; they still have shadows.
    counts = [own_calls(INNERS["adamw"], 10, frozen=f) for f in (1, 100, 1000)]
    assert counts[0] == counts[1] == counts[2], counts
