"""A mean teacher: the EMA of the weights as a teacher, run at every training step.

    python examples/teacher.py                    # about 30 s on 2 CPU cores
    python examples/teacher.py --steps 100        # a smoke test, a few seconds
    python examples/teacher.py --plot teacher.png # also draw the accuracy curves (matplotlib)

Semi-supervised classification on synthetic data made with torch: 10 classes of clustered
32-d points, 5 labelled examples per class and 20,000 unlabelled ones. The mean teacher
(Tarvainen and Valpola, arXiv:1703.01780) trains the student on the labelled batch plus a
consistency loss: the student's predictions on noisy unlabelled points must match the
teacher's on the same points with other noise, where the teacher is the EMA of the
student's weights.

Three runs from the same initial weights, with the same batches and noise, step by step
(interleaved, so their timings are comparable):

- supervised: the labelled loss only (no teacher);
- functional_call: the teacher is ``functional_call(model, ema_state_dict(opt, model), (x,))``,
  the shadows bound to the model for one call, no copy;
- swap: the teacher is ``model(x)`` inside ``opt.swap_ema_weights()``.

The last two must agree bit for bit (same teacher outputs, hence the same training); the
table shows the largest difference seen, the validation accuracy, and the time per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _plot import plot_curves
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ema_optim import EMAOptimizer, ema_state_dict

CLASSES, FEATURES, LABELLED_PER_CLASS = 10, 32, 5


def make_data(seed: int) -> tuple[tuple[Tensor, Tensor], Tensor, tuple[Tensor, Tensor]]:
    """Labelled, unlabelled and validation sets: each class a few Gaussian clusters."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(CLASSES, 3, FEATURES, generator=gen)  # 3 clusters per class

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=gen)
        k = torch.randint(0, 3, (n,), generator=gen)
        return centres[y, k] + 1.2 * torch.randn(n, FEATURES, generator=gen), y

    x, y = sample(4000)
    keep = torch.cat([torch.nonzero(y == c)[:LABELLED_PER_CLASS, 0] for c in range(CLASSES)])
    unlabelled, _ = sample(20000)
    return (x[keep], y[keep]), unlabelled, sample(5000)


def build(seed: int, decay: float) -> tuple[nn.Module, EMAOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
    )
    return model, EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4), decay=decay)


def rampup(step: int, length: int) -> float:
    """The consistency weight's sigmoid ramp-up of the paper: exp(-5 (1 - t)^2), t = step / length."""
    t = min(step / length, 1.0)
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, tensors: dict[str, Tensor] | None = None) -> float:
    logits = model(x) if tensors is None else functional_call(model, tensors, (x,))
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--consistency", type=float, default=20.0, help="the weight after the ramp-up")
    parser.add_argument("--plot", metavar="FILE.png", help="draw validation accuracy against steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    (xl, yl), unlabelled, (xv, yv) = make_data(args.seed)
    runs = {name: build(args.seed, args.decay) for name in ("supervised", "functional_call", "swap")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    max_diff = 0.0
    checkpoints = sorted({max(1, args.steps * k // 6) for k in range(1, 7)})
    curves: dict[str, list[float]] = {"supervised": [], "student": [], "teacher": []}

    print(f"{len(yl)} labelled, {len(unlabelled)} unlabelled, decay={args.decay}; validation accuracy (%)\n")
    print("| step | supervised | student | teacher (EMA) | max abs teacher diff, functional_call vs swap |")
    print("|---:|---:|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the same draws for every run
        i = torch.randint(0, len(yl), (50,), generator=gen)
        j = torch.randint(0, len(unlabelled), (200,), generator=gen)
        u = unlabelled[j]
        u_student = u + 0.5 * torch.randn(u.shape, generator=gen)
        u_teacher = u + 0.5 * torch.randn(u.shape, generator=gen)
        weight = args.consistency * rampup(step, args.steps // 3)
        teachers = {}
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(xl[i]), yl[i])
            if name != "supervised":
                with torch.no_grad():
                    if name == "functional_call":
                        teacher = functional_call(
                            model, ema_state_dict(opt, model), (u_teacher,), tie_weights=False
                        )
                    else:
                        with opt.swap_ema_weights():
                            teacher = model(u_teacher)
                teachers[name] = teacher
                consistency = (model(u_student).softmax(1) - teacher.softmax(1)).square().sum(1).mean()
                loss = loss + weight * consistency
            loss.backward()
            opt.step()
            opt.zero_grad()
            seconds[name].append(time.perf_counter() - t0)
        max_diff = max(max_diff, (teachers["functional_call"] - teachers["swap"]).abs().max().item())
        if step in checkpoints:
            model, opt = runs["functional_call"]
            row = [
                accuracy(runs["supervised"][0], xv, yv),
                accuracy(model, xv, yv),
                accuracy(model, xv, yv, ema_state_dict(opt, model)),
            ]
            for key, value in zip(curves, row):
                curves[key].append(value)
            print(f"| {step} | " + " | ".join(f"{a:.1f}" for a in row) + f" | {max_diff:.1e} |", flush=True)

    same = all(
        torch.equal(p, q)
        for p, q in zip(runs["functional_call"][0].parameters(), runs["swap"][0].parameters())
    )
    print(f"\nfunctional_call and swap runs end with identical weights: {same}")
    print("\n| run | ms per step (median) |")
    print("|---|---:|")
    for name, times in seconds.items():
        print(f"| {name} | {1e3 * statistics.median(times):.2f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.plot:
        plot_curves(checkpoints, curves, args.plot, "step", "validation accuracy (%)")


if __name__ == "__main__":
    main()
