"""The wrapper's own cost per step: host work, and the EMA cost against ``swa_utils``.

Run through ``bench.py --suites host swa``.

``host``: for 100, 1,000 and 10,000 small params (64-256 elements each, so that host work
dominates) and three inner optimizers (SGD without momentum, which keeps no per-param state;
SGD with momentum; AdamW; all ``foreach=True``), the host overhead is

    wrapped step - (inner step; the EMA kernel alone)

per interleaved round, median over rounds, where "the EMA kernel alone" is one
``torch._foreach_lerp_`` over the same shadows and params (what ``swa_utils`` and ema_optim
run for fp32). The inner step and the kernel are timed back to back as one block, so that
they see the caches as the wrapped step does. ``q25..q75`` shows the rounds' spread: a
difference inside it is noise. ``min-min`` is min(wrapped) - min(inner + kernel) over the
rounds: load on a shared machine only adds time, so the minima are steadier than medians.
``calls/step`` counts the Python and C function calls the wrapper adds to the inner step
(``sys.setprofile``): noise-free, it shows host work that
grows with the param count even when the timing cannot. SPEC: in steady state this work
does not grow with the number of params.

``swa``: EMA cost = wrapped step - inner step (``SGD(lr=0)`` with grads, ``foreach=True``),
per round, median over rounds, against the same inner step followed by ``swa_utils``' foreach
EMA, i.e. the function ``get_ema_multi_avg_fn(d)`` returns (one ``_foreach_lerp_`` under
``no_grad``) called on the shadow and param lists, and followed by
``AveragedModel(multi_avg_fn=...).update_parameters`` (that, plus its Python loop over the
params), on 8 x 4M fp32, 2,000 x 4096 fp32 and 8 x 2M bf16, in one run per shape. Each EMA
runs right after an inner step, so that all of them find the caches in the same state.
``AveragedModel`` cannot keep fp32 shadows of bf16 params (``_foreach_lerp_`` wants one
dtype), so for bf16 the like-for-like row is ema_optim with ``ema_dtype=torch.bfloat16``;
the default (fp32 shadows, 10 B/param instead of 6) is shown beside it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from _peers import DECAY, WEIGHT, ParamList
from _report import Col, ms, print_table, ratio, us
from _timing import differences, interleaved, median, paired, python_calls, quartiles

INNERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-6, foreach=True),
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-6, momentum=0.9, foreach=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-6, foreach=True),
}
COUNTS, QUICK_COUNTS = (100, 1_000, 10_000), (10, 100, 300)
FLAT = 2.0  # the bar: host overhead at 10,000 params within 2x of the 100-param figure


def small_params(n: int, device: torch.device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64 + (i * 37) % 193, device=device)) for i in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def kernel_alone(shadows: list[Tensor], params: list[Tensor]) -> Callable[[], None]:
    @torch.no_grad()  # as inside EMAOptimizer.step(): no autograd bookkeeping
    def lerp() -> None:
        torch._foreach_lerp_(shadows, params, WEIGHT)

    return lerp


def host_row(n: int, inner_name: str, device: torch.device, rounds: int) -> dict:
    from ema_optim import EMAOptimizer

    params = small_params(n, device)
    inner = INNERS[inner_name](params)
    opt = EMAOptimizer(inner, decay=DECAY)
    opt.step()  # creates the shadows and the inner state
    opt.step()  # steady state
    kernel = kernel_alone([opt.state[p]["ema"] for p in params], params)

    def reference() -> None:
        inner.step()
        kernel()

    fns = {"wrapped": opt.step, "inner": inner.step, "kernel": kernel, "reference": reference}
    # Many short rounds (a block of about 5 ms each, 8 s a row): the per-round noise of the
    # 10,000-param rows is ~1 ms, so their medians need the rounds.
    s = interleaved(fns, device, rounds, min_block_s=0.005, budget_s=8.0)
    host = differences(s["wrapped"], s["reference"])
    low, high = quartiles(host)
    return {
        "params": n,
        "inner": inner_name,
        "wrapped": median(s["wrapped"]),
        "inner_step": median(s["inner"]),
        "kernel": median(s["kernel"]),
        "host": median(host),
        "host_q25": low,
        "host_q75": high,
        "host_separate": paired(s["wrapped"], s["inner"], s["kernel"]),
        "host_min": min(s["wrapped"]) - min(s["reference"]),  # noise only adds: minima are steadier
        "calls": python_calls(opt.step) - python_calls(inner.step),
        "rounds": len(host),
    }


HOST_COLS = [
    ms("wrapped ms", "wrapped"),
    ms("inner ms", "inner_step"),
    ms("kernel ms", "kernel"),
    us("host us", "host"),
    Col("q25..q75 us", lambda r: f"{r['host_q25'] * 1e6:.0f}..{r['host_q75'] * 1e6:.0f}", width=14),
    us("min-min us", "host_min"),
    Col("calls/step", "calls", "d"),
]


def run_host(device: torch.device, quick: bool = False, rounds: int = 11) -> dict:
    counts = QUICK_COUNTS if quick else COUNTS
    rounds = rounds if quick else max(rounds, 300)
    rows = {f"{name} x {n:,}": host_row(n, name, device, rounds) for name in INNERS for n in counts}
    print_table(
        "host overhead: wrapped step - (inner step; the lerp kernel alone), small params",
        rows,
        HOST_COLS,
        label="inner x params",
    )
    verdicts = {}
    for name in INNERS:
        few, many = rows[f"{name} x {counts[0]:,}"], rows[f"{name} x {counts[-1]:,}"]
        ok = few["host"] > 0 and many["host"] <= FLAT * few["host"]
        calls = many["calls"] / max(few["calls"], 1)
        verdicts[name] = {"host_few": few["host"], "host_many": many["host"], "x_calls": calls, "flat": ok}
        print(
            f"   {name:<13} host {few['host'] * 1e6:.0f} us at {counts[0]:,}, {many['host'] * 1e6:.0f} us "
            f"(q25..q75 {many['host_q25'] * 1e6:.0f}..{many['host_q75'] * 1e6:.0f}) at {counts[-1]:,}: "
            + ("within 2x" if ok else "NOT within 2x")
            + f"; calls x{calls:.2f} ("
            + ("flat" if calls <= 1.05 else "GROW with the param count")
            + ")"
        )
    return {"rows": rows, "verdicts": verdicts}


# ------------------------------------------------------------------------------ against swa_utils


SWA_SHAPES = {
    "8 x 4M fp32": (8, 4 << 20, torch.float32),
    "2,000 x 4096 fp32": (2000, 4096, torch.float32),
    "8 x 2M bf16": (8, 2 << 20, torch.bfloat16),
}
QUICK_SWA_SHAPES = {"8 x 64K fp32": (8, 1 << 16, torch.float32), "8 x 64K bf16": (8, 1 << 16, torch.bfloat16)}
SWA_BAR = 1.10


def swa_fns(n: int, numel: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Every timed block of one shape: each EMA inside a step of the same inner optimizer."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ema_optim import EMAOptimizer

    torch.manual_seed(0)
    model = ParamList([(numel,)] * n, dtype, device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    fns: dict[str, Callable[[], Any]] = {}
    variants: dict[str, dict] = {"ema_optim": {}}
    if dtype != torch.float32:
        variants = {"ema_optim (ema_dtype=bf16)": {"ema_dtype": dtype}, "ema_optim (fp32 shadows)": {}}
    for name, kwargs in variants.items():
        inner = torch.optim.SGD(params, lr=0.0, foreach=True)
        opt = EMAOptimizer(inner, decay=DECAY, **kwargs)
        opt.step()
        fns[name], fns[name + "/inner"] = opt.step, inner.step
    ema_fn, shadows = get_ema_multi_avg_fn(DECAY), [p.detach().clone() for p in params]
    detached, count = [p.detach() for p in params], torch.tensor(1, device=device)
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    avg.update_parameters(model)  # the first call copies
    fns["swa_utils ema fn"] = lambda: (inner.step(), ema_fn(shadows, detached, count))
    fns["AveragedModel"] = lambda: (inner.step(), avg.update_parameters(model))
    fns["inner"] = inner.step
    return fns


SWA_COLS = [ms("EMA cost ms", "seconds"), ratio("x swa ema fn", "x_swa"), ratio("x AveragedModel", "x_avg")]


def run_swa(device: torch.device, quick: bool = False, rounds: int = 11) -> dict:
    out = {}
    for label, (n, numel, dtype) in (QUICK_SWA_SHAPES if quick else SWA_SHAPES).items():
        fns = swa_fns(n, numel, dtype, device)
        s = interleaved(fns, device, rounds if quick else max(rounds, 21))
        rows = {
            name: {"seconds": paired(s[name], s["inner"])} for name in ("swa_utils ema fn", "AveragedModel")
        }
        for name in [k for k in fns if k.startswith("ema_optim") and not k.endswith("/inner")]:
            rows[name] = {
                "seconds": paired(s[name], s[name + "/inner"]),
                "inner_seconds": median(s[name + "/inner"]),
            }
        swa, avg = rows["swa_utils ema fn"]["seconds"], rows["AveragedModel"]["seconds"]
        for row in rows.values():
            row.update(x_swa=row["seconds"] / swa, x_avg=row["seconds"] / avg)
        print_table(
            f"EMA cost vs swa_utils: {label} (step - inner SGD(lr=0) step, same inner)", rows, SWA_COLS
        )
        ours = "ema_optim" if "ema_optim" in rows else "ema_optim (ema_dtype=bf16)"
        x = rows[ours]["x_swa"]
        print(
            f"   {ours}: {x:.2f}x swa_utils' foreach EMA: "
            + ("within 1.10x" if x <= SWA_BAR else "NOT within 1.10x")
        )
        out[label] = {"rows": rows, "acceptance_row": ours, "within_bar": x <= SWA_BAR}
    return out
