"""Time ONE EMA update of ema_optim against every EMA peer that installs from PyPI.

    python benchmarks/bench.py                     # CPU defaults: a few minutes on 2 cores
    python benchmarks/bench.py --quick             # tiny shapes, every suite: a smoke test
    python benchmarks/bench.py --device cuda       # the GPU shapes (1B fp32, 10,000 x 4096, bf16)
    python benchmarks/bench.py --cases small bf16  # named cases only (see CASES)
    python benchmarks/bench.py --suites host swa   # only some suites (see SUITES)
    python benchmarks/bench.py --suites compiled --clock cpu --threads 1   # the compiled step
    python benchmarks/bench.py --json out.json     # also write machine-readable results
    python benchmarks/bench.py --candidates        # fast-path candidates for the kernels

Suites:

- ``updates``: per case (the CASES table: tensor shapes, dtype, device), one update of every
  method, against the copy ceiling measured in the same run (``torch._foreach_copy_`` of the
  same shapes). ``ema_optim.step`` is ``EMAOptimizer.step()`` minus the inner step alone
  (SGD with its grads hidden: the wrapper's whole bookkeeping plus the kernel); the peers
  are the PEERS table of ``_peers.py``. Bytes moved by one update = read shadow + write
  shadow + read param (12 B/param fp32, 10 B/param bf16 -> fp32 shadows); ``x floor`` is the
  time over those bytes at the copy bandwidth. ``state MB``: the persistent memory of each
  method; ``temp MB``: bytes freshly allocated by one update (counted with a dispatch mode);
  on CUDA ``peak MB``: the ``max_memory_allocated`` rise of building it and one update.
  Cases marked ``train`` also time inner AdamW + EMA against AdamW alone.
- ``host``, ``swa``: the wrapper's host overhead and its EMA cost against ``swa_utils``
  (``overhead.py``).
- ``shadows``: the update with 1, 2 and 3 shadows (``shadows.py``).
- ``compiled``: ``torch.compile``'d steps: the compiled inner step against the compiled wrapper
  and a one-graph reference, their Inductor kernels and recompiles (``compiled.py``; not in the
  default suites: it compiles for minutes on 2 cores).

Timing: ``_timing.py`` (interleaved rounds, shuffled order, medians). On a loaded machine,
``--clock cpu`` times the process's CPU time instead of the wall clock (what was spent, not
what was waited), and ``--threads 1`` keeps OpenMP spin-waits out of it. The peers go in the
``bench`` extra: ``pip install -e ".[bench]" torch==<your torch>``. A peer that does not
install or import is reported as ``skipped: <reason>``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]  # this checkout's ema_optim, and the helpers here

import torch  # noqa: E402

import _peers  # noqa: E402
from _peers import (  # noqa: E402
    PEERS,
    REFERENCES,
    Case,
    Method,
    ParamList,
    build,
    ema_optim_step,
    peer_method,
    transformer_shapes,
)
from _report import Col, mb, ms, print_table, ratio  # noqa: E402
from _timing import (  # noqa: E402
    device_info,
    interleaved,
    median,
    paired,
    temp_bytes,
    tensor_bytes,
    use_clock,
)


def n_of(n: int, numel: int) -> tuple[tuple[int, ...], ...]:
    return ((numel,),) * n


@dataclass(frozen=True)
class CaseSpec:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    sets: tuple[str, ...]  # default selections it belongs to: "cpu", "full", "cuda", "quick"
    describe: str
    train: bool = False


FP32, BF16 = torch.float32, torch.bfloat16
CASES = [
    CaseSpec("large", n_of(4, 4 << 20), FP32, ("cpu",), "4 x 4M fp32", train=True),
    CaseSpec("small", n_of(2000, 4096), FP32, ("cpu",), "2,000 x 4096 fp32"),
    CaseSpec(
        "transformer", transformer_shapes(4), FP32, ("cpu",), "TransformerEncoder d512 x4 shapes, fp32", True
    ),
    CaseSpec("bf16", n_of(4, 4 << 20), BF16, ("cpu",), "4 x 4M bf16, fp32 shadows"),
    CaseSpec(
        "bf16-transformer", transformer_shapes(4), BF16, ("cpu",), "TransformerEncoder d512 x4 shapes, bf16"
    ),
    CaseSpec("large-16M", n_of(4, 16 << 20), FP32, ("full",), "4 x 16M fp32"),
    CaseSpec("small-10k", n_of(10_000, 4096), FP32, ("full", "cuda"), "10,000 x 4096 fp32"),
    CaseSpec("gpu-1b", n_of(200, 5_000_000), FP32, ("cuda",), "1B params fp32 in 200 tensors"),
    CaseSpec(
        "gpu-bf16", n_of(200, 2_500_000), BF16, ("cuda",), "500M params bf16 in 200 tensors, fp32 shadows"
    ),
    CaseSpec("quick-large", n_of(4, 1 << 16), FP32, ("quick",), "4 x 64K fp32", train=True),
    CaseSpec("quick-small", n_of(300, 256), FP32, ("quick",), "300 x 256 fp32"),
    CaseSpec("quick-bf16", n_of(4, 1 << 16), BF16, ("quick",), "4 x 64K bf16, fp32 shadows"),
]
BY_NAME = {c.name: c for c in CASES}


def select(names: Optional[list[str]], sets: list[str]) -> list[CaseSpec]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return [c for c in CASES if set(c.sets) & set(sets)]


def make_case(spec: CaseSpec, device: torch.device) -> Case:
    torch.manual_seed(0)
    return Case(spec.name, spec.describe, ParamList(list(spec.shapes), spec.dtype, device), spec.train)


# ------------------------------------------------------------------------------ runs


def methods_for(case: Case) -> dict[str, Callable[[], Method]]:
    out: dict[str, Callable[[], Method]] = {"ema_optim.step": lambda: ema_optim_step(case)}
    out.update({name: (lambda peer=peer: peer_method(peer, case)) for name, peer in PEERS.items()})
    return out


def copy_ceiling(case: Case) -> tuple[Callable[[], Any], int]:
    """``_foreach_copy_`` of shadow-sized tensors of the case's shapes, and the bytes it moves."""
    dtype = torch.float32 if case.mixed else case.params[0].dtype
    src = [torch.rand(p.shape, device=p.device).to(dtype) for p in case.params]
    dst = [torch.empty_like(s) for s in src]
    return (lambda: torch._foreach_copy_(dst, src)), 2 * tensor_bytes(src)


