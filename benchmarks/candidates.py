"""Kernel fast-path candidates for the update: time, and error against a float64 reference.

Run through ``bench.py --candidates``. bf16 params with fp32 shadows: (a) mixed-dtype
``_foreach_mul_`` + ``_foreach_add_(alpha)``; (b) a per-tensor ``lerp_(p.float())``;
(c) ema_optim's own path (``EMAOptimizer.step()`` over SGD with its grads hidden, shadows set
through the public ``state``); (d) ``torch.compile`` (inductor) of a cast + ``_foreach_lerp_``.
fp32: three forms of the foreach update. Error: max |shadow - float64 reference| after 1 and
after ``ERR_STEPS`` updates (weight 1e-3, shadows and params ~N(0, 1)).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from _peers import WEIGHT, transformer_shapes, without_grads
from _report import Col, mb, ms, print_table
from _timing import interleaved, median, temp_bytes

ERR_STEPS = 50  # updates over which the candidates' rounding error accumulates
Make = Callable[[list[Tensor]], tuple[Callable[[], Any], list[Tensor]]]  # init -> (update, shadows)


def _ema_optim(params: list[Tensor]) -> Make:
    from ema_optim import EMAOptimizer

    def make(init):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = EMAOptimizer(torch.optim.SGD(ps, lr=0.0), decay=1.0 - WEIGHT)
        step = without_grads(opt.step, ps)
        step()  # creates the shadows, then they take the initial values
        shadows = [opt.state[p]["ema"] for p in ps]
        torch._foreach_copy_(shadows, init)
        return step, shadows

    return make


def _on_clones(update: Callable[[list[Tensor]], Any]) -> Make:
    def make(init):
        shadows = [t.clone() for t in init]
        return (lambda: update(shadows)), shadows

    return make


def bf16_candidates(params: list[Tensor]) -> dict[str, Make]:
    def mul_add(s):
        torch._foreach_mul_(s, 1.0 - WEIGHT)
        torch._foreach_add_(s, params, alpha=WEIGHT)

    def per_tensor(s):
        for si, p in zip(s, params):
            si.lerp_(p.float(), WEIGHT)

    def cast_lerp(s_list, p_list, w):
        torch._foreach_lerp_(s_list, [p.float() for p in p_list], [w] * len(s_list))

    compiled = torch.compile(cast_lerp, backend="inductor", dynamic=False)
    w_t = torch.tensor(WEIGHT, device=params[0].device)
    return {
        "(a) foreach mul_ + add_(alpha)": _on_clones(mul_add),
        "(b) per-tensor lerp_(p.float())": _on_clones(per_tensor),
        "(c) ema_optim step (its cast path)": _ema_optim(params),
        "(d) torch.compile(inductor) cast+lerp": _on_clones(lambda s: compiled(s, params, w_t)),
    }


def fp32_candidates(params: list[Tensor]) -> dict[str, Make]:
    ws = [torch.tensor(WEIGHT, device=params[0].device)] * len(params)
    return {
        "_foreach_lerp_(scalar w)": _on_clones(lambda s: torch._foreach_lerp_(s, params, WEIGHT)),
        "_foreach_lerp_([w0dim]*n)": _on_clones(lambda s: torch._foreach_lerp_(s, params, ws)),
        "_foreach_mul_ + _foreach_add_(alpha)": _on_clones(
            lambda s: (torch._foreach_mul_(s, 1.0 - WEIGHT), torch._foreach_add_(s, params, alpha=WEIGHT))
        ),
        "(c) ema_optim step": _ema_optim(params),
    }


def _error(make: Make, init: list[Tensor], params: list[Tensor], steps: int) -> float:
    update, shadows = make(init)
    ref = [i.double() for i in init]
    for _ in range(steps):
        update()
        ref = [r + WEIGHT * (p.double() - r) for r, p in zip(ref, params)]
    return max((s.double() - r).abs().max().item() for s, r in zip(shadows, ref))


def run_shape(label: str, numels: list[int], dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(n, device=device).to(dtype) for n in numels]
    init = [torch.randn(n, device=device) for n in numels]
    table = bf16_candidates(params) if dtype == torch.bfloat16 else fp32_candidates(params)
    rows: dict[str, dict] = {}
    fns = {}
    for name, make in table.items():
        try:
            start = time.perf_counter()
            err_1 = _error(make, init, params, 1)  # the first call: (d) compiles here
            rows[name] = {"first_s": time.perf_counter() - start, "err_1": err_1}
            rows[name]["err_n"] = _error(make, init, params, ERR_STEPS)
        except Exception as e:  # noqa: BLE001 - e.g. no compiler toolchain for (d)
            rows[name] = {"skipped": f"{type(e).__name__}: {str(e)[:100]}"}
            continue
        fns[name] = make(init)[0]
        rows[name]["temp_bytes"] = None if name.startswith("(d)") else temp_bytes(fns[name])
    for name, s in interleaved(fns, device, rounds).items():
        rows[name]["seconds"] = median(s)
    cols = [ms("ms", "seconds"), Col("err 1", "err_1", ".2e"), Col(f"err {ERR_STEPS}", "err_n", ".2e")]
    cols += [mb("temp MB", "temp_bytes"), Col("first call s", "first_s", ".2f")]
    print_table(f"[{dtype} candidates] {label}", rows, cols, label="path")
    return {"shape": label, "paths": rows}


def run(device: torch.device, quick: bool = False, rounds: int = 11) -> dict:
    shapes = {"4 x 4M": [4 << 20] * 4, "512 x 16K": [1 << 14] * 512}
    shapes["TransformerEncoder d512 x4 (48 tensors)"] = [torch.Size(s).numel() for s in transformer_shapes(4)]
    fp32 = {"4 x 4M": [4 << 20] * 4, "2000 x 4096": [4096] * 2000}
    if quick:
        shapes, fp32 = {"4 x 16K": [1 << 14] * 4}, {"4 x 16K": [1 << 14] * 4}
    return {
        "bf16": [run_shape(k, v, torch.bfloat16, device, rounds) for k, v in shapes.items()],
        "fp32": [run_shape(k, v, torch.float32, device, rounds) for k, v in fp32.items()],
    }
