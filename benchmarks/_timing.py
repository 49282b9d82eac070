"""Timing and memory measurement shared by the benchmark scripts.

One rule for every number: the methods being compared are timed in the same run, in
interleaved rounds (a fresh shuffled order each round, so that no method always follows the
same one), and each reported time is a median over the rounds. Differences between two
methods are medians of the per-round differences (``paired``), which cancels slow drifts of
the machine's load. CUDA is synchronised around every timed block.
"""

from __future__ import annotations

import math
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

MB = 1e6
# "wall": elapsed time (what a user waits for). "cpu": CPU time of this process, all its threads
# (what it spent): on a shared, loaded machine it leaves out the time the process waited for a
# core, so it is far steadier there; CPU only (a GPU's time is not in it).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def use_clock(name: str, device: torch.device) -> None:
    """Pick the timer for every later measurement; CUDA always times the wall clock."""
    global clock
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {name!r}")
    clock = CLOCKS["wall" if device.type == "cuda" else name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Seconds per call of ``fn``, over ``number`` back-to-back calls, device synchronised."""
    sync(device)
    start = clock()
    for _ in range(number):
        fn()
    sync(device)
    return (clock() - start) / number


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int,
    *,
    min_block_s: float = 0.02,
    budget_s: float = 25.0,
    number: Optional[int] = None,
) -> dict[str, list[float]]:
    """Seconds per call of every fn, one sample per interleaved round.

    Each sample times a block of back-to-back calls lasting about ``min_block_s`` (or exactly
    ``number`` calls). Stops after ``budget_s`` once 5 rounds are done, so that a loaded
    machine still finishes in bounded time (fewer rounds, same interleaving).
    """
    numbers = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocations, lazy init, caches
        t = time_once(fn, device, 1)
        numbers[name] = number or max(1, min(50, math.ceil(min_block_s / max(t, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(0)
    start = time.perf_counter()
    for r in range(rounds):
        if r >= 5 and time.perf_counter() - start > budget_s:
            break
        for name in rng.sample(list(fns), len(fns)):
            samples[name].append(time_once(fns[name], device, numbers[name]))
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def differences(samples: list[float], *bases: list[float]) -> list[float]:
    """Per round: the sample minus the bases of the same round."""
    return [s - sum(b) for s, *b in zip(samples, *bases)]


def paired(samples: list[float], *bases: list[float]) -> float:
    """Median over rounds of (sample - bases of the same round): cancels slow drifts of the load."""
    return statistics.median(differences(samples, *bases))


def quartiles(values: list[float]) -> tuple[float, float]:
    """The 25% and 75% points: how far apart the rounds were (the noise of a median)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


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
    """Bytes freshly allocated by one call of ``fn`` (what tracemalloc cannot see on CPU)."""
    with AllocCounter() as counter:
        fn()
    return counter.bytes


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """CUDA only: the ``max_memory_allocated`` rise during one call of ``fn``."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of distinct storages among ``tensors`` (non-tensors are ignored)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def python_calls(fn: Callable[[], Any]) -> int:
    """Python and C function calls made by one call of ``fn`` (this thread): a noise-free
    count of host work, for telling work that grows with the param count from noise."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
