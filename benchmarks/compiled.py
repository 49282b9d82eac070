"""The compiled step (issue 20): what the EMA adds to ``torch.compile``'d optimizer steps.

Run through ``bench.py --suites compiled`` (CPU: ``--clock cpu --threads 1``; ``--quick``: tiny
shapes, a smoke test of the suite, no claims).

Per case (an inner optimizer, param dtype and decay; 8 params of 2M elements on CPU, 8 x 32M on
CUDA, grads set once and shared by every row, no model forward), five steps, each with its own
params and optimizer, timed in ONE interleaved run (``_timing.interleaved``: shuffled rounds,
medians):

- ``compiled inner``: ``torch.compile(inner.step)``, the baseline;
- ``one-graph ref``: a compiled function that runs the inner optimizer's undecorated update
  (``type(inner).step.__wrapped__.__wrapped__(inner)``) and then
  ``torch._foreach_lerp_(shadows, [p.to(shadow dtype) ...], w)`` for each shadow (``w`` a 0-dim
  tensor), with grad disabled before the graph starts: what one graph of both updates costs
  when nothing else is in the way;
- ``compiled wrapper``: ``torch.compile(EMAOptimizer(inner, decay=...).step)``;
- ``eager inner`` and ``eager wrapper``: the same steps without ``torch.compile``.

``EMA cost`` = time / compiled inner - 1, the median over rounds of the per-round ratio (for the
eager rows also over the eager inner step). Each compiled step is warmed up by 3 calls before
timing; their wall time (compile included) is printed, not counted. The Inductor FX-graph and
AOT-autograd caches are off in this suite, so that every compile generates (and counts) its
kernels.

Kernels: per warm-up call, ``torch._inductor.metrics.generated_kernel_count`` (reset before each
call) and the new graphs (``counters["stats"]["unique_graphs"]``); the steady-state figure is
that of the last warm-up call that compiled a graph (the 1st for the inner step and the
reference; the 2nd for the wrapper, whose 1st step runs in parts while it makes its shadows).
``launches``: kernel calls in the generated code of that call (``cpp_fused_*(`` / ``.run(``).
``fallbacks``: ATen or extern calls left in that code (``aten.*``, ``extern_kernels.*``), e.g. an
ATen ``_foreach_lerp`` that Inductor could not lower: the fused EMA leaves none. On CUDA,
``CUDA kernels`` also counts the device activities (kernels, memcpy, memset) that
``torch.profiler`` records in one steady-state call.

Recompiles: Dynamo's compiled graphs are counted across the timed rounds of every case (must
not grow: the scheduled-decay case changes the decay at every step), with
``recompile_limit`` raised to 64 so that a per-step recompile cannot hide behind Dynamo's
fall back to eager after 8.

Targets (issue 20): the wrapper's EMA cost at most 0.25 (AdamW fp32, one shadow; and within
0.1 of the one-graph reference) and at most 0.30 (two shadows; bf16 params with fp32 shadows);
as many kernels as the inner step alone.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union
from unittest import mock

import torch
import torch._dynamo
import torch._inductor.config
from torch import Tensor
from torch._dynamo.utils import counters
from torch._inductor import metrics
from torch._inductor.graph import GraphLowering

from _report import Col, ms, print_table
from _timing import interleaved, median, quartiles

N_PARAMS = 8
NUMEL = {"cpu": 2 << 20, "cuda": 32 << 20}
QUICK_NUMEL = 4096
WARMUP_CALLS = 3
BARS = {"adamw": 0.25, "adamw-2": 0.30, "adamw-bf16": 0.30}
REF_MARGIN = 0.10  # the wrapper's EMA cost within this of the one-graph reference's

Decay = Union[float, tuple[float, ...], Callable[[int], float]]


def _adamw(ps: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=1e-4, foreach=True)


def _sgd_momentum(ps: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)


@dataclass(frozen=True)
class Spec:
    name: str
    describe: str
    make_inner: Callable[[list[Tensor]], torch.optim.Optimizer]
    dtype: torch.dtype
    decay: Callable[[], Decay]  # a factory: a schedule is a fresh closure per optimizer

    @property
    def ref_weights(self) -> tuple[float, ...]:
        """The one-graph reference's lerp weights, fixed (for a schedule: that of decay 0.999)."""
        d = self.decay()
        decays = d if isinstance(d, tuple) else (0.999,) if callable(d) else (d,)
        return tuple(1 - x for x in decays)


def _warmup() -> Decay:
    from ema_optim import schedules

    return schedules.warmup()


