"""Writes tests/data/v0.1_checkpoint.pt with ema_optim 0.1 (commit f25954d); kept to show how it was made.

The file holds, after 5 steps: the model, the optimizer state dict and the data generator state;
and, after 4 more steps in the same run, the weights and shadows on the CPU that made it
(``expected_params``/``expected_shadows``). Those last two are kept for the record only: another
CPU's matmul kernels round differently, so tests/test_old_checkpoint.py computes what 0.1 would do
on the machine that runs it instead.
"""

import copy

import torch

from ema_optim import EMAOptimizer, schedules


def build_plain():
    """The model and its AdamW, not wrapped."""
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(4, 3)
    bf16 = torch.nn.Linear(3, 2).to(torch.bfloat16)
    inner = torch.optim.AdamW(
        [{"params": fp32.parameters()}, {"params": bf16.parameters(), "lr": 0.02}], lr=0.01
    )
    return torch.nn.ModuleDict({"fp32": fp32, "bf16": bf16}), inner


def build():
    model, inner = build_plain()
    opt = EMAOptimizer(
        inner, decay=schedules.warmup(0.99), update_after_step=2, update_every=2, bias_correction=True
    )
    return model, opt


def train(model, opt, steps, g):
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        h = model["fp32"](x).tanh().to(torch.bfloat16)
        model["bf16"](h).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


if __name__ == "__main__":
    model, opt = build()
    g = torch.Generator().manual_seed(1)
    train(model, opt, 5, g)
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "generator": g.get_state(),
    }
    train(model, opt, 4, g)
    params = list(model.parameters())
    saved["expected_params"] = [p.detach().clone() for p in params]
    saved["expected_shadows"] = [opt.state[p]["ema"].clone() for p in params]
    torch.save(saved, "tests/data/v0.1_checkpoint.pt")
