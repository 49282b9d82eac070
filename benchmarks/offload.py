"""How much of the ``ema_device="cpu"`` update is hidden behind training, on CUDA.

    python benchmarks/offload.py                 # CUDA: a 268M-param MLP stack, bf16 params
    python benchmarks/offload.py --layers 8 --width 4096 --dtype float32
    python benchmarks/offload.py --cpu-smoke     # no GPU: run the pipeline on CPU, no claim
    python benchmarks/offload.py --json out.json # also write machine-readable results

Times a whole training step (forward, backward, AdamW step) in four ways, interleaved in
rounds (``_timing.interleaved``: shuffled order, medians over the rounds):

- ``plain``: AdamW alone;
- ``on-device``: ``EMAOptimizer(AdamW)`` with shadows on the GPU;
- ``offload``: ``EMAOptimizer(AdamW, ema_device="cpu")`` (the update of step k runs
  behind step k+1: staging copy on a side stream, fold on a background thread);
- ``offload-sync``: the same, but waiting for each update at the end of its step (what
  an offload that does not overlap costs).

``hidden`` = 1 - (offload - plain) / (offload-sync - plain): the share of the offload's
cost that the overlap hides. Each timed block of ``--block`` steps ends when the last fold is
done and ``torch.cuda.synchronize()`` returns; that last fold is not hidden, so ``hidden`` is
a slight underestimate. Waiting for a fold uses the public API: ``state_dict()`` waits for it.
The fold runs on the CPU: when it takes longer than a training step, the next update waits
for it; ``--every N`` (``update_every``) gives it N steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]  # this checkout's ema_optim, and the helpers here

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import device_info, interleaved, median  # noqa: E402
from ema_optim import EMAOptimizer  # noqa: E402

MODES = ["plain", "on-device", "offload", "offload-sync"]


def build(args, device, dtype, mode):
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    model = nn.Sequential(*layers).to(device, dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if mode == "plain":
        return model, inner
    ema_device = None if mode == "on-device" else "cpu"
    return model, EMAOptimizer(inner, decay=0.999, update_every=args.every, ema_device=ema_device)


def block(model, opt, x, mode, steps):
    """``steps`` training steps; the block's last fold counts too (and must not run into the next)."""

    def run():
        for _ in range(steps):
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mode == "offload-sync":
                opt.state_dict()  # waits for this step's fold
        if mode != "plain":
            opt.state_dict()

    return run


def force_pipeline_on_cpu() -> None:
    """CPU smoke only: make CPU shadows of CPU params take the offload pipeline (a private seam)."""
    from ema_optim import _kernels

    if not hasattr(_kernels, "offloaded"):
        raise SystemExit("--cpu-smoke: ema_optim._kernels.offloaded is gone; update this smoke test")
    _kernels.offloaded = lambda shadow_device, param_device: True


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--every", type=int, default=1, help="update_every of the EMA")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: exercise the pipeline on CPU")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.width, args.batch, args.rounds, args.block = 2, min(args.width, 256), 64, 3, 3
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    dtype = getattr(torch, args.dtype)
    if args.cpu_smoke:
        device = torch.device("cpu")
        force_pipeline_on_cpu()
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: this benchmark measures GPU/host overlap (try --cpu-smoke)")
    runs = {m: build(args, device, dtype, m) for m in MODES}
    x = torch.randn(args.batch, args.width, device=device, dtype=dtype)
    fns = {m: block(*runs[m], x, m, args.block) for m in MODES}
    samples = interleaved(fns, device, args.rounds, number=1, budget_s=300.0)
    med = {m: median(s) / args.block * 1e3 for m, s in samples.items()}  # ms per step
    n = sum(p.numel() for p in runs["plain"][0].parameters())
    info = device_info(device)
    print(
        f"device: {info['device']}; torch {info['torch']}; {n / 1e6:.0f}M params, {args.dtype}, "
        f"batch {args.batch}, update_every {args.every}"
    )
    for m in MODES:
        print(f"{m:>13}: {med[m]:8.2f} ms/step  ({med[m] / med['plain']:.2f}x plain)")
    cost = med["offload-sync"] - med["plain"]
    hidden = 1 - (med["offload"] - med["plain"]) / cost if cost > 0 else None
    if args.cpu_smoke:
        print("CPU smoke run: the pipeline works; there is no device copy to hide, so no claim")
        hidden = None
    elif hidden is not None:
        print(f"hidden: {hidden:.0%} of the offload's cost")
    out = {"info": info, "params": n, "args": vars(args), "ms_per_step": med, "hidden": hidden}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
