"""The wrapper's own host work per step, alone: a do-nothing inner optimizer, the EMA kernels
stubbed out, so that nothing but EMAOptimizer's Python bookkeeping is timed.

    python benchmarks/host_only.py            # this checkout
    python benchmarks/host_only.py --repo DIR # another checkout of ema_optim (e.g. an old release)

Per param count: the median over 2,000 interleaved rounds of (wrapped step - inner step), with
the 25-75% range. The inner optimizer keeps no per-param state (the case that cost per param
in 0.1). SPEC: this must not grow with the number of params.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[1]))
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    import torch

    from ema_optim import EMAOptimizer, _kernels

    class Null(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    _kernels.lerp_ = lambda groups, weights: None  # time the bookkeeping, not the kernels
    _kernels.copy_ = lambda groups: None
    print(f"# host work of EMAOptimizer.step, torch {torch.__version__}, {args.repo}")
    for n in (100, 1_000, 10_000):
        params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(n)]
        inner, wrapped = Null(params), EMAOptimizer(Null(params), decay=0.99)
        for _ in range(5):
            wrapped.step()
        rows = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            inner.step()
            t1 = time.perf_counter()
            wrapped.step()
            t2 = time.perf_counter()
            rows.append(((t2 - t1) - (t1 - t0)) * 1e6)
        q25, _, q75 = statistics.quantiles(rows, n=4)
        print(f"{n:>7,} params: {statistics.median(rows):7.1f} us  (q25..q75 {q25:.1f}..{q75:.1f})")


if __name__ == "__main__":
    main()
