"""The update with 1, 2 and 3 shadows per param (``decay=(0.999, 0.9999, ...)``), fp32 and bf16.

Run through ``bench.py --suites shadows``. Time: ``EMAOptimizer.step()`` minus its inner
step (SGD, grads hidden), per interleaved round, median over rounds, all shadow counts of a
shape in one run. Memory: ``shadow MB``, the bytes of every shadow (``ema``, ``ema_1``, ...);
``alloc MB/step``, bytes freshly allocated by one step beyond what the inner step allocates
(a dispatch mode counts them: the CPU measure; an upper bound of the peak); on CUDA
``peak MB``, the ``max_memory_allocated`` rise of one step. Issue 11's bar: two shadows cost
at most 2.1x one; with bf16 params (cast once per chunk for all shadows) less than 2x.
Where ema_optim does not take a tuple ``decay`` yet, the rows say "needs tuple decay".
"""

from __future__ import annotations

import torch

from _peers import Case, ParamList, build, ema_optim_step
from _report import mb, ms, print_table, ratio
from _timing import cuda_peak_bytes, interleaved, paired, temp_bytes, tensor_bytes

DECAYS = (0.999, 0.9999, 0.99999)
SHAPES = {"4 x 4M fp32": (4, 4 << 20, torch.float32), "4 x 4M bf16": (4, 4 << 20, torch.bfloat16)}
QUICK_SHAPES = {"4 x 64K fp32": (4, 1 << 16, torch.float32), "4 x 64K bf16": (4, 1 << 16, torch.bfloat16)}
BAR_TWO = 2.1


def _decay(k: int):
    return DECAYS[0] if k == 1 else DECAYS[:k]


def _methods(case: Case, device: torch.device) -> tuple[dict, dict]:
    methods, rows = {}, {}
    for k in range(1, len(DECAYS) + 1):
        name = f"{k} shadow" + "s" * (k > 1)
        method, reason, _ = build(lambda k=k: ema_optim_step(case, decay=_decay(k)), device)
        expected = k * len(case.params)
        if method is None:
            reason = "needs tuple decay" if k > 1 and "decay" in reason else reason
            rows[name] = {"skipped": reason}
        elif len(method.state) != expected:
            rows[name] = {"skipped": f"needs tuple decay ({len(method.state)} shadows, expected {expected})"}
        else:
            methods[name] = method
            extra = temp_bytes(method.update) - temp_bytes(method.inner_only)
            peak = cuda_peak_bytes(method.update, device)
            rows[name] = {"shadows": k, "shadow_bytes": tensor_bytes(method.state), "alloc_bytes": extra}
            rows[name]["peak_bytes"] = peak
    return methods, rows


def run(device: torch.device, quick: bool = False, rounds: int = 11) -> dict:
    out = {}
    for label, (n, numel, dtype) in (QUICK_SHAPES if quick else SHAPES).items():
        torch.manual_seed(0)
        case = Case(label, label, ParamList([(numel,)] * n, dtype, device))
        methods, rows = _methods(case, device)
        fns = {name: m.update for name, m in methods.items()}
        fns.update({name + "/inner": m.inner_only for name, m in methods.items()})
        samples = interleaved(fns, device, rounds) if fns else {}
        one = None
        for name in methods:
            rows[name]["seconds"] = paired(samples[name], samples[name + "/inner"])
            one = one or rows[name]["seconds"]
            rows[name]["x_one"] = rows[name]["seconds"] / one
        cols = [ms("ms/update", "seconds"), ratio("x 1 shadow", "x_one"), mb("shadow MB", "shadow_bytes")]
        cols += [mb("alloc MB/step", "alloc_bytes")] + (
            [mb("peak MB", "peak_bytes")] if device.type == "cuda" else []
        )
        print_table(f"shadows: {label} ({dtype})", rows, cols, label="shadows")
        two = rows.get("2 shadows", {}).get("x_one")
        bar = 2.0 if dtype != torch.float32 else BAR_TWO
        if two is not None:
            print(
                f"   2 shadows / 1: {two:.2f}x (bar: {'< 2' if bar == 2.0 else '<= 2.1'}): "
                + ("met" if two <= bar else "NOT met")
            )
        out[label] = {"rows": rows, "two_over_one": two}
    return out