FP32, BF16 = torch.float32, torch.bfloat16
SPECS = [
    Spec("adamw", "AdamW(foreach=True) fp32, one shadow (0.999)", _adamw, FP32, lambda: 0.999),
    Spec("adamw-2", "AdamW fp32, two shadows (0.999, 0.9999)", _adamw, FP32, lambda: (0.999, 0.9999)),
    Spec("adamw-bf16", "AdamW, bf16 params, fp32 shadows (the default)", _adamw, BF16, lambda: 0.999),
    Spec(
        "sgd-momentum", "SGD(momentum=0.9, foreach=True) fp32, one shadow", _sgd_momentum, FP32, lambda: 0.999
    ),
    Spec("adamw-warmup", "AdamW fp32, decay=schedules.warmup() (changes every step)", _adamw, FP32, _warmup),
]


# ------------------------------------------------------------------------------ the five steps


def _params(values: list[Tensor], grads: list[Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(v.clone()) for v in values]
    for p, g in zip(params, grads):
        p.grad = g  # shared by every row: read only
    return params


def _one_graph_ref(inner: torch.optim.Optimizer, weights: Sequence[float]) -> Callable[[], None]:
    """The inner update and the EMA's lerps traced as one graph, nothing else in the way."""
    params = [p for g in inner.param_groups for p in g["params"]]
    columns = [[p.detach().to(torch.float32).clone() for p in params] for _ in weights]
    device = params[0].device
    ws = [torch.tensor(w, dtype=torch.float32, device=device) for w in weights]
    body = type(inner).step.__wrapped__.__wrapped__  # type: ignore[attr-defined]

    @torch.compile
    def update() -> None:
        body(inner)
        ends = [p.to(columns[0][0].dtype) for p in params]
        for shadows, w in zip(columns, ws):
            torch._foreach_lerp_(shadows, ends, w)

    def step() -> None:
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # before the graph starts: an inference graph, updated in place
        try:
            update()
        finally:
            torch.set_grad_enabled(prev)

    return step


class Counted:
    """A step that counts its calls (how many steps the timed rounds ran)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.fn()


def steps(spec: Spec, numel: int, device: torch.device) -> tuple[dict[str, Callable[[], Any]], set[str]]:
    """The five steps of a case (each over its own params and optimizer) and which are compiled."""
    from ema_optim import EMAOptimizer

    torch.manual_seed(0)
    values = [torch.randn(numel, device=device).to(spec.dtype) for _ in range(N_PARAMS)]
    grads = [torch.randn(numel, device=device).mul_(1e-2).to(spec.dtype) for _ in range(N_PARAMS)]
    inner_c = spec.make_inner(_params(values, grads))
    inner_r = spec.make_inner(_params(values, grads))
    wrapper_c = EMAOptimizer(spec.make_inner(_params(values, grads)), decay=spec.decay())
    inner_e = spec.make_inner(_params(values, grads))
    wrapper_e = EMAOptimizer(spec.make_inner(_params(values, grads)), decay=spec.decay())
    fns = {
        "compiled inner": torch.compile(inner_c.step),
        "one-graph ref": _one_graph_ref(inner_r, spec.ref_weights),
        "compiled wrapper": Counted(torch.compile(wrapper_c.step)),
        "eager inner": inner_e.step,
        "eager wrapper": wrapper_e.step,
    }
    return fns, {"compiled inner", "one-graph ref", "compiled wrapper"}


# ------------------------------------------------------------------------------ kernels


@dataclass
class Compiles:
    """What each warm-up call of one compiled step compiled."""

    kernels: list[int] = field(default_factory=list)  # generated_kernel_count per call
    graphs: list[int] = field(default_factory=list)  # new Dynamo graphs per call
    seconds: list[float] = field(default_factory=list)  # wall time per call (compile included)
    codes: list[list[str]] = field(default_factory=list)  # Inductor's output code per call

    @property
    def steady(self) -> int:
        """The index of the last call that compiled a graph: the steady-state graph's."""
        compiled = [i for i, g in enumerate(self.graphs) if g]
        return compiled[-1] if compiled else len(self.graphs) - 1


@contextlib.contextmanager
def _output_code(into: list[str]) -> Iterator[None]:
    real = GraphLowering.save_output_code

    def save(code: str) -> None:
        into.append(code)
        if real is not None:
            real(code)

    with mock.patch.object(GraphLowering, "save_output_code", staticmethod(save)):
        yield


def warm_up(fn: Callable[[], Any], device: torch.device) -> Compiles:
    out = Compiles()
    for _ in range(WARMUP_CALLS):
        codes: list[str] = []
        metrics.reset()
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        with _output_code(codes):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.seconds.append(time.perf_counter() - start)
        out.kernels.append(metrics.generated_kernel_count)
        out.graphs.append(counters["stats"]["unique_graphs"] - graphs)
        out.codes.append(codes)
    return out


_CALL = re.compile(r"^    def call\(self, args\):\n(.*?)(?=^\S|\Z)", re.S | re.M)
_FALLBACK = re.compile(r"\b(aten|extern_kernels|torch\.ops\.aten)\.(\w+)")
_LAUNCH = re.compile(r"^\s+(cpp_fused_\w+)\(|^\s+(\w+)\.run\(", re.M)


def _call_bodies(codes: list[str]) -> list[str]:
    return [m.group(1) for code in codes for m in _CALL.finditer(code)]


def launches(codes: list[str]) -> int:
    """Kernel calls in the ``call`` functions of Inductor's output code."""
    return sum(len(_LAUNCH.findall(body)) for body in _call_bodies(codes))


def fallbacks(codes: list[str]) -> list[str]:
    """The ATen / extern calls left in the ``call`` functions (ops Inductor did not lower)."""
    return sorted({f"{a}.{b}" for body in _call_bodies(codes) for a, b in _FALLBACK.findall(body)})


def cuda_activities(fn: Callable[[], Any]) -> list[str]:
    """CUDA only: the names of the device activities of one call (kernels, memcpy, memset)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


def kernel_row(c: Compiles, activities: Optional[list[str]]) -> dict:
    s = c.steady
    row = {
        "per_call": ", ".join(map(str, c.kernels)),
        "graphs": ", ".join(map(str, c.graphs)),
        "compile_s": ", ".join(f"{x:.1f}" for x in c.seconds),
        "kernels": c.kernels[s],
        "launches": launches(c.codes[s]),
        "fallbacks": fallbacks(c.codes[s]),
        "steady_call": s + 1,
    }
    row["fallback_text"] = " ".join(row["fallbacks"]) or "none"
    if activities is not None:
        row["cuda_kernels"] = len(activities)
        row["cuda_names"] = sorted(set(activities))
    return row


# ------------------------------------------------------------------------------ one case


def _ratios(samples: list[float], base: list[float]) -> list[float]:
    return [s / b - 1 for s, b in zip(samples, base)]


def run_case(spec: Spec, device: torch.device, numel: int, rounds: int) -> dict:
    torch._dynamo.reset()  # each case compiles its own graphs, from a clean cache
    fns, compiled = steps(spec, numel, device)
    kernels = {}
    for name in [n for n in fns if n in compiled]:  # in the table's order
        c = warm_up(fns[name], device)
        activities = cuda_activities(fns[name]) if device.type == "cuda" else None
        kernels[name] = kernel_row(c, activities)
    for name in [n for n in fns if n not in compiled]:
        for _ in range(WARMUP_CALLS):
            fns[name]()
    graphs, wrapper = counters["stats"]["unique_graphs"], fns["compiled wrapper"]
    calls = wrapper.calls
    samples = interleaved(fns, device, rounds, budget_s=60.0)
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    rows = {}
    for name, s in samples.items():
        cost = _ratios(s, samples["compiled inner"])
        low, high = quartiles(cost)
        rows[name] = {"seconds": median(s), "cost": median(cost), "cost_q": f"{low:+.2f}..{high:+.2f}"}
        if name.startswith("eager"):
            rows[name]["cost_eager"] = median(_ratios(s, samples["eager inner"]))
    decay = spec.decay()
    if callable(decay):  # what the schedule gave over the timed steps (its t counts the steps)
        schedule = (decay(calls), decay(wrapper.calls))
    else:
        schedule = None
    return {
        "case": spec.name,
        "describe": spec.describe,
        "numel": numel,
        "schedule": schedule,
        "rows": rows,
        "kernels": kernels,
        "rounds": len(samples["compiled inner"]),
        "timed_wrapper_steps": wrapper.calls - calls,
        "graphs_while_timed": new_graphs,
    }


TIME_COLS = [
    ms("ms/step", "seconds"),
    Col("EMA cost", "cost", "+.2f"),
    Col("q25..q75", "cost_q", width=12),
    Col("vs eager inner", "cost_eager", "+.2f"),
]
KERNEL_COLS = [
    Col("kernels (steady)", "kernels", "d"),
    Col("launches", "launches", "d"),
    Col("per warm-up call", "per_call", width=17),
    Col("new graphs", "graphs", width=10),
    Col("warm-up s", "compile_s", width=16),
    Col("fallbacks", "fallback_text", width=10),
]


def verdicts(res: dict) -> list[str]:
    """The issue's targets for this case, each one line."""
    rows, k = res["rows"], res["kernels"]
    wrapper, ref = rows["compiled wrapper"]["cost"], rows["one-graph ref"]["cost"]
    out = []
    bar = BARS.get(res["case"])
    if bar is not None:
        out.append(f"EMA cost {wrapper:+.2f} <= {bar:.2f}: " + ("met" if wrapper <= bar else "NOT met"))
    if res["case"] == "adamw":
        gap = wrapper - ref
        out.append(
            f"within {REF_MARGIN} of the one-graph ref ({ref:+.2f}): {gap:+.2f}, "
            + ("met" if gap <= REF_MARGIN else "NOT met")
        )
    kw, ki = k["compiled wrapper"]["kernels"], k["compiled inner"]["kernels"]
    out.append(f"kernels {kw} vs {ki} (inner alone): " + ("same" if kw == ki else "MORE"))
    fb = k["compiled wrapper"]["fallbacks"]
    out.append("fallbacks in the wrapper's steady graph: " + (" ".join(fb) if fb else "none"))
    if "cuda_kernels" in k["compiled wrapper"]:
        out.append(
            f"CUDA activities per step: {k['compiled wrapper']['cuda_kernels']} vs "
            f"{k['compiled inner']['cuda_kernels']} (inner alone); wrapper: "
            + ", ".join(name[:60] for name in k["compiled wrapper"]["cuda_names"])
        )
    decays = f" (decay {res['schedule'][0]:.6f} -> {res['schedule'][1]:.6f})" if res["schedule"] else ""
    out.append(
        f"new graphs during the {res['timed_wrapper_steps']} timed wrapper steps{decays}: "
        f"{res['graphs_while_timed']} " + ("(flat)" if res["graphs_while_timed"] == 0 else "(RECOMPILED)")
    )
    return out


def run(
    device: torch.device,
    quick: bool = False,
    rounds: int = 11,
    cases: Optional[Sequence[str]] = None,
    save: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Every case (or the named ones), printed and, through ``save``, kept as each one ends."""
    numel = QUICK_NUMEL if quick else NUMEL["cuda" if device.type == "cuda" else "cpu"]
    rounds = rounds if quick else max(rounds, 21)
    unknown = set(cases or ()) - {s.name for s in SPECS}
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {' '.join(s.name for s in SPECS)}")
    out: dict[str, Any] = {"numel": numel, "params": N_PARAMS, "cases": {}}
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        torch._dynamo.config.patch(recompile_limit=64),
    ):
        for spec in [s for s in SPECS if not cases or s.name in cases]:
            res = run_case(spec, device, numel, rounds)
            title = f"compiled: {spec.name}, {spec.describe}, {N_PARAMS} x {numel:,} ({res['rounds']} rounds)"
            print_table(
                title + "; EMA cost = time / compiled inner - 1", res["rows"], TIME_COLS, label="step"
            )
            cols = KERNEL_COLS + ([Col("CUDA kernels", "cuda_kernels", "d")] if device.type == "cuda" else [])
            print_table(f"kernels: {spec.name}", res["kernels"], cols, label="step")
            res["verdicts"] = verdicts(res)
            for line in res["verdicts"]:
                print("   " + line)
            out["cases"][spec.name] = res
            if save is not None:
                save(out)
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    """``python benchmarks/compiled.py``: this suite alone, a JSON file written after each case
    (what ``gpu_check.sh`` runs, so that a time limit keeps the cases done)."""
    import argparse
    import json
    import pathlib

    from _timing import device_info, use_clock

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, no claims")
    parser.add_argument("--cases", nargs="*", default=None, help=" ".join(s.name for s in SPECS))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    use_clock(args.clock, device)
    info = {**device_info(device), "clock": args.clock if device.type == "cpu" else "wall"}
    threads = f"{info['threads']} threads"
    print(f"# {info['device']} ({device.type}, {threads}), torch {info['torch']}, {info['clock']} clock")

    def save(partial: dict) -> None:
        if args.json:
            pathlib.Path(args.json).write_text(
                json.dumps({"info": info, "compiled": partial}, indent=1, default=str)
            )

    return run(device, args.quick, args.rounds or (3 if args.quick else 21), args.cases, save)


if __name__ == "__main__":
    import pathlib
    import sys

    here = pathlib.Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]  # this checkout's ema_optim first, as bench.py does
    main()
