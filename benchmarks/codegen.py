"""Where the compiled bf16 EMA's cost goes (issue 20): the compiled steps, their C++ edited in one place.

A diagnostic, not a suite of ``bench.py``: it answers what the traced EMA can and cannot change.
CPU only; run it as ``python benchmarks/codegen.py --threads 1`` (process CPU time, interleaved).

Under ``torch.compile``, ``EMAOptimizer(AdamW).step`` fuses the EMA into AdamW's own loop. With
bf16 params, that loop (the inner step's alone too) calls libm's ``powf`` twice per vector
iteration for the bias corrections, and Inductor emits every vector load of an iteration before
any of its arithmetic. Every vector loaded is therefore live across the calls, where all vector
registers are caller-saved: the EMA's fp32 shadow load (two registers at the bf16 width) adds to
what is saved and restored around them. Neither placement is ours to choose: the loads come from
Inductor's code generator, the calls from AdamW's traced code.

Rows (AdamW, bf16 params, fp32 shadows, decay 0.999, 8 x 2M, each step with its own params):

- ``inner``: ``torch.compile(AdamW.step)``, Inductor's code as generated: the baseline;
- ``wrapper``: ``torch.compile(EMAOptimizer(AdamW).step)``, as generated;
- ``wrapper, shadow load moved``: the same C++ with only the shadow's load moved to its first use,
  after the calls (what the kernel would cost if Inductor emitted loads at their use);
- ``inner, no libm`` / ``wrapper, no libm``: each ``std::pow(b, step)`` replaced by ``b``: WRONG
  numbers, timing only (what both would cost if the bias corrections were computed once per
  kernel, outside the loop).
"""

from __future__ import annotations

import contextlib
import re
import statistics
from typing import Any, Callable, Iterator

import torch
import torch._inductor.config
from torch._inductor.async_compile import AsyncCompile

import compiled
from _report import Col, ms, print_table
from _timing import interleaved

_SHADOW_LOAD = re.compile(r"^\s*auto (tmp\d+) = at::vec::VectorizedN<float,2>::loadu\(out_ptr")
_POW = re.compile(r"std::pow\((tmp\d+), (tmp\d+)\)")


def move_shadow_loads(src: str) -> str:
    """The fp32 loads of each loop body moved down to the line that first uses them."""
    out: list[str] = []
    pending: dict[str, str] = {}
    for line in src.split("\n"):
        m = _SHADOW_LOAD.match(line)
        if m:
            pending[m.group(1)] = line
            continue
        for name in [n for n in pending if re.search(rf"\b{n}\b", line)]:
            out.append(pending.pop(name))
        out.append(line)
    assert not pending, "a shadow load with no use"
    return "\n".join(out)


def drop_pow(src: str) -> str:
    return _POW.sub(r"(\1)", src)


EDITS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s,
    "moved": move_shadow_loads,
    "no-libm": drop_pow,
}


@contextlib.contextmanager
def edited(edit: Callable[[str], str]) -> Iterator[list[bool]]:
    """Compile every C++ kernel of the block through ``edit``; yields whether it changed each."""
    real = AsyncCompile.cpp_pybinding
    changed: list[bool] = []

    def cpp_pybinding(self: AsyncCompile, argtypes: list[str], source_code: str) -> Any:
        new = edit(source_code)
        changed.append(new != source_code)
        return real(self, argtypes, new)

    AsyncCompile.cpp_pybinding = cpp_pybinding  # type: ignore[method-assign]
    try:
        yield changed
    finally:
        AsyncCompile.cpp_pybinding = real  # type: ignore[method-assign]


def steps(numel: int) -> dict[str, Callable[[], Any]]:
    from ema_optim import EMAOptimizer

    spec = next(s for s in compiled.SPECS if s.name == "adamw-bf16")
    torch.manual_seed(0)
    values = [torch.randn(numel).to(spec.dtype) for _ in range(compiled.N_PARAMS)]
    grads = [torch.randn(numel).mul_(1e-2).to(spec.dtype) for _ in range(compiled.N_PARAMS)]
    rows = {
        "inner": (False, "none"),
        "wrapper": (True, "none"),
        "wrapper, shadow load moved": (True, "moved"),
        "inner, no libm": (False, "no-libm"),
        "wrapper, no libm": (True, "no-libm"),
    }
    fns = {}
    for name, (wrapped, edit) in rows.items():
        inner = spec.make_inner(compiled._params(values, grads))
        fn = torch.compile(EMAOptimizer(inner, decay=0.999).step if wrapped else inner.step)
        with edited(EDITS[edit]) as changed:
            for _ in range(compiled.WARMUP_CALLS):
                fn()
        assert changed, f"{name}: nothing compiled"
        assert edit == "none" or any(changed), f"{name}: the edit found nothing to change"
        fns[name] = fn
    return fns


def main() -> None:
    import argparse

    from _timing import device_info, use_clock

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, no claims")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    use_clock("cpu", device)
    info = device_info(device)
    print(f"# {info['device']} ({info['threads']} threads), torch {info['torch']}, cpu clock")
    numel = compiled.QUICK_NUMEL if args.quick else compiled.NUMEL["cpu"]
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        fns = steps(numel)
    samples = interleaved(fns, device, args.rounds)
    rows = {}
    for name, s in samples.items():
        ref = samples["inner, no libm" if "no libm" in name else "inner"]
        rows[name] = {"s": statistics.median(s), "cost": statistics.median(a / b - 1 for a, b in zip(s, ref))}
    cols = [ms("ms/step", "s"), Col("over its inner", "cost", "+.2f")]
    print_table(f"AdamW, bf16 params, fp32 shadows, 8 x {numel:,}", rows, cols, label="step")


if __name__ == "__main__":
    import pathlib
    import sys

    here = pathlib.Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    main()
