"""Two shadows per param through FSDP2 and torch.distributed.checkpoint (flattened and not),
saved on 2 gloo ranks and loaded on 1 process, and the reverse, bit for bit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ema_optim import EMAOptimizer, schedules

from .test_distributed import (
    N,
    batch,
    dcp_options,
    fsdp2,
    full,
    gloo_fsdp2_averages,
    make_model,
    spawn,
    train_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
KEYS = ("ema", "ema_1")


def new_run(world: int = 0):
    model = make_model()
    if world:
        model = fsdp2(model, world)
    decay = (schedules.warmup(0.9), schedules.power(gamma=3.0))
    return model, EMAOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.05), decay=decay, bias_correction=True
    )


def train(model, opt, steps) -> None:
    for step in steps:
        train_step(model, opt, batch(step, 0))


def snapshot(model, opt) -> dict[str, list[torch.Tensor]]:
    params = list(model.parameters())
    out = {"params": [full(p) for p in params]}
    out.update({k: [full(opt.state[p][k]) for p in params] for k in KEYS})
    return out


def assert_same(got, expected, what) -> None:
    for key, tensors in expected.items():
        for i, (a, b) in enumerate(zip(got[key], tensors)):
            assert torch.equal(a, b), f"{what}: {key}[{i}] differs by {(a - b).abs().max().item():.3g}"


def state(model, opt, flat):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = dcp_options(flat)
    return {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }


def save(model, opt, path: Path, flat: bool) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state(model, opt, flat), checkpoint_id=str(path))


def load(model, opt, path: Path, flat: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = state(model, opt, flat)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"], options=dcp_options(flat))
    set_optimizer_state_dict(model, opt, sd["optim"], options=dcp_options(flat))


def _worker(rank: int, world: int, tmp: Path) -> None:
    ref = torch.load(tmp / "ref.pt")
    for flat in (False, True):
        model, opt = new_run(world)
        load(model, opt, tmp / f"one-{flat}", flat)
        assert_same(snapshot(model, opt), ref["mid"], f"loaded on 2 ranks, flat={flat}")
        train(model, opt, range(N, 2 * N))
        assert_same(snapshot(model, opt), ref["end"], f"resumed on 2 ranks, flat={flat}")
    model, opt = new_run(world)
    train(model, opt, range(N))
    for flat in (False, True):
        save(model, opt, tmp / f"two-{flat}", flat)


@gloo_fsdp2_averages
def test_two_shadows_through_dcp_with_resharding(tmp_path):
    model, opt = new_run()
    train(model, opt, range(N))
    for flat in (False, True):
        save(model, opt, tmp_path / f"one-{flat}", flat)
    mid = copy.deepcopy(snapshot(model, opt))
    assert not torch.equal(mid["ema"][0], mid["ema_1"][0])  # two different averages
    train(model, opt, range(N, 2 * N))
    torch.save({"mid": mid, "end": snapshot(model, opt)}, tmp_path / "ref.pt")
    spawn(_worker, 2, tmp_path)
    for flat in (False, True):
        model, opt = new_run()
        load(model, opt, tmp_path / f"two-{flat}", flat)
        assert_same(snapshot(model, opt), mid, f"saved on 2 ranks, loaded on 1, flat={flat}")
        train(model, opt, range(N, 2 * N))
        assert_same(
            snapshot(model, opt), torch.load(tmp_path / "ref.pt")["end"], f"resumed on 1, flat={flat}"
        )