def bench_case(case: Case, device: torch.device, rounds: int) -> dict:
    methods: dict[str, Method] = {}
    rows: dict[str, dict] = {}
    for name, make in methods_for(case).items():
        method, reason, peak = build(make, device)
        if method is None:
            rows[name] = {"skipped": reason}
            continue
        methods[name] = method
        state = tensor_bytes(method.state)
        rows[name] = {"state_bytes": state, "temp_bytes": temp_bytes(method.update), "peak_bytes": peak}
        rows[name]["note"] = method.note
    fns = {name: m.update for name, m in methods.items()}
    fns.update({name + "/inner": m.inner_only for name, m in methods.items() if m.inner_only})
    fns["copy"], copy_bytes = copy_ceiling(case)
    samples = interleaved(fns, device, rounds)
    bandwidth = copy_bytes / median(samples["copy"])
    moved = case.update_bytes()
    for name, m in methods.items():
        t = paired(samples[name], samples[name + "/inner"]) if m.inner_only else median(samples[name])
        rows[name].update(seconds=t, x_floor=t * bandwidth / moved, gbps=moved / t / 1e9)
    peer_times = {n: rows[n]["seconds"] for n in PEERS if "seconds" in rows[n]}
    libs = {n: t for n, t in peer_times.items() if n not in REFERENCES}
    best = min(peer_times, key=peer_times.get) if peer_times else None
    best_lib = min(libs, key=libs.get) if libs else None
    for row in rows.values():
        if "seconds" in row:
            row["x_best_peer"] = row["seconds"] / peer_times[best] if best else None
            row["x_best_library"] = row["seconds"] / libs[best_lib] if best_lib else None
    return {
        "case": case.name,
        "describe": case.describe,
        "tensors": len(case.params),
        "numel": sum(p.numel() for p in case.params),
        "bytes_moved": moved,
        "copy_bandwidth": bandwidth,
        "floor_seconds": moved / bandwidth,
        "best_peer": best,
        "best_library": best_lib,
        "methods": rows,
    }


def bench_train(case: Case, device: torch.device, rounds: int) -> dict:
    """Inner AdamW step + EMA update vs the inner step alone."""
    from ema_optim import EMAOptimizer

    for p in case.params:
        p.grad = torch.randn_like(p) * 1e-2
    foreach = device.type == "cuda" or None  # CPU: torch's default (a for-loop); CUDA: foreach
    inner = torch.optim.AdamW(case.params, lr=1e-4, foreach=foreach)
    inner.step()  # create AdamW's state before anyone copies the model
    wrapper = EMAOptimizer(inner, decay=_peers.DECAY)
    wrapper.step()
    fns: dict[str, Callable[[], Any]] = {"inner AdamW": inner.step, "ema_optim": wrapper.step}
    rows: dict[str, dict] = {}
    for name, peer in PEERS.items():
        method, reason, _ = build(lambda peer=peer: peer_method(peer, case), device)
        if method is None:
            rows[name] = {"skipped": reason}
        else:
            fns[name] = lambda update=method.update: (inner.step(), update())
    samples = interleaved(fns, device, rounds)
    base = median(samples["inner AdamW"])
    for name, s in samples.items():
        extra = paired(s, samples["inner AdamW"])
        rows[name] = {"seconds": median(s), "overhead_seconds": extra, "overhead": extra / base}
    for p in case.params:
        p.grad = None
    return {
        "case": case.name,
        "describe": case.describe,
        "inner": f"AdamW(foreach={foreach})",
        "methods": rows,
    }


# ------------------------------------------------------------------------------ output


