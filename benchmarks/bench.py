"""Time ONE EMA update of ema_optim against every EMA peer that installs from PyPI.

    python benchmarks/bench.py                  # defaults: < 5 min on 2 CPU cores
    python benchmarks/bench.py --full           # bigger shapes (10,000 small tensors)
    python benchmarks/bench.py --json out.json  # also write machine-readable results
    python benchmarks/bench.py --candidates     # fast-path candidates for the kernels

Cases: a few large fp32 tensors, thousands of small fp32 tensors, a small
``torch.nn.TransformerEncoder``, and bf16 params with fp32 shadows. Methods:

- ``ema_optim.lerp_``: the kernel call over the optimizer's cached groups;
- ``ema_optim.step``: ``EMAOptimizer.step()`` minus the inner step alone (inner: SGD
  with no grads, i.e. the wrapper's whole bookkeeping plus the kernel);
- peers: ``torch.optim.swa_utils.AveragedModel`` + ``get_ema_multi_avg_fn``, timm
  ``ModelEmaV3``, ``ema_pytorch.EMA``, ``torch_ema.ExponentialMovingAverage``, diffusers
  ``EMAModel(foreach=True)``, and a hand-written per-tensor ``lerp_`` loop.

Timing: every method of a case (and a large ``dst.copy_(src)`` that gives the device's
copy bandwidth in the same run) is timed in interleaved rounds, in a shuffled order;
each number is the median over the rounds. CUDA is synchronised around every timed
block. Bytes moved by one update = read shadow + write shadow + read param; the floor is
those bytes at the measured copy bandwidth.

Memory: ``state MB`` is the persistent memory each method allocates (shadows, and for
peers that deep-copy the model, its buffers too). ``temp MB`` is the memory freshly
allocated by one update (the outputs of every op that are not views of its inputs,
counted with a dispatch mode; on CPU this is the only per-update measure, since
tracemalloc does not see tensor memory). On CUDA ``peak MB`` adds the
``torch.cuda.max_memory_allocated`` delta of building the method and running an update.

The peers go in the ``bench`` extra: ``pip install -e ".[bench]" torch==<your torch>``.
A peer that does not install or import is reported as ``skipped: <reason>``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import pathlib
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

DECAY = 0.999
WEIGHT = 1.0 - DECAY
MB = 1e6
ERR_STEPS = 50  # updates over which the candidates' rounding error accumulates


# ------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Seconds per call of ``fn``, over ``number`` back-to-back calls, device synchronised."""
    sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return (time.perf_counter() - start) / number


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    min_block_s: float = 0.02,
    budget_s: float = 25.0,
) -> dict[str, list[float]]:
    """Seconds per call of every fn, one sample per interleaved round (shuffled order).

    Stops after ``budget_s`` once 5 rounds are done, so that a loaded machine still
    finishes in bounded time (fewer rounds, same interleaving).
    """
    numbers = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocations, lazy init, caches
        t = time_once(fn, device, 1)
        numbers[name] = max(1, min(50, math.ceil(min_block_s / max(t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    for r in range(rounds):
        if r >= 5 and time.perf_counter() - start > budget_s:
            break
        # a fresh order each round: no method always follows the same one (cache effects)
        order = rng.sample(names, len(names))
        for name in order:
            samples[name].append(time_once(fns[name], device, numbers[name]))
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def paired(samples: list[float], base: list[float]) -> float:
    """Median over rounds of (sample - base of the same round): cancels slow drifts of the load."""
    return statistics.median(a - b for a, b in zip(samples, base))


def copy_fn(device: torch.device, numel: int) -> tuple[Callable[[], Any], int]:
    """A large ``dst.copy_(src)`` and the bytes it moves (read + write)."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.nbytes


class AllocCounter(TorchDispatchMode):
    """Counts the bytes of every op output that is not a view of (or the same as) an input."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def temp_bytes(fn: Callable[[], Any]) -> int:
    with AllocCounter() as counter:
        fn()
    return counter.bytes


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------ cases


class ParamList(nn.Module):
    """A model that is just a list of parameters (what the peers that deep-copy need)."""

    def __init__(self, n: int, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ps = nn.ParameterList(
            nn.Parameter(torch.randn(numel, device=device).to(dtype)) for _ in range(n)
        )


@dataclass
class Case:
    name: str
    model: nn.Module
    describe: str
    train: bool = False  # also measure the training-step overhead on this case

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @property
    def mixed(self) -> bool:
        return self.params[0].dtype in (torch.bfloat16, torch.float16)

    def update_bytes(self) -> int:
        shadow = 4 if self.mixed else None
        return sum((2 * (shadow or p.element_size()) + p.element_size()) * p.numel() for p in self.params)


def transformer(device: torch.device, dtype: torch.dtype, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).to(device, dtype)


def make_cases(device: torch.device, full: bool, only: Optional[list[str]]) -> list[Case]:
    torch.manual_seed(0)
    n_small = 10_000 if (full or device.type == "cuda") else 2_000
    big = (16 if full else 4) << 20
    layers = 6 if full else 4
    builders = {
        "large": lambda: Case(
            "large", ParamList(4, big, torch.float32, device), f"4 x {big >> 20}M fp32", train=True
        ),
        "small": lambda: Case(
            "small", ParamList(n_small, 4096, torch.float32, device), f"{n_small:,} x 4096 fp32"
        ),
        "transformer": lambda: Case(
            "transformer",
            transformer(device, torch.float32, layers),
            f"TransformerEncoder d512 x{layers} fp32",
            train=True,
        ),
        "bf16": lambda: Case(
            "bf16", ParamList(4, big, torch.bfloat16, device), f"4 x {big >> 20}M bf16, fp32 shadows"
        ),
        "bf16-transformer": lambda: Case(
            "bf16-transformer",
            transformer(device, torch.bfloat16, layers),
            f"TransformerEncoder d512 x{layers} bf16, fp32 shadows",
        ),
    }
    names = only or list(builders)
    cases = []
    for name in names:
        case = builders[name]()
        for p in case.params:
            p.grad = torch.randn_like(p) * 1e-2
        cases.append(case)
    return cases


# ------------------------------------------------------------------------------ methods


class Skip(Exception):
    """This method cannot run here; the message says why."""


@dataclass
class Method:
    update: Callable[[], Any]  # one EMA update
    state: list = field(default_factory=list)  # the persistent tensors it allocated
    inner_only: Optional[Callable[[], Any]] = None  # for ema_optim.step: the inner step alone
    note: str = ""


_IMPORT_NOTES: dict[str, str] = {}


def _quarantine_torchvision() -> None:
    """Several peers import torchvision when it is installed. PyPI's torchvision wheel is a
    CUDA build whose C ops do not load into a CPU-only torch; treat it as absent then."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: the package is unusable
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        _IMPORT_NOTES["torchvision"] = f"torchvision does not load ({type(e).__name__}: {str(e)[:80]})"


def _import(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"cannot import {module}.{attr}: {type(e).__name__}: {str(e)[:120]}") from e


def _timm_model_ema_v3() -> tuple[Any, str]:
    try:
        return _import("timm.utils.model_ema", "ModelEmaV3"), ""
    except Skip as first:
        # `import timm` pulls in torchvision; model_ema.py itself needs torch only.
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.origin is None:
            raise
        path = pathlib.Path(spec.origin).parent / "utils" / "model_ema.py"
        try:
            mod_spec = importlib.util.spec_from_file_location("_bench_timm_model_ema", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            raise first from None
        return module.ModelEmaV3, "timm/utils/model_ema.py loaded alone (`import timm` failed: torchvision)"


def m_ema_optim_kernel(case: Case) -> Method:
    from ema_optim import EMAOptimizer, _kernels

    opt = EMAOptimizer(torch.optim.SGD(case.params, lr=0.0), decay=DECAY)
    grads = [p.grad for p in case.params]
    for p in case.params:
        p.grad = None
    opt.step()  # creates the shadows (SGD skips params without grads)
    for p, g in zip(case.params, grads):
        p.grad = g
    groups = opt._ema_groups()

    @torch.no_grad()  # as inside EMAOptimizer.step()
    def update():
        _kernels.lerp_(groups, WEIGHT)

    return Method(update, [s for g in groups for s in g.shadows])


def m_ema_optim_step(case: Case) -> Method:
    """The whole wrapper step around an inner step that does nothing (SGD, no grads)."""
    from ema_optim import EMAOptimizer

    params = list(case.model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    opt = EMAOptimizer(torch.optim.SGD(params, lr=0.0), decay=DECAY)
    opt.step()

    def run(fn):
        def call():
            saved = [p.grad for p in params]
            for p in params:
                p.grad = None
            fn()
            for p, g in zip(params, saved):
                p.grad = g

        return call

    for p, g in zip(params, grads):
        p.grad = g
    shadows = [opt.state[p]["ema"] for p in params]
    return Method(run(opt.step), shadows, inner_only=run(opt.optimizer.step), note="step - inner step")


def m_swa(case: Case) -> Method:
    AveragedModel = _import("torch.optim.swa_utils", "AveragedModel")
    get_ema_multi_avg_fn = _import("torch.optim.swa_utils", "get_ema_multi_avg_fn")
    avg = AveragedModel(case.model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=False)
    if case.mixed:
        avg.module.float()
    try:
        avg.update_parameters(case.model)  # first call copies
        avg.update_parameters(case.model)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"fp32 shadows of bf16 params fail: {type(e).__name__}: {str(e)[:90]}") from e
    return Method(lambda: avg.update_parameters(case.model), list(avg.state_dict().values()))


def m_timm(case: Case) -> Method:
    ModelEmaV3, note = _timm_model_ema_v3()
    ema = ModelEmaV3(case.model, decay=DECAY, dtype=torch.float32 if case.mixed else None, foreach=True)
    ema.update(case.model)
    return Method(lambda: ema.update(case.model), list(ema.module.state_dict().values()), note=note)


def m_ema_pytorch(case: Case) -> Method:
    EMA = _import("ema_pytorch", "EMA")
    kwargs: dict[str, Any] = {}
    if case.mixed:  # fp32 EMA model, online weights cast on every update
        kwargs = dict(ema_model=copy.deepcopy(case.model).float(), coerce_dtype=True)
    ema = EMA(case.model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=True, **kwargs)
    ema.update()  # the first update copies
    ema.update()
    state = list(ema.ema_model.state_dict().values()) + [ema.initted, ema.step]
    return Method(ema.update, state, note="use_foreach=True" + (", coerce_dtype=True" if case.mixed else ""))


def m_torch_ema(case: Case) -> Method:
    ExponentialMovingAverage = _import("torch_ema", "ExponentialMovingAverage")
    params = case.params
    ema = ExponentialMovingAverage(params, decay=DECAY, use_num_updates=False)
    if case.mixed:
        ema.to(dtype=torch.float32)
    ema.update(params)
    return Method(lambda: ema.update(params), list(ema.shadow_params))


def m_diffusers(case: Case) -> Method:
    EMAModel = _import("diffusers.training_utils", "EMAModel")
    params = case.params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema = EMAModel(params, decay=DECAY, foreach=True, use_ema_warmup=False)
    if case.mixed:
        ema.to(dtype=torch.float32)
    try:
        ema.step(params)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"update fails: {type(e).__name__}: {str(e)[:90]}") from e
    return Method(lambda: ema.step(params), list(ema.shadow_params), note="foreach=True")


def m_loop(case: Case) -> Method:
    params = [p.detach() for p in case.params]
    shadows = [p.float() if case.mixed else p.clone() for p in params]

    @torch.no_grad()
    def update():
        for e, p in zip(shadows, params):
            e.lerp_(p if p.dtype == e.dtype else p.to(e.dtype), WEIGHT)

    return Method(update, shadows, note="lerp_(p.to(fp32)) per tensor" if case.mixed else "")


OURS = {
    "ema_optim.lerp_": m_ema_optim_kernel,
    "ema_optim.step": m_ema_optim_step,
}
PEERS = {
    "swa_utils": m_swa,
    "timm.ModelEmaV3": m_timm,
    "ema_pytorch": m_ema_pytorch,
    "torch_ema": m_torch_ema,
    "diffusers": m_diffusers,
    "loop lerp_": m_loop,
}


def build(name: str, factory: Callable[[Case], Method], case: Case, device: torch.device):
    """Build a method; returns (method or None, skip reason, CUDA peak bytes or None)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method = factory(case)
    except Skip as e:
        return None, str(e), None
    except Exception as e:  # noqa: BLE001 - a peer's own failure is a skip, not a crash
        return None, f"{type(e).__name__}: {str(e)[:120]}", None
    peak = None
    if device.type == "cuda":
        method.update()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return method, "", peak


# ------------------------------------------------------------------------------ runs


def bench_case(case: Case, device: torch.device, rounds: int, copy_numel: int) -> dict:
    names = list(OURS) + list(PEERS)
    methods: dict[str, Method] = {}
    rows: dict[str, dict] = {}
    for name in names:
        factory = {**OURS, **PEERS}[name]
        method, reason, peak = build(name, factory, case, device)
        if method is None:
            rows[name] = {"skipped": reason}
            continue
        methods[name] = method
        rows[name] = {
            "state_bytes": tensor_bytes(method.state),
            "temp_bytes": temp_bytes(method.update),
            "peak_bytes": peak,
            "note": method.note,
        }
    fns: dict[str, Callable[[], Any]] = {}
    for name, m in methods.items():
        fns[name] = m.update
        if m.inner_only is not None:
            fns[name + "/inner"] = m.inner_only
    copy_call, copy_bytes = copy_fn(device, copy_numel)
    fns["copy_"] = copy_call
    samples = interleaved(fns, device, rounds)
    bandwidth = copy_bytes / median(samples["copy_"])
    moved = case.update_bytes()
    floor = moved / bandwidth
    for name, m in methods.items():
        if m.inner_only is not None:
            t = paired(samples[name], samples[name + "/inner"])
        else:
            t = median(samples[name])
        rows[name].update(seconds=t, x_floor=t / floor, min_seconds=min(samples[name]))
    peer_times = {n: rows[n]["seconds"] for n in PEERS if "seconds" in rows[n]}
    best = min(peer_times, key=peer_times.get) if peer_times else None
    libs = {n: t for n, t in peer_times.items() if n != "loop lerp_"}
    best_lib = min(libs, key=libs.get) if libs else None
    for name in methods:
        rows[name]["x_best_peer"] = rows[name]["seconds"] / peer_times[best] if best else None
        rows[name]["x_best_library"] = rows[name]["seconds"] / libs[best_lib] if best_lib else None
    return {
        "case": case.name,
        "describe": case.describe,
        "tensors": len(case.params),
        "numel": sum(p.numel() for p in case.params),
        "bytes_moved": moved,
        "copy_bandwidth": bandwidth,
        "floor_seconds": floor,
        "best_peer": best,
        "best_library": best_lib,
        "methods": rows,
    }


def bench_train(case: Case, device: torch.device, rounds: int) -> dict:
    """Inner AdamW step + EMA update vs the inner step alone."""
    from ema_optim import EMAOptimizer

    foreach = device.type == "cuda"  # CPU: torch's default (a for-loop); CUDA: foreach
    inner = torch.optim.AdamW(case.params, lr=1e-4, foreach=foreach or None)
    inner.step()  # create AdamW's state before anyone copies the model
    wrapper = EMAOptimizer(inner, decay=DECAY)
    wrapper.step()
    fns: dict[str, Callable[[], Any]] = {"inner AdamW": inner.step, "ema_optim": wrapper.step}
    skipped = {}
    for name, factory in PEERS.items():
        method, reason, _ = build(name, factory, case, device)
        if method is None:
            skipped[name] = reason
            continue
        update = method.update
        fns[name] = lambda update=update: (inner.step(), update())
    samples = interleaved(fns, device, rounds)
    base = median(samples["inner AdamW"])
    rows = {}
    for name, s in samples.items():
        extra = paired(s, samples["inner AdamW"])
        rows[name] = {"seconds": median(s), "overhead_seconds": extra, "overhead": extra / base}
    rows.update({name: {"skipped": reason} for name, reason in skipped.items()})
    return {
        "case": case.name,
        "describe": case.describe,
        "inner": f"AdamW(foreach={foreach or None})",
        "methods": rows,
    }


# ------------------------------------------------------------------------------ candidates


# Candidate (c) is what ema_optim does for mixed groups since these measurements
# (ema_optim._kernels.plan_casts / _cast_lerp_): params cast into a small fp32 scratch,
# then one foreach lerp_. It is timed here through ema_optim's own kernels.


def _bf16_candidates(device: torch.device, shapes: dict[str, list[int]]) -> list[dict]:
    """bf16 params, fp32 shadows: candidate update paths; time and error vs float64."""
    return [_bf16_candidates_one(device, label, numels) for label, numels in shapes.items()]


def _bf16_candidates_one(device: torch.device, label: str, numels: list[int]) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(numel, device=device).to(torch.bfloat16) for numel in numels]
    init = [torch.randn(numel, device=device) for numel in numels]
    w_t = torch.tensor(WEIGHT, device=device)

    def mul_add(s):
        torch._foreach_mul_(s, 1.0 - WEIGHT)
        torch._foreach_add_(s, params, alpha=WEIGHT)

    def per_tensor_cast(s):
        for si, p in zip(s, params):
            si.lerp_(p.float(), WEIGHT)

    def chunked(cap):
        # Plan once (as the optimizer caches its groups): pack param pieces into a
        # bounded fp32 scratch; per step one foreach copy (the cast) + one foreach lerp_
        # per scratch fill. The scratch is `cap` elements, not model-sized.
        scratch = torch.empty(cap, device=device)
        plans: dict[int, list] = {}

        def plan(s):
            batches, vs, vp, used = [], [], [], 0
            for si, p in zip(s, params):
                for a, b in zip(si.view(-1).split(cap), p.view(-1).split(cap)):
                    if used + b.numel() > cap:
                        batches.append((vs, vp, list(scratch[:used].split([v.numel() for v in vp]))))
                        vs, vp, used = [], [], 0
                    vs.append(a)
                    vp.append(b)
                    used += b.numel()
            if vp:
                batches.append((vs, vp, list(scratch[:used].split([v.numel() for v in vp]))))
            return batches

        def run(s):
            key = s[0].data_ptr()
            if key not in plans:
                plans[key] = plan(s)
            for vs, vp, buf in plans[key]:
                torch._foreach_copy_(buf, vp)
                torch._foreach_lerp_(vs, buf, WEIGHT)

        return run

    groups: dict[int, list] = {}

    def ema_optim_path(s):
        from ema_optim import _kernels

        key = s[0].data_ptr()
        if key not in groups:
            groups[key] = _kernels.group_pairs(s, params)
        _kernels.lerp_(groups[key], WEIGHT)

    def cast_lerp(s_list, p_list, w):
        torch._foreach_lerp_(s_list, [p.float() for p in p_list], [w] * len(s_list))

    compiled = torch.compile(cast_lerp, backend="inductor", dynamic=False)

    candidates = {
        "(a) foreach mul_ + add_(alpha) [ema_optim before]": mul_add,
        "(b) per-tensor lerp_(p.float())": per_tensor_cast,
        "(c) cast into a bounded scratch + foreach lerp_ [ema_optim now]": ema_optim_path,
        "(c') 4 MB scratch, every param split into pieces": chunked(1 << 20),
        "(d) torch.compile(inductor) cast+lerp": lambda s: compiled(s, params, w_t),
    }
    row: dict[str, Any] = {"shape": label, "paths": {}}
    for name, fn in candidates.items():
        shadows = [t.clone() for t in init]
        start = time.perf_counter()
        try:
            fn(shadows)  # warm-up (compile for (d))
        except Exception as e:  # noqa: BLE001
            row["paths"][name] = {"skipped": f"{type(e).__name__}: {str(e)[:100]}"}
            continue
        first = time.perf_counter() - start
        shadows = [t.clone() for t in init]
        fn(shadows)
        ref = [i.double() + WEIGHT * (p.double() - i.double()) for i, p in zip(init, params)]
        err1 = max((s.double() - r).abs().max().item() for s, r in zip(shadows, ref))
        shadows = [t.clone() for t in init]
        ref = [i.double() for i in init]
        for _ in range(ERR_STEPS):
            fn(shadows)
            ref = [r + WEIGHT * (p.double() - r) for r, p in zip(ref, params)]
        err_n = max((s.double() - r).abs().max().item() for s, r in zip(shadows, ref))
        del ref
        row["paths"][name] = {
            "first_call_s": first,
            "err_1": err1,
            "err_n": err_n,
            "temp_bytes": None if name.startswith("(d)") else temp_bytes(lambda fn=fn, s=shadows: fn(s)),
            "_fn": (lambda fn=fn, s=shadows: fn(s)),
        }
    fns = {k: v["_fn"] for k, v in row["paths"].items() if "_fn" in v}
    for k, s in interleaved(fns, device, rounds=11).items():
        row["paths"][k]["seconds"] = median(s)
        del row["paths"][k]["_fn"]
    return row


def _fp32_candidates(device: torch.device, shapes: list[tuple[int, int]]) -> list[dict]:
    return [_fp32_candidates_one(device, n, numel) for n, numel in shapes]


def _fp32_candidates_one(device: torch.device, n: int, numel: int) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(numel, device=device) for _ in range(n)]
    shadows = [torch.randn(numel, device=device) for _ in range(n)]
    w_t = torch.tensor(WEIGHT, device=device)
    ws = [w_t] * n
    fns = {
        "_foreach_lerp_(scalar w) [current]": lambda: torch._foreach_lerp_(shadows, params, WEIGHT),
        "_foreach_lerp_([w0dim]*n)": lambda: torch._foreach_lerp_(shadows, params, ws),
        "_foreach_mul_ + _foreach_add_(alpha)": lambda: (
            torch._foreach_mul_(shadows, 1.0 - WEIGHT),
            torch._foreach_add_(shadows, params, alpha=WEIGHT),
        ),
    }
    samples = interleaved(fns, device, rounds=11)
    return {"shape": f"{n} x {numel}", "paths": {k: {"seconds": median(s)} for k, s in samples.items()}}


def run_candidates(device: torch.device) -> dict:
    out = {
        "bf16": _bf16_candidates(
            device,
            {
                "4 x 4M": [4 << 20] * 4,
                "512 x 16K": [1 << 14] * 512,
                "TransformerEncoder d512 x4 (48 tensors)": [
                    p.numel() for p in transformer(torch.device("meta"), torch.float32, 4).parameters()
                ],
            },
        ),
        "fp32": _fp32_candidates(device, [(4, 4 << 20), (2000, 4096)]),
    }
    for kind in ("bf16", "fp32"):
        for row in out[kind]:
            print(f"\n[{kind} candidates] {row['shape']}")
            for name, r in row["paths"].items():
                if "skipped" in r:
                    print(f"  {name:<52} skipped: {r['skipped']}")
                    continue
                extra = ""
                if "err_1" in r:
                    temp = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / MB:.1f}"
                    extra = (
                        f"  err1 {r['err_1']:.2e}  err{ERR_STEPS} {r['err_n']:.2e}  temp MB {temp}"
                        f"  first call {r['first_call_s']:.2f} s"
                    )
                print(f"  {name:<52} {r['seconds'] * 1e3:9.3f} ms{extra}")
    return out


# ------------------------------------------------------------------------------ output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def fmt_mb(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / MB:.1f}"


def print_case(res: dict, device: torch.device) -> None:
    print(
        f"\n== {res['case']}: {res['describe']} ({res['tensors']:,} tensors, "
        f"{res['numel'] / 1e6:.1f}M elements); moves {res['bytes_moved'] / MB:.0f} MB/update; "
        f"copy bandwidth {res['copy_bandwidth'] / 1e9:.1f} GB/s "
        f"-> floor {res['floor_seconds'] * 1e3:.2f} ms; best peer: {res['best_peer']}"
    )
    peak = device.type == "cuda"
    print(
        f"   {'method':<20} {'ms/update':>10} {'x floor':>8} {'x best peer':>11} "
        f"{'state MB':>9} {'temp MB':>8}" + (f" {'peak MB':>8}" if peak else "") + "  note"
    )
    for name, r in res["methods"].items():
        if "skipped" in r:
            print(f"   {name:<20} skipped: {r['skipped']}")
            continue
        xbp = "-" if r["x_best_peer"] is None else f"{r['x_best_peer']:.2f}"
        print(
            f"   {name:<20} {r['seconds'] * 1e3:10.3f} {r['x_floor']:8.2f} {xbp:>11} "
            f"{fmt_mb(r['state_bytes']):>9} "
            f"{fmt_mb(r['temp_bytes']):>8}"
            + (f" {fmt_mb(r['peak_bytes']):>8}" if peak else "")
            + f"  {r['note']}"
        )


def print_train(res: dict) -> None:
    print(f"\n== training step: {res['case']} ({res['describe']}), inner {res['inner']}")
    print(f"   {'method':<20} {'ms/step':>9} {'EMA ms':>8} {'overhead':>9}")
    for name, r in res["methods"].items():
        if "skipped" in r:
            print(f"   {name:<20} skipped: {r['skipped']}")
            continue
        print(
            f"   {name:<20} {r['seconds'] * 1e3:9.2f} {r['overhead_seconds'] * 1e3:8.2f} "
            f"{r['overhead'] * 100:8.1f}%"
        )


def goals(results: list[dict]) -> list[str]:
    lines = []
    for res in results:
        r = res["methods"]
        for ours in OURS:
            x = r.get(ours, {}).get("x_best_peer")
            if x is None:
                continue
            verdict = "met" if x <= 1.0 else ("within 5% (noise)" if x <= 1.05 else "NOT met")
            xl = r[ours]["x_best_library"] or float("nan")
            lines.append(
                f"{res['case']:<17} {ours:<20} {x:5.2f} x best peer ({res['best_peer']}): {verdict:<17}"
                f" | {xl:5.2f} x best library ({res['best_library']})"
            )
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="bigger shapes (10,000 small tensors, 4 x 16M)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per case (default 11 CPU, 21 CUDA)"
    )
    parser.add_argument(
        "--cases", nargs="*", default=None, help="large small transformer bf16 bf16-transformer"
    )
    parser.add_argument("--no-train", action="store_true", help="skip the training-step overhead")
    parser.add_argument("--candidates", action="store_true", help="only time the kernel fast-path candidates")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    rounds = args.rounds or (21 if device.type == "cuda" else 11)
    copy_numel = (64 << 20) if device.type == "cuda" else (32 << 20)  # 256 / 128 MB: past any cache
    _quarantine_torchvision()
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "notes": dict(_IMPORT_NOTES),
    }
    print(f"# {info['device']} ({device.type}, {info['threads']} threads), torch {info['torch']}")
    for note in _IMPORT_NOTES.values():
        print(f"# note: {note}")
    out: dict[str, Any] = {"info": info}
    start = time.perf_counter()
    if args.candidates:
        out["candidates"] = run_candidates(device)
    else:
        out["cases"], out["train"] = [], []
        for case in make_cases(device, args.full, args.cases):
            res = bench_case(case, device, rounds, copy_numel)
            print_case(res, device)
            out["cases"].append(res)
            if case.train and not args.no_train:
                res = bench_train(case, device, rounds)
                print_train(res)
                out["train"].append(res)
            del case
        out["goals"] = goals(out["cases"])
        print("\n== goal: no slower than the best peer on every shape")
        for line in out["goals"]:
            print("   " + line)
    print(f"\n# total {time.perf_counter() - start:.0f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
