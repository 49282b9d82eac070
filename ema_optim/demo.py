"""Does an EMA of the weights beat the online model? The reference regression experiment.

    python -m ema_optim.demo                  # 3-20 s on 2 CPU cores, 75-150 epochs
    python -m ema_optim.demo --plot demo.png  # also draw the curves (needs matplotlib)
    python -m ema_optim.demo --json --quiet   # last stdout line: the results as JSON

A small MLP learns a noisy linear target with Adam; `EMAOptimizer` keeps the EMA of its
weights inside the optimizer state. Every epoch both the online (training) weights and the
EMA weights are scored on the same validation set, so the report compares the two models
trained by the very same run. The demo reports what it measures: the EMA is not assumed to
win, and on some seeds the online model ends with the lower loss (docs/demo_results.md).

The schedule in steps: 1,600 training samples / batch 32 = 50 optimizer steps per epoch.
The first 100 steps (2 epochs) the shadows just copy the weights; then the decay follows
`schedules.warmup(max_decay=0.999, power=2/3)`, i.e. 1 - (1 + t) ** (-2/3) after t EMA
updates: 0.9 at t=30, 0.99 at t=1,000 (epoch 22), 0.995 at t=2,800 (epoch 58). A weight's
influence halves after about 0.69 / (1 - decay) updates: ~1.4 epochs at 0.99, ~2.8 at 0.995.
The cap 0.999 would only be reached after 31.6K updates (epoch 634), past the 500-epoch limit.

References:
    Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", 1992.
    Kingma and Ba, "Adam: A method for stochastic optimization", arXiv:1412.6980.
    The data mimics scikit-learn's `make_regression` + `train_test_split` + `StandardScaler`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ema_optim import EMAOptimizer, schedules


@dataclass(frozen=True)
class Config:
    n_samples: int = 2000  # before the split: 1,600 train / 400 validation
    n_features: int = 20
    n_informative: int = 10  # the target depends on 10 of the 20 features only
    noise: float = 0.1  # std of the Gaussian noise added to the raw target (whose std is ~180)
    val_fraction: float = 0.2
    hidden: tuple[int, int] = (64, 32)
    dropout: float = 0.2  # the weights jitter from batch to batch: something for the EMA to smooth
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32  # 50 steps per epoch
    max_decay: float = 0.999  # warmup() cap; see the module docstring for what it means in steps
    power: float = 2 / 3
    update_after_step: int = 100  # 2 epochs of plain copying: skip the initial transient
    lr_factor: float = 0.5  # ReduceLROnPlateau on the EMA validation loss
    lr_patience: int = 10
    max_epochs: int = 500
    early_stop: int = 20  # stop after this many epochs without a new best EMA validation loss
    std_window: int = 30  # val_loss_std: std of the per-epoch validation loss over the last 30 epochs
    log_every: int = 10  # print a table row every 10 epochs


DEFAULT = Config()


# -----------------------------------------------------------------------------
# data


def make_data(seed: int, cfg: Config = DEFAULT) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Synthetic linear regression, standardised: (x_train, y_train, x_val, y_val).

    How it matches `make_regression(n_samples=2000, n_features=20, n_informative=10, noise=0.1)`
    followed by an 80/20 `train_test_split` and a `StandardScaler` fitted on the training split
    (one for X, one for y): make_regression draws X ~ N(0, 1), puts coefficients 100 * U(0, 1)
    on the first 10 features, adds N(0, noise^2) to y = X @ coef (bias 0) and then shuffles the
    rows and the feature columns. Here the 10 informative columns are picked at random instead
    (the same distribution as shuffling the columns); the rows are i.i.d., so shuffling them
    changes nothing, and a random permutation does the train_test_split. The scaler's mean and
    population std (ddof=0, like StandardScaler) come from the training rows only and are
    applied to both splits. Same distribution as the sklearn pipeline, not the same numbers
    (those come from numpy's random generator).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.n_samples, cfg.n_features, generator=g)  # (N, F)
    coef = torch.zeros(cfg.n_features)
    informative = torch.randperm(cfg.n_features, generator=g)[: cfg.n_informative]
    coef[informative] = 100.0 * torch.rand(cfg.n_informative, generator=g)
    y = x @ coef + cfg.noise * torch.randn(cfg.n_samples, generator=g)  # (N,)

    perm = torch.randperm(cfg.n_samples, generator=g)
    n_val = round(cfg.n_samples * cfg.val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    x_train, x_val, y_train, y_val = x[train], x[val], y[train], y[val]

    x_mean, x_std = x_train.mean(0), x_train.std(0, correction=0)
    y_mean, y_std = y_train.mean(), y_train.std(correction=0)
    x_train, x_val = (x_train - x_mean) / x_std, (x_val - x_mean) / x_std
    y_train, y_val = (y_train - y_mean) / y_std, (y_val - y_mean) / y_std
    return x_train, y_train.unsqueeze(1), x_val, y_val.unsqueeze(1)  # y: (N, 1)


# -----------------------------------------------------------------------------
# model and optimizer


def build_model(cfg: Config = DEFAULT) -> nn.Sequential:
    """MLP 20-64-ReLU-Dropout-32-ReLU-Dropout-1, Xavier-normal weights, zero biases."""
    h1, h2 = cfg.hidden
    model = nn.Sequential(
        nn.Linear(cfg.n_features, h1),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(h2, 1),
    )
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build_optimizer(model: nn.Module, cfg: Config = DEFAULT) -> EMAOptimizer:
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = schedules.warmup(max_decay=cfg.max_decay, power=cfg.power)
    return EMAOptimizer(adam, decay=decay, update_after_step=cfg.update_after_step)


# -----------------------------------------------------------------------------
# training and evaluation


def train_epoch(model, opt, x, y, batch_size, gen) -> float:
    """One pass over the shuffled training set; returns the mean training loss (dropout on)."""
    model.train()
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    total = torch.zeros((), device=x.device)  # summed on the device: no sync per batch
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()  # Adam step, then the EMA update of every shadow
        opt.zero_grad()
        total += loss.detach() * len(idx)
    return total.item() / len(x)


@torch.no_grad()
def evaluate(model, x, y) -> dict[str, float]:
    """Full-batch MSE, MAE and R² of the model's current weights (dropout off)."""
    model.eval()
    pred = model(x)
    mse = nn.functional.mse_loss(pred, y).item()
    mae = nn.functional.l1_loss(pred, y).item()
    r2 = 1.0 - mse / y.var(correction=0).item()  # 1 - SS_res / SS_tot
    return {"mse": mse, "mae": mae, "r2": r2}


