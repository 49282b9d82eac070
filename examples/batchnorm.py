"""BatchNorm and the EMA: which running statistics to evaluate the EMA weights with.

    python examples/batchnorm.py            # about a minute on 2 CPU cores
    python examples/batchnorm.py --quick    # a smoke test, a few seconds

A small BatchNorm MLP learns a 10-class task (made with torch) with SGD and momentum. The
optimizer keeps an EMA of the weights and, with ``buffers=model``, of the BatchNorm running
statistics too. At a few points in training the validation accuracy is printed for:

- online: the model as trained (its own running statistics);
- EMA, live statistics: the EMA weights with the online model's running statistics (what
  ``buffers=None`` gives inside ``swap_ema_weights()``);
- EMA, averaged statistics: the EMA weights with the EMA of the running statistics
  (``buffers=model``);
- EMA, update_bn: the EMA weights with statistics recomputed for them by
  ``torch.optim.swa_utils.update_bn`` on the training set (one extra pass over the data).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ema_optim import EMAOptimizer

CLASSES, FEATURES = 10, 32


def make_data(seed: int, n_train: int, n_val: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Features with uneven scales and offsets (so BatchNorm matters); labels from a random teacher net."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(FEATURES, generator=gen))
    offset = 3 * torch.randn(FEATURES, generator=gen)
    w1 = torch.randn(FEATURES, 64, generator=gen) / FEATURES**0.5
    w2 = torch.randn(64, CLASSES, generator=gen)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(n, FEATURES, generator=gen)
        y = (torch.tanh(z @ w1) @ w2 + 0.5 * torch.randn(n, CLASSES, generator=gen)).argmax(1)
        return z * scale + offset, y

    return sample(n_train), sample(n_val)


def build(seed: int, decay: float) -> tuple[nn.Module, EMAOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(FEATURES, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, CLASSES),
    )  # fmt: skip
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return model, EMAOptimizer(inner, decay=decay, buffers=model)  # the running statistics are averaged too


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, tensors: dict[str, Tensor] | None = None) -> float:
    model.eval()
    logits = model(x) if tensors is None else functional_call(model, tensors, (x,))
    model.train()
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def evaluate(
    model: nn.Module, opt: EMAOptimizer, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]
) -> list[float]:
    """Validation accuracy (%): online, EMA with live / averaged / update_bn statistics."""
    online = accuracy(model, *val)
    # EMA weights with the live statistics: the shadows read from the optimizer state,
    # the buffers taken from the model as it is (what buffers=None would swap in).
    ema_params = {name: opt.state[p]["ema"] for name, p in model.named_parameters()}
    live = accuracy(model, *val, tensors=ema_params)
    with opt.swap_ema_weights():  # params and running statistics hold their EMA in here
        averaged = accuracy(model, *val)
        # update_bn recomputes the statistics in place (edits inside the block edit the
        # buffers' EMA): keep the averages, and put them back before leaving.
        kept = {name: b.clone() for name, b in model.named_buffers()}
        loader = torch.utils.data.DataLoader(train[0], batch_size=500)
        torch.optim.swa_utils.update_bn(loader, model)
        recomputed = accuracy(model, *val)
        for name, b in model.named_buffers():
            b.copy_(kept[name])
    return [online, live, averaged, recomputed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decay", type=float, default=0.998)
    args = parser.parse_args()
    steps = 300 if args.quick else 3000
    checkpoints = (30, 100, 300) if args.quick else (100, 300, 1000, 3000)

    start = time.perf_counter()
    train, val = make_data(args.seed, n_train=2000 if args.quick else 20000, n_val=5000)
    model, opt = build(args.seed, args.decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    print(f"decay={args.decay}; validation accuracy (%), {len(val[1])} samples\n")
    print("| step | online | EMA, live statistics | EMA, averaged (buffers=model) | EMA, update_bn |")
    print("|---:|---:|---:|---:|---:|")
    for step in range(1, steps + 1):
        i = torch.randint(0, len(train[1]), (128,), generator=gen)
        loss_fn(model(train[0][i]), train[1][i]).backward()
        opt.step()
        opt.zero_grad()
        if step in checkpoints:
            cells = " | ".join(f"{a:.1f}" for a in evaluate(model, opt, train, val))
            print(f"| {step} | {cells} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
