"""The teacher step: a training step plus one forward of the EMA model, three ways.

    python benchmarks/teacher.py                 # ~3 min on 2 cores
    python benchmarks/teacher.py --clock cpu     # on a loaded machine: CPU time, not wall time
    python benchmarks/teacher.py --quick         # a smoke test

Teacher step = student forward + backward + optimizer step (AdamW) + one teacher forward
(``no_grad``) of the EMA model, as in a mean teacher / DINO / BYOL loop, on two models: a small
CNN with BatchNorm (teacher in eval mode, averaged running statistics) and a small transformer
encoder (no BatchNorm). Methods, each with its own model, the same input:

- ``ema_state_dict``: ``EMAOptimizer`` (``buffers=model`` for the CNN); the teacher is
  ``functional_call(model, ema_state_dict(opt, model), (x,))`` (torch's default
  ``tie_weights=True``), and ``tie_weights=False`` (exact here: the dict holds every tied name);
- ``swap``: the teacher is ``model(x)`` inside ``opt.swap_ema_weights()``;
- ``separate copy``: what timm's ``ModelEmaV3`` and ``AveragedModel`` do: plain AdamW, a
  deep-copied teacher module updated after each step by one ``torch._foreach_lerp_`` over its
  float params and buffers, and ``teacher(x)``;
- ``student only``: the training step without any EMA or teacher (the floor).

Then ``ema_state_dict`` alone, per call, for 10 to 10,000 params (all averaged, so every entry
is a shadow): wall time, and the Python and C function calls it makes (``sys.setprofile``), a
noise-free count of host work. And what ``functional_call`` itself costs per entry there.

``functional_call's own cost`` is timed apart: ``functional_call`` of the EMA dict minus the
plain forward of the same module (paired per round). All methods run in the same rounds, in a
shuffled order each round; medians over rounds; ratios are to ``separate copy``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from _timing import device_info, interleaved, median, paired, python_calls, quartiles, use_clock
from ema_optim import EMAOptimizer, ema_state_dict

DECAY = 0.999


def cnn() -> nn.Module:
    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(
        block(3, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32), block(32, 64), nn.MaxPool2d(2),
        block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 128)
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, 256)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)))


CASES = {
    # name: (model factory, input, teacher in eval mode)
    "CNN + BatchNorm": (cnn, lambda g: torch.randn(32, 3, 32, 32, generator=g), True),
    "transformer": (Transformer, lambda g: torch.randint(0, 256, (16, 32), generator=g), False),
}


def loss_of(out: Tensor) -> Tensor:
    return out.float().square().mean()


def methods(make: type | object, x: Tensor, teacher_eval: bool) -> dict[str, object]:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return make()  # type: ignore[operator]

    def ema(buffers: bool) -> tuple[nn.Module, EMAOptimizer]:
        model = fresh()
        opt = EMAOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-4), decay=DECAY, buffers=model if buffers else None
        )
        return model, opt

    def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss_of(model(x)).backward()
        opt.step()
        opt.zero_grad()

    def in_mode(model: nn.Module, forward):  # the teacher's forward in eval mode (CNN) or as is
        if not teacher_eval:
            return forward()
        model.eval()
        try:
            return forward()
        finally:
            model.train()

    fns: dict[str, object] = {}
    for name, tie in (
        ("ema_state_dict + functional_call", True),
        ("ema_state_dict + functional_call(tie_weights=False)", False),
    ):
        model, opt = ema(teacher_eval)

        def step(model=model, opt=opt, tie=tie) -> None:
            train(model, opt)
            with torch.no_grad():
                in_mode(
                    model, lambda: functional_call(model, ema_state_dict(opt, model), (x,), tie_weights=tie)
                )

        fns[name] = step

    model, opt = ema(teacher_eval)

    def swap(model=model, opt=opt) -> None:
        train(model, opt)
        with torch.no_grad(), opt.swap_ema_weights():
            in_mode(model, lambda: model(x))

    fns["swap"] = swap

    student = fresh()
    teacher = copy.deepcopy(student).requires_grad_(False)
    if teacher_eval:
        teacher.eval()
    plain = torch.optim.AdamW(student.parameters(), lr=1e-4)
    # the floating params and buffers, in one order on both sides (timm V3 lerps both)
    ours = [t for t in list(teacher.parameters()) + list(teacher.buffers()) if t.is_floating_point()]
    theirs = [t for t in list(student.parameters()) + list(student.buffers()) if t.is_floating_point()]

    def separate(student=student, teacher=teacher, plain=plain) -> None:
        train(student, plain)
        with torch.no_grad():
            torch._foreach_lerp_(ours, theirs, 1.0 - DECAY)
            teacher(x)

    fns["separate copy (_foreach_lerp_)"] = separate

    alone = fresh()
    alone_opt = torch.optim.AdamW(alone.parameters(), lr=1e-4)
    fns["student only"] = lambda: train(alone, alone_opt)

    # functional_call's own cost: the same forward with and without it, on one EMA model
    model, opt = ema(teacher_eval)
    train(model, opt)
    if teacher_eval:
        model.eval()
    fns["(forward)"] = lambda: torch.no_grad()(model)(x)
    fns["(functional_call forward)"] = lambda: torch.no_grad()(functional_call)(
        model, ema_state_dict(opt, model), (x,)
    )
    return fns


def call_costs(rounds: int) -> None:
    """ema_state_dict per call (and functional_call's own cost) against the number of params."""
    device = torch.device("cpu")
    print("\n## ema_state_dict per call\n")
    print("| params | ema_state_dict us/call | q25..q75 us | calls (Python + C) ", end="")
    print("| functional_call ms (no-op forward) |")
    print("|---:|---:|---:|---:|---:|")
    for n in (10, 100, 1_000, 10_000):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n // 2)])
        model.forward = lambda x: x  # type: ignore[method-assign] # functional_call's own work only
        opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), decay=DECAY)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        x = torch.zeros(1)
        fns = {
            "call": lambda opt=opt, model=model: ema_state_dict(opt, model),
            "fc": lambda opt=opt, model=model, x=x: functional_call(
                model, ema_state_dict(opt, model), (x,), tie_weights=False
            ),
        }
        samples = interleaved(fns, device, rounds, min_block_s=0.02, budget_s=20.0)
        lo, hi = quartiles(samples["call"])
        count = python_calls(fns["call"])
        cells = f"{1e6 * median(samples['call']):.1f} | {1e6 * lo:.1f}..{1e6 * hi:.1f} | {count}"
        print(f"| {n:,} | {cells} | {1e3 * median(samples['fc']):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only-calls", action="store_true", help="only the ema_state_dict per-call table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    use_clock(args.clock, device)
    info = device_info(device)
    print(
        f"# {info['device']}, {info['threads']} thread(s), torch {info['torch']}, clock={args.clock}", end=""
    )
    print(f", {info['date']}")
    rounds = 5 if args.quick else args.rounds
    for case, (make, data, teacher_eval) in CASES.items() if not args.only_calls else ():
        x = data(torch.Generator().manual_seed(0))
        fns = methods(make, x, teacher_eval)
        n_params = sum(1 for _ in make().parameters())  # type: ignore[operator]
        samples = interleaved(fns, device, rounds, min_block_s=0.05, budget_s=10.0 if args.quick else 90.0)
        peer = median(samples["separate copy (_foreach_lerp_)"])
        own = paired(samples["(functional_call forward)"], samples["(forward)"])
        print(f"\n## {case} ({n_params} params, {len(samples['swap'])} rounds)\n")
        print("| teacher step | ms (median) | q25..q75 ms | / separate copy |")
        print("|---|---:|---:|---:|")
        for name, s in samples.items():
            if name.startswith("("):
                continue
            lo, hi = quartiles(s)
            cells = f"{1e3 * median(s):.2f} | {1e3 * lo:.2f}..{1e3 * hi:.2f} | {median(s) / peer:.3f}"
            print(f"| {name} | {cells} |")
        diff = paired(samples["ema_state_dict + functional_call"], samples["separate copy (_foreach_lerp_)"])
        print(
            f"\nfunctional_call's own cost: {1e3 * own:.3f} ms per teacher forward; "
            f"ema_state_dict + functional_call - separate copy: {1e3 * diff:.3f} ms per step (paired)"
        )

    call_costs(5 if args.quick else 200)


if __name__ == "__main__":
    main()