def evaluate_both(model, opt, x, y) -> tuple[dict[str, float], dict[str, float]]:
    online = evaluate(model, x, y)
    with opt.swap_ema_weights():  # the model holds the EMA weights inside the block
        ema = evaluate(model, x, y)
    return online, ema


class Progress:
    """A one-line progress bar on stderr, redrawn with '\\r'; off when stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.width = total, enabled, 0
        self.start = time.perf_counter()

    def update(self, epoch: int, text: str) -> None:
        if not self.enabled:
            return
        filled = 20 * epoch // self.total
        bar = "#" * filled + "." * (20 - filled)
        line = f"[{bar}] epoch {epoch}/{self.total} {text} ({time.perf_counter() - self.start:.0f}s)"
        sys.stderr.write("\r" + line.ljust(self.width))  # pad over a longer previous line
        sys.stderr.flush()
        self.width = len(line)

    def clear(self) -> None:
        """Erase the bar so that a line printed next starts clean."""
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def train(cfg: Config, seed: int, device: str, show_progress: bool, log_rows: bool) -> dict:
    """Train once; returns the per-epoch history and the final online and EMA metrics."""
    x_train, y_train, x_val, y_val = (t.to(device) for t in make_data(seed, cfg))
    torch.manual_seed(seed)  # model init and dropout masks
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, cfg)
    # The LR follows the EMA's validation loss: the EMA is the model we would ship.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.lr_factor, patience=cfg.lr_patience)
    shuffle = torch.Generator().manual_seed(seed + 1)  # batch order, apart from the data draw

    history: dict[str, list[float]] = {k: [] for k in ("train", "online", "ema", "online_r2", "ema_r2")}
    best, since_best, stopped_early = math.inf, 0, False
    progress = Progress(cfg.max_epochs, show_progress)
    header = "epoch | train loss | online val loss | online R² | EMA val loss |  EMA R²"
    if log_rows:
        print(header)
        print("-" * len(header))
    for epoch in range(1, cfg.max_epochs + 1):
        train_loss = train_epoch(model, opt, x_train, y_train, cfg.batch_size, shuffle)
        online, ema = evaluate_both(model, opt, x_val, y_val)
        plateau.step(ema["mse"])
        for key, value in zip(history, (train_loss, online["mse"], ema["mse"], online["r2"], ema["r2"])):
            history[key].append(value)

        progress.update(
            epoch, f"train {train_loss:.4f} | val online {online['mse']:.4f} ema {ema['mse']:.4f}"
        )
        if log_rows and (epoch % cfg.log_every == 0 or epoch == 1):
            progress.clear()
            print(
                f"{epoch:5d} | {train_loss:10.5f} | {online['mse']:15.5f} | {online['r2']:9.5f} | "
                f"{ema['mse']:12.5f} | {ema['r2']:7.5f}",
                flush=True,
            )

        # Early stopping on the EMA validation loss (any decrease counts as an improvement).
        if ema["mse"] < best:
            best, since_best = ema["mse"], 0
        else:
            since_best += 1
            if since_best >= cfg.early_stop:
                stopped_early = True
                break
    progress.clear()

    # Final metrics: the models as they are when training stops (not the best epoch's), so that
    # online and EMA are compared at the same moment.
    online["val_loss_std"] = _tail_std(history["online"], cfg.std_window)
    ema["val_loss_std"] = _tail_std(history["ema"], cfg.std_window)
    return {
        "online": online,
        "ema": ema,
        "epochs": epoch,
        "history": history,
        "stopped_early": stopped_early,
    }


def _tail_std(values: list[float], window: int) -> float:
    """Population std (ddof=0, like numpy's np.std) of the last `window` values (all if fewer)."""
    tail = torch.tensor(values[-window:], dtype=torch.float64)
    return tail.std(correction=0).item()


# -----------------------------------------------------------------------------
# reporting


def print_summary(result: dict, cfg: Config) -> None:
    """The final table: online vs EMA, and the EMA's relative change (+ = EMA better)."""
    online, ema, epochs = result["online"], result["ema"], result["epochs"]
    why = (
        f"early stop: no EMA improvement for {cfg.early_stop} epochs"
        if result["stopped_early"]
        else "max epochs"
    )
    print(f"\nfinal validation metrics after {epochs} epochs ({why})")
    print(f"{'metric':<20} {'online':>12} {'EMA':>12} {'EMA vs online':>14}  (+: EMA better)")
    rows = [
        ("MSE", "mse", -1),  # sign: -1 where lower is better
        ("MAE", "mae", -1),
        ("R²", "r2", +1),
        (f"val_loss_std ({cfg.std_window} ep)", "val_loss_std", -1),
    ]
    for name, key, sign in rows:
        a, b = online[key], ema[key]
        change = sign * (b - a) / abs(a) * 100 if a != 0 else float("nan")
        print(f"{name:<20} {a:12.6f} {b:12.6f} {change:+13.2f}%")
    winner = "EMA" if ema["mse"] < online["mse"] else "online" if online["mse"] < ema["mse"] else "tie"
    print(f"lower final validation MSE: {winner}")


def save_plot(history: dict, path: str, plt) -> None:
    """Validation loss (log scale) and R² per epoch, online vs EMA."""
    epochs = range(1, len(history["online"]) + 1)
    fig, (ax_loss, ax_r2) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, history["train"], color="0.7", lw=1, label="train (dropout on)")
    ax_loss.plot(epochs, history["online"], lw=1, label="online val")
    ax_loss.plot(epochs, history["ema"], lw=1.5, label="EMA val")
    ax_loss.set(xlabel="epoch", ylabel="MSE (standardised target)", yscale="log", title="loss")
    ax_loss.legend()
    ax_r2.plot(epochs, history["online_r2"], lw=1, label="online")
    ax_r2.plot(epochs, history["ema_r2"], lw=1.5, label="EMA")
    # Zoom on the interesting part: R² starts far below and ends near 1.
    low = min(history["online_r2"][len(history["online_r2"]) // 10 :] + history["ema_r2"][-1:])
    ax_r2.set(xlabel="epoch", ylabel="validation R²", ylim=(max(low - 0.01, -1.0), 1.0005), title="R²")
    ax_r2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def import_pyplot():
    """matplotlib is an optional extra: import it only for --plot, before training starts."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])", file=sys.stderr)
        raise SystemExit(2) from None
    return plt


# -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ema_optim.demo", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the init, dropout and batch order")
    p.add_argument(
        "--epochs", type=int, default=DEFAULT.max_epochs, help="max epochs (early stopping may end sooner)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--plot", metavar="FILE.png", help="save the loss and R² curves (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last stdout line")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch rows")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    plt = import_pyplot() if args.plot else None
    cfg = Config(max_epochs=args.epochs)
    # Batches of 32 x 64 are far too small to split across threads: on 2 busy cores one thread
    # ran the demo in ~2 s where two took 20-35 s (idle: 3 s either way). Restored on return.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        result = train(
            cfg,
            seed=args.seed,
            device=args.device,
            show_progress=not args.quiet and sys.stderr.isatty(),
            log_rows=not args.quiet,
        )
    finally:
        torch.set_num_threads(threads)
    print_summary(result, cfg)
    print(f"({time.perf_counter() - t0:.1f}s, torch {torch.__version__}, {args.device})")
    if plt is not None:
        save_plot(result["history"], args.plot, plt)
        print(f"saved {args.plot}")
    if args.json:
        keys = ("mse", "mae", "r2", "val_loss_std")
        summary = {
            "online": {k: result["online"][k] for k in keys},
            "ema": {k: result["ema"][k] for k in keys},
            "epochs": result["epochs"],
        }
        print(json.dumps(summary), flush=True)
    return result


if __name__ == "__main__":
    main()
