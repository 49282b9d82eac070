"""Post-hoc EMA: train once, then choose the averaging length by sweeping sigma_rel.

    python examples/posthoc_sweep.py                    # under a minute on 2 CPU cores
    python examples/posthoc_sweep.py --plot sweep.png   # also draw the sweep (needs matplotlib)

A small MLP learns a noisy nonlinear target from a stream of fresh batches with Adam at a
constant learning rate, so its weights jitter from batch to batch. The optimizer tracks two
power-function EMAs (sigma_rel 0.05 and 0.10, EDM2's choice) and a snapshot of both is saved every ``--every``
updates. After training, ``posthoc.reconstruct`` rebuilds the EMA for a sweep of sigma_rel
from those snapshots, and each is scored on a held-out set, next to the online model and
the two tracked shadows. See docs/posthoc.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import ema_optim.posthoc as posthoc
from ema_optim import EMAOptimizer, schedules

TRACKED = (0.05, 0.10)
SWEEP = (0.02, 0.03, 0.05, 0.075, 0.10, 0.125, 0.15, 0.20, 0.25)


class Task:
    """Regression on a stream of fresh samples: x ~ N(0, 1)^16, y = teacher(x) + N(0, noise^2).

    The teacher is a fixed random one-hidden-layer tanh net; the best possible MSE is
    ``noise ** 2 = 0.25``. Fresh batches every step mean no overfitting: what separates the
    models is how well they average out the batch-to-batch jitter of the weights.
    """

    def __init__(self, seed: int, noise: float = 0.5, n_val: int = 4096) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.w1, self.w2 = (
            torch.randn(16, 32, generator=gen) / 4,
            torch.randn(32, 1, generator=gen) * 3 / 32**0.5,
        )
        self.noise, self.gen = noise, gen
        self.x_val, self.y_val = self.sample(n_val)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 16, generator=self.gen)
        return x, torch.tanh(x @ self.w1) @ self.w2 + self.noise * torch.randn(n, 1, generator=self.gen)


def build(seed: int) -> tuple[nn.Module, EMAOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    decay = tuple(schedules.power(sigma_rel=s) for s in TRACKED)  # shadows 0 and 1
    opt = EMAOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), decay=decay)
    return model, opt


def train(model, opt, task: Task, steps: int, every: int, folder: Path) -> list[Path]:
    """Train for ``steps`` updates; save a snapshot every ``every`` updates. Returns their paths."""
    paths = []
    for step in range(1, steps + 1):
        x, y = task.sample(32)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0:  # one EMA update per step here, so step == ema_updates
            paths.append(folder / f"snapshot-{step:07d}.pt")
            torch.save(posthoc.snapshot(opt, model), paths[-1])
    return paths


@torch.no_grad()
def val_loss(model: nn.Module, task: Task) -> float:
    return nn.functional.mse_loss(model(task.x_val), task.y_val).item()


def score(model, opt, task: Task, paths: list[Path]) -> list[tuple[str, float]]:
    """(label, validation MSE) for the online model, the tracked shadows and the sweep."""
    rows = [("online model", val_loss(model, task))]
    for index, s in enumerate(TRACKED):
        with opt.swap_ema_weights(index=index):
            rows.append((f"tracked      sigma_rel={s:.3f}", val_loss(model, task)))
    training = {k: v.clone() for k, v in model.state_dict().items()}
    for s, ema in zip(SWEEP, posthoc.reconstruct(paths, list(SWEEP))):  # one pass over the files
        model.load_state_dict(ema, strict=False)
        rows.append((f"reconstructed sigma_rel={s:.3f}", val_loss(model, task)))
    model.load_state_dict(training)
    return rows


def plot(rows: list[tuple[str, float]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    swept = [loss for label, loss in rows if label.startswith("reconstructed")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(SWEEP, swept, "o-", label="reconstructed post hoc")
    ax.plot(TRACKED, [rows[1][1], rows[2][1]], "s", ms=9, mfc="none", label="tracked during training")
    ax.axhline(rows[0][1], color="gray", ls="--", label="online model")
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel("validation MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def main(argv=None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training updates")
    parser.add_argument("--every", type=int, default=100, help="save a snapshot every this many updates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the snapshots in DIR (default: a temporary folder)"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw validation loss against sigma_rel")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    task = Task(args.seed)
    model, opt = build(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = train(model, opt, task, args.steps, args.every, folder)
        size = sum(p.stat().st_size for p in paths)
        took = time.perf_counter() - start
        print(f"{args.steps} updates, {len(paths)} snapshots ({size / 2**20:.1f} MiB) in {took:.1f} s")
        rows = score(model, opt, task, paths)
    best = min(rows[3:], key=lambda r: r[1])
    print(f"\n{'model':<32}{'val MSE':>10}")
    for label, loss in rows:
        print(f"{label:<32}{loss:>10.5f}{'  <- best of the sweep' if (label, loss) == best else ''}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
