"""Memory: shadows are the only model-sized memory; a step allocates far less than the model."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ema_optim import EMAOptimizer


class AllocationSpy(TorchDispatchMode):
    """Bytes of the new tensors that ops return (in-place ops and views return no new memory)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if not name.endswith("_") and not func.is_view:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.untyped_storage().nbytes()
        return out


def _step_allocations(wrap: bool, dtype: torch.dtype, **kwargs) -> tuple[int, int]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256, dtype=dtype)) for _ in range(8)]
    opt = torch.optim.SGD(params, lr=0.01)
    if wrap:
        opt = EMAOptimizer(opt, decay=0.99, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the shadows (allocated once)
    spy = AllocationSpy()
    with spy:
        for _ in range(3):
            opt.step()
    return spy.bytes, sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{}, dict(update_after_step=10)], ids=["lerp", "copy"])
def test_step_allocates_far_less_than_the_model(dtype, kwargs):
    wrapped, model_bytes = _step_allocations(True, dtype, **kwargs)
    alone, _ = _step_allocations(False, dtype)
    assert wrapped - alone < 0.01 * model_bytes, (wrapped, alone, model_bytes)


def test_spy_sees_a_per_step_cast():
    # not vacuous: an fp32 cast of every bf16 param would be counted
    params = [torch.randn(256, 256, dtype=torch.bfloat16) for _ in range(8)]
    spy = AllocationSpy()
    with spy:
        [p.float() for p in params]
    assert spy.bytes == 8 * 256 * 256 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shadows_are_the_only_persistent_memory(dtype):
    params = [torch.nn.Parameter(torch.randn(64, 64, dtype=dtype)) for _ in range(4)]
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.01), decay=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = {id(t): t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    assert sum(t.untyped_storage().nbytes() for t in tensors.values()) == 4 * 64 * 64 * 4  # fp32 shadows only
    assert not any(torch.is_tensor(v) and v.numel() > 1 for v in vars(opt).values())