CASE_COLS = [
    ms("ms/update", "seconds"),
    ratio("x floor", "x_floor"),
    Col("GB/s", "gbps", ".1f"),
    ratio("x best peer", "x_best_peer"),
    mb("state MB", "state_bytes"),
    mb("temp MB", "temp_bytes"),
]
PEAK_COLS = [mb("peak MB", "peak_bytes")]
NOTE_COLS = [Col("note", "note", width=1)]
TRAIN_COLS = [
    ms("ms/step", "seconds", ".2f"),
    ms("EMA ms", "overhead_seconds", ".2f"),
    Col("overhead", "overhead", ".1%"),
]


def print_case(res: dict, device: torch.device) -> None:
    title = (
        f"{res['case']}: {res['describe']} ({res['tensors']:,} tensors, {res['numel'] / 1e6:.1f}M elements); "
        f"moves {res['bytes_moved'] / 1e6:.0f} MB/update; "
        f"copy bandwidth {res['copy_bandwidth'] / 1e9:.1f} GB/s "
        f"-> floor {res['floor_seconds'] * 1e3:.2f} ms; best peer: {res['best_peer']}"
    )
    cols = CASE_COLS + (PEAK_COLS if device.type == "cuda" else []) + NOTE_COLS
    print_table(title, res["methods"], cols)


def print_train(res: dict) -> None:
    print_table(
        f"training step: {res['case']} ({res['describe']}), inner {res['inner']}", res["methods"], TRAIN_COLS
    )


def goals(results: list[dict]) -> list[str]:
    lines = []
    for res in results:
        r = res["methods"].get("ema_optim.step", {})
        if r.get("x_best_peer") is None:
            continue
        x, xl = r["x_best_peer"], r["x_best_library"] or float("nan")
        verdict = "met" if x <= 1.0 else ("within 5% (noise)" if x <= 1.05 else "NOT met")
        lines.append(
            f"{res['case']:<17} {x:5.2f} x best peer ({res['best_peer']}): {verdict:<17}"
            f" | {xl:5.2f} x best library ({res['best_library']})"
        )
    return lines


def run_updates(device: torch.device, args: argparse.Namespace, rounds: int) -> dict:
    sets = (
        ["quick"] if args.quick else (["cuda"] if device.type == "cuda" else ["cpu"] + (["full"] * args.full))
    )
    out: dict[str, Any] = {"cases": [], "train": []}
    for spec in select(args.cases, sets):
        case = make_case(spec, device)
        res = bench_case(case, device, rounds)
        print_case(res, device)
        out["cases"].append(res)
        if case.train and not args.no_train:
            res = bench_train(case, device, rounds)
            print_train(res)
            out["train"].append(res)
        args.save(out)  # a later case that hangs or crashes keeps this one
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["goals"] = goals(out["cases"])
    print("\n== goal: ema_optim.step no slower than the best peer on every shape")
    for line in out["goals"]:
        print("   " + line)
    return out


def _suite(module: str, function: str = "run") -> Callable[..., dict]:
    def run(device: torch.device, args: argparse.Namespace, rounds: int) -> dict:
        return getattr(importlib.import_module(module), function)(device, quick=args.quick, rounds=rounds)

    return run


SUITES = {
    "updates": run_updates,
    "host": _suite("overhead", "run_host"),
    "swa": _suite("overhead", "run_swa"),
    "shadows": _suite("shadows"),
    "candidates": _suite("candidates"),
    "compiled": _suite("compiled"),
}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cases", nargs="*", default=None, help=" ".join(BY_NAME))
    parser.add_argument(
        "--suites", nargs="*", default=["updates", "host", "swa", "shadows"], help=" ".join(SUITES)
    )
    parser.add_argument(
        "--full", action="store_true", help="also the bigger CPU shapes (4 x 16M, 10,000 x 4096)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: a smoke test")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 11 CPU, 21 CUDA)"
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training-step overhead")
    parser.add_argument("--candidates", action="store_true", help="only the kernel fast-path candidates")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="wall time, or the process's CPU time"
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    use_clock(args.clock, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    rounds = args.rounds or (3 if args.quick else 21 if device.type == "cuda" else 11)
    suites = ["candidates"] if args.candidates else args.suites
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    _peers.quarantine_torchvision()
    info = {
        **device_info(device),
        "clock": args.clock if device.type == "cpu" else "wall",
        "notes": dict(_peers.IMPORT_NOTES),
    }
    print(
        f"# {info['device']} ({device.type}, {info['threads']} threads), torch {info['torch']}, "
        f"{info['date']}, {info['clock']} clock"
    )
    for note in info["notes"].values():
        print(f"# note: {note}")
    out: dict[str, Any] = {"info": info}

    def save(partial: dict) -> None:  # written as results come: a later hang keeps what was measured
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({**out, **partial}, indent=1, default=str))

    args.save = save
    start = time.perf_counter()
    for suite in suites:
        result = SUITES[suite](device, args, rounds)
        out.update(result if suite == "updates" else {suite: result})
        save({})
    print(f"\n# total {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
