"""How much of the ``ema_device="cpu"`` update is hidden behind training, on CUDA.

    python benchmarks/offload.py                 # CUDA: a 268M-param MLP stack, bf16 params
    python benchmarks/offload.py --layers 8 --width 4096 --dtype float32
    python benchmarks/offload.py --cpu-smoke     # no GPU: run the pipeline on CPU, no claim

Times a whole training step (forward, backward, AdamW step) in four ways, interleaved in
rounds, medians over the rounds:

- ``plain``: AdamW alone;
- ``on-device``: ``EMAOptimizer(AdamW)`` with shadows on the GPU;
- ``offload``: ``EMAOptimizer(AdamW, ema_device="cpu")`` (the update of step k runs
  behind step k+1: staging copy on a side stream, fold on a background thread);
- ``offload-sync``: the same, but waiting for each update at the end of its step (what
  an offload that does not overlap costs).

``hidden`` = 1 - (offload - plain) / (offload-sync - plain): the share of the offload's
cost that the overlap hides. Each timed block of ``--block`` steps ends when the last fold is
done and ``torch.cuda.synchronize()`` returns; that last fold is not hidden, so ``hidden`` is
a slight underestimate.
The fold runs on the CPU: when it takes longer than a training step, the next update waits
for it; ``--every N`` (``update_every``) gives it N steps.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
from torch import nn

from ema_optim import EMAOptimizer, _kernels


def build(args, device, dtype, mode):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    model = nn.Sequential(*layers).to(device, dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if mode == "plain":
        return model, inner
    device_ = None if mode == "on-device" else "cpu"
    return model, EMAOptimizer(inner, decay=0.999, update_every=args.every, ema_device=device_)


def step(model, opt, x, mode):
    model(x).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if mode == "offload-sync":
        opt._rt.offload.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--every", type=int, default=1, help="update_every of the EMA")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: exercise the pipeline on CPU")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        device = torch.device("cpu")
        _kernels.offloaded = lambda shadow_device, param_device: True  # force the pipeline
        args.layers, args.width, args.batch, args.rounds, args.block = 2, min(args.width, 256), 64, 3, 3
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: this benchmark measures GPU/host overlap (try --cpu-smoke)")

    modes = ["plain", "on-device", "offload", "offload-sync"]
    runs = {m: build(args, device, dtype, m) for m in modes}
    x = torch.randn(args.batch, args.width, device=device, dtype=dtype)
    for m in modes:  # warm up: allocations, pinned staging, kernels
        for _ in range(3):
            step(*runs[m], x, m)
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in random.sample(modes, len(modes)):
            model, opt = runs[m]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.block):
                step(model, opt, x, m)
            if m != "plain":  # the block's last fold counts too (and must not run into the next block)
                opt._rt.offload.wait()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[m].append((time.perf_counter() - start) / args.block)
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    n = sum(p.numel() for p in runs["plain"][0].parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; {n / 1e6:.0f}M params, {args.dtype}, "
        f"batch {args.batch}, update_every {args.every}"
    )
    for m in modes:
        print(f"{m:>13}: {med[m]:8.2f} ms/step  ({med[m] / med['plain']:.2f}x plain)")
    cost = med["offload-sync"] - med["plain"]
    if args.cpu_smoke:
        print("CPU smoke run: the pipeline works; there is no device copy to hide, so no claim")
    elif cost > 0:
        print(f"hidden: {1 - (med['offload'] - med['plain']) / cost:.0%} of the offload's cost")


if __name__ == "__main__":
    main()
