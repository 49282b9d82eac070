"""A checkpoint saved by ema_optim 0.1 loads into this version and resumes as 0.1 would.

The file (tests/data/v0.1_checkpoint.pt, made by make_v01_checkpoint.py with 0.1) holds the
model, the optimizer state dict and the data generator after 5 steps. What "resuming as 0.1
would" means is computed here, on the machine that runs the test, never taken from floats
recorded on the CPU that made the file (its matmul kernels round differently from another
CPU's, see SPEC "State dict"):

- the weights: 0.1's wrapper only read them, so they must be bit for bit those of the plain
  torch optimizer loaded with the inner part of the checkpoint and run on the same data;
- the shadows: the EMA rule of the SPEC in float64, started from the checkpoint's shadows
  and counters and fed those weights;
- the counters: the checkpoint's, advanced by the steps run.
"""

from pathlib import Path

import pytest
import torch

from tests.data.make_v01_checkpoint import build, build_plain, train

DATA = Path(__file__).parent / "data" / "v0.1_checkpoint.pt"
STEPS = 4
# The settings make_v01_checkpoint.build() gave 0.1's EMAOptimizer.
UPDATE_AFTER_STEP, UPDATE_EVERY, MAX_DECAY = 2, 2, 0.99
COUNTERS = ("ema_steps", "ema_updates", "ema_decay_prod")  # 0.1's keys in each param group


def warmup_decay(t: int) -> float:
    """schedules.warmup(0.99) as the SPEC writes it: clamp(1 - (1 + t) ** (-2/3), 0, 0.99)."""
    return min(max(1.0 - (1.0 + t) ** (-2.0 / 3.0), 0.0), MAX_DECAY)


def inner_part(sd: dict) -> dict:
    """The checkpoint's optimizer state dict without 0.1's EMA entries: what AdamW saved."""
    state = {i: {k: v for k, v in s.items() if k != "ema"} for i, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k not in COUNTERS} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def debiased_update(shadow, prod, decay, w):
    """One bias-corrected EMA update (SPEC "The update") of a debiased shadow in float64.

    The shadow is m / (1 - prod) for the EMA-from-zero m; m <- d m + (1 - d) w.
    """
    m = shadow * (1.0 - prod)
    return (decay * m + (1.0 - decay) * w) / (1.0 - prod * decay), prod * decay


def resume(saved: dict):
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    g = torch.Generator()
    g.set_state(saved["generator"])
    return model, opt, g


def test_v01_checkpoint_resumes_as_v01_would():
    model, opt, g = resume(torch.load(DATA, weights_only=True))
    params = list(model.parameters())

    # A second copy: torch optimizers adopt loaded tensors (e.g. Adam's "step") without
    # copying them, so the two runs must not share one loaded dict.
    saved = torch.load(DATA, weights_only=True)
    ref_model, ref_opt = build_plain()
    ref_model.load_state_dict(saved["model"])
    ref_opt.load_state_dict(inner_part(saved["optimizer"]))
    ref_g = torch.Generator()
    ref_g.set_state(saved["generator"])

    group = saved["optimizer"]["param_groups"][0]
    steps, updates, prod = (group[k] for k in COUNTERS)
    shadows = [saved["optimizer"]["state"][i]["ema"].double() for i in range(len(params))]
    prods = [prod] * len(params)
    for _ in range(STEPS):
        train(model, opt, 1, g)
        train(ref_model, ref_opt, 1, ref_g)
        for p, q in zip(params, ref_model.parameters()):  # same machine, same kernels: bit for bit
            assert p.dtype == q.dtype and torch.equal(p, q)
        steps += 1
        if steps > UPDATE_AFTER_STEP and (steps - UPDATE_AFTER_STEP) % UPDATE_EVERY == 0:
            d = warmup_decay(updates)
            for i, p in enumerate(params):
                shadows[i], prods[i] = debiased_update(shadows[i], prods[i], d, p.detach().double())
            updates += 1
        for p, want in zip(params, shadows):
            shadow = opt.state[p]["ema"]
            assert shadow.dtype == torch.float32  # also for the bf16 params
            torch.testing.assert_close(shadow.double(), want, rtol=1e-6, atol=1e-7)
    for group in opt.state_dict()["param_groups"]:
        assert (group["ema_steps"], group["ema_updates"]) == (steps, updates) == (9, 3)
        assert group["ema_decay_prod"] == pytest.approx(prods[0], abs=1e-12)
