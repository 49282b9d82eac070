"""buffers=model: persistent floating buffers (BatchNorm running statistics) averaged like the params.

Every check of a shadow's value compares with the float64 reference of SPEC's update rule
(tests/reference.py), fed with the buffers as they were after each inner step; the shadows
are read through the swap (what the user evaluates) or through ``opt.state_dict()``.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer, _kernels, ema_state_dict, posthoc, schedules

from .reference import reference_shadows

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Linear-BN-ReLU-Linear plus a non-persistent float buffer that changes at every forward."""

    def __init__(self, norm_name: str = "bn") -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        setattr(self, norm_name, nn.BatchNorm1d(6, momentum=0.3))
        self.norm_name = norm_name
        self.fc2 = nn.Linear(6, 2)
        self.register_buffer("seen", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.seen.add_(x.float().mean(0))
        return self.fc2(torch.relu(getattr(self, self.norm_name)(self.fc1(x))))


AVERAGED = ["bn.running_mean", "bn.running_var"]  # Net's persistent floating buffers


def make(dtype=torch.float32, inner="adamw", seed=0, norm_name="bn", **kwargs):
    torch.manual_seed(seed)
    model = Net(norm_name).to(dtype)
    inners = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    }
    kwargs.setdefault("decay", 0.8)
    kwargs.setdefault("buffers", model)
    if kwargs["buffers"] is None:
        del kwargs["buffers"]
    return model, EMAOptimizer(inners[inner](model.parameters()), **kwargs)


def batch(step: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(8, 4, generator=g) * (1 + step % 3) + step % 2).to(dtype)


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().double().clone() for n, b in model.named_buffers() if n in AVERAGED}


def train(model, opt, steps, record=None):
    """Train on ``steps``; ``record`` gets (buffers before the first step, buffers after each step)."""
    for step in steps:
        model(batch(step, next(model.parameters()).dtype)).float().square().mean().backward()
        if record is not None and record["initial"] is None:
            record["initial"] = float_buffers(model)  # step() is first called now
        opt.step()
        opt.zero_grad()
        if record is not None:
            record["history"].append(float_buffers(model))


def recorded():
    return {"initial": None, "history": []}


def swapped_buffers(opt, model, index=0) -> dict[str, torch.Tensor]:
    with opt.swap_ema_weights(index):
        return {n: b.detach().clone() for n, b in model.named_buffers()}


def buffer_shadows(opt, index=0) -> dict[str, torch.Tensor]:
    """The buffer shadows as the state dict carries them, by buffer name."""
    prefix = "ema:" if index == 0 else f"ema_{index}:"
    return {
        k[len(prefix) :]: v.clone()
        for s in opt.state_dict()["state"].values()
        for k, v in s.items()
        if k.startswith(prefix)
    }


def reference(record, name, decay, **timing):
    return reference_shadows(record["initial"][name], [h[name] for h in record["history"]], decay, **timing)[
        -1
    ]


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


# ------------------------------------------------------------------------------------ the update


TIMINGS = {
    "constant": dict(decay=0.8),
    "after-every": dict(decay=0.7, update_after_step=2, update_every=2),
    "bias-corrected-schedule": dict(decay=schedules.warmup(0.95, power=0.8), bias_correction=True),
    "polyak-after": dict(decay=schedules.polyak(), update_after_step=1),
}


@pytest.mark.parametrize("name", TIMINGS)
def test_buffer_shadows_follow_the_float64_reference_through_the_swap(name):
    timing = TIMINGS[name]
    model, opt = make(**timing)
    record = recorded()
    for step in range(9):
        train(model, opt, [step], record)
        got = swapped_buffers(opt, model)
        for buf in AVERAGED:
            ref = reference(record, buf, **timing)
            torch.testing.assert_close(got[buf].double(), ref, atol=1e-6, rtol=1e-6)
    # the buffers' EMA moved away from the live statistics (the test is not vacuous)
    live = float_buffers(model)
    assert not torch.allclose(got["bn.running_mean"].double(), live["bn.running_mean"], atol=1e-3)


def test_the_shadows_start_from_the_buffers_when_step_is_first_called():
    # The first forward already updated the running statistics: the average starts from those.
    model, opt = make(decay=1.0)
    record = recorded()
    train(model, opt, range(4), record)
    got = swapped_buffers(opt, model)
    for buf in AVERAGED:
        assert torch.equal(got[buf].double(), record["initial"][buf].float().double())
        assert not torch.equal(record["initial"][buf], record["history"][-1][buf])


def test_two_shadows_and_swap_index():
    decays = (0.5, 0.9)
    model, opt = make(decay=decays)
    record = recorded()
    train(model, opt, range(6), record)
    for k, d in enumerate(decays):
        got = swapped_buffers(opt, model, k)
        stored = buffer_shadows(opt, k)
        assert sorted(stored) == AVERAGED
        for buf in AVERAGED:
            ref = reference(record, buf, d)
            torch.testing.assert_close(got[buf].double(), ref, atol=1e-6, rtol=1e-6)
            assert torch.equal(stored[buf], got[buf])
    assert not torch.equal(buffer_shadows(opt, 0)["bn.running_var"], buffer_shadows(opt, 1)["bn.running_var"])


# ------------------------------------------------------------------------------------ dtypes


class Stat(nn.Module):
    """A param (to anchor the EMA) and a bf16 buffer that the test sets by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("stat", torch.ones(3, dtype=torch.bfloat16))


def test_bf16_buffers_get_fp32_shadows_that_keep_moving():
    model = Stat()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.999, buffers=model)
    bf16_shadow = model.stat.clone()  # what a shadow in the buffer's own dtype would do
    initial, history = model.stat.double().clone(), []  # the shadows start at 1.0 (first step)
    for step in range(50):
        if step:  # then the next bf16 number above 1: each update moves the EMA by about 8e-6
            model.stat.fill_(1.0078125)
        model.w.grad = torch.ones(3)
        opt.step()
        bf16_shadow.lerp_(model.stat, 1 - 0.999)
        history.append(model.stat.double().clone())
    ref = reference_shadows(initial, history, 0.999)[-1]
    shadow = buffer_shadows(opt)["stat"]
    assert shadow.dtype == torch.float32
    torch.testing.assert_close(shadow.double(), ref, atol=1e-6, rtol=0)
    assert (shadow > 1.0003).all(), "the fp32 shadow moved by about 49 * 7.8e-6"
    assert torch.equal(bf16_shadow, torch.ones(3, dtype=torch.bfloat16)), "a bf16 shadow stalls at 1.0"
    # Swapped in, the bf16 buffer holds the fp32 EMA rounded to bf16; it comes back bit for bit.
    live = model.stat.clone()
    with opt.swap_ema_weights():
        assert model.stat.dtype == torch.bfloat16
        torch.testing.assert_close(model.stat.double(), ref, atol=2**-8, rtol=0)
    assert bitwise(model.stat, live)


def test_bf16_model_buffers_follow_the_reference():
    model, opt = make(torch.bfloat16)
    record = recorded()
    train(model, opt, range(6), record)
    stored = buffer_shadows(opt)
    for buf in AVERAGED:
        assert stored[buf].dtype == torch.float32
        torch.testing.assert_close(stored[buf].double(), reference(record, buf, 0.8), atol=1e-6, rtol=1e-6)


def test_integer_and_non_persistent_buffers_are_never_touched():
    # The same run without the wrapper: every buffer the EMA must not touch is bitwise the same.
    model, opt = make()
    twin, _ = make(buffers=None)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.05)
    for step in range(5):
        train(model, opt, [step])
        train(twin, twin_opt, [step])
        untouched = {n: b.clone() for n, b in model.named_buffers() if n not in AVERAGED}
        assert sorted(untouched) == ["bn.num_batches_tracked", "seen"]
        for n, b in untouched.items():
            assert bitwise(b, dict(twin.named_buffers())[n]), n
        with opt.swap_ema_weights():  # live inside the swap
            for n, b in model.named_buffers():
                if n in untouched:
                    assert bitwise(b, untouched[n]), n
    assert model.bn.num_batches_tracked.item() == 5
    keys = {k for s in opt.state_dict()["state"].values() for k in s if ":" in k}
    assert keys == {f"ema:{n}" for n in AVERAGED}, keys


def test_without_buffers_nothing_about_buffers_is_saved_or_changed():
    model, opt = make(buffers=None)
    record = recorded()
    train(model, opt, range(4), record)
    assert all(":" not in k for s in opt.state_dict()["state"].values() for k in s)
    live = {n: b.clone() for n, b in model.named_buffers()}
    with opt.swap_ema_weights():
        assert all(bitwise(b, live[n]) for n, b in model.named_buffers())
    assert all(bitwise(b, live[n]) for n, b in model.named_buffers())


def test_buffers_must_be_a_module():
    model = Net()
    with pytest.raises(TypeError, match="buffers must be None or a torch.nn.Module"):
        EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), buffers=dict(model.named_buffers()))


# ------------------------------------------------------------------------------------ swap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-exchange", "bf16-pack"])
def test_an_exception_inside_the_block_restores_the_buffers_bit_for_bit(dtype):
    model, opt = make(dtype)
    train(model, opt, range(4))
    before = {n: b.clone() for n, b in model.named_buffers()}
    emas = buffer_shadows(opt)
    with pytest.raises(ZeroDivisionError):
        with opt.swap_ema_weights():
            for buf in AVERAGED:
                ema = dict(model.named_buffers())[buf]
                torch.testing.assert_close(ema.float(), emas[buf], atol=2**-7, rtol=2**-7)
            model.train()
            model(batch(99, dtype))  # BatchNorm updates the (EMA) statistics in place
            model.bn.running_var.mul_(3.0)
            raise ZeroDivisionError("leave the block by an exception")
    for n, b in model.named_buffers():
        if n in AVERAGED:
            assert bitwise(b, before[n]), n
    # integer and non-persistent buffers stay live: the forward inside the block counted
    assert model.bn.num_batches_tracked == before["bn.num_batches_tracked"] + 1
    assert not torch.equal(model.seen, before["seen"])
    after = buffer_shadows(opt)
    for buf in AVERAGED:
        assert not torch.equal(after[buf], emas[buf]), "in-place edits inside the block edit the EMA"


def test_update_bn_inside_the_swap_and_restoring_the_buffers():
    # The README's recipe: recompute the statistics for the EMA weights, then put them back.
    model, opt = make(buffers=None)
    train(model, opt, range(5))
    live = {n: b.clone() for n, b in model.named_buffers()}
    loader = [batch(s) for s in range(3)]
    with opt.swap_ema_weights():
        saved = {n: b.clone() for n, b in model.named_buffers()}
        torch.optim.swa_utils.update_bn(loader, model)
        recomputed = model.bn.running_mean.clone()
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    assert not torch.equal(recomputed, live["bn.running_mean"])
    assert all(bitwise(b, live[n]) for n, b in model.named_buffers())


def test_a_buffer_replaced_by_name_is_followed():
    model, opt = make()
    record = recorded()
    train(model, opt, range(3), record)
    old = model.bn.running_mean
    model.bn.running_mean = torch.full_like(old, 2.0)  # a new tensor under the same name
    old.fill_(-100.0)  # no longer averaged: the reference below would be far off if it were
    train(model, opt, range(3, 7), record)
    got = swapped_buffers(opt, model)
    for buf in AVERAGED:
        torch.testing.assert_close(got[buf].double(), reference(record, buf, 0.8), atol=1e-6, rtol=1e-6)
    assert model.bn.running_mean is not old


def test_a_buffer_replaced_with_another_shape_is_refused():
    model, opt = make()
    train(model, opt, range(2))
    model(batch(2)).square().mean().backward()
    model.bn.running_mean = torch.zeros(7)
    params, shadows = [p.clone() for p in model.parameters()], buffer_shadows(opt)
    with pytest.raises(ValueError, match=r"buffer 'bn.running_mean' now has shape \(7,\)"):
        opt.step()
    assert all(bitwise(a, b) for a, b in zip(params, model.parameters()))
    assert all(bitwise(shadows[b], buffer_shadows(opt)[b]) for b in AVERAGED)


def test_a_buffer_resized_in_place_is_refused_by_the_swap_and_ema_state_dict():
    model, opt = make()
    train(model, opt, range(2))
    ema_state_dict(opt, model)
    model.bn.running_var.data = torch.ones(7)  # the same tensor object, another shape
    params, shadows = [p.clone() for p in model.parameters()], buffer_shadows(opt)
    for call in (lambda: swapped_buffers(opt, model), lambda: ema_state_dict(opt, model)):
        with pytest.raises(ValueError, match=r"buffer 'bn.running_var' now has shape \(7,\)"):
            call()
    assert all(bitwise(a, b) for a, b in zip(params, model.parameters()))
    assert all(bitwise(shadows[b], buffer_shadows(opt)[b]) for b in AVERAGED)


# ------------------------------------------------------------------------------------ state dict


def test_resume_is_exact_with_weights_only_load():
    n = 4
    model, opt = make(decay=(0.8, schedules.warmup(0.9)), bias_correction=True)
    train(model, opt, range(n))
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(n, 2 * n))

    resumed, opt_resumed = make(decay=(0.8, schedules.warmup(0.9)), bias_correction=True, seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed.load_state_dict(ckpt["opt"])
    for k in (0, 1):
        assert sorted(buffer_shadows(opt_resumed, k)) == AVERAGED
    train(resumed, opt_resumed, range(n, 2 * n))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert bitwise(a, b)
    for k in (0, 1):
        mine, theirs = buffer_shadows(opt, k), buffer_shadows(opt_resumed, k)
        assert all(bitwise(mine[buf], theirs[buf]) for buf in AVERAGED)
        a, b = swapped_buffers(opt, model, k), swapped_buffers(opt_resumed, resumed, k)
        assert all(bitwise(a[name], b[name]) for name in AVERAGED)
    sd_a, sd_b = opt.state_dict()["state"], opt_resumed.state_dict()["state"]
    for i in sd_a:
        for key in ("ema", "ema_1"):
            assert bitwise(sd_a[i][key], sd_b[i][key])


def test_bf16_buffer_shadows_stay_fp32_through_load():
    model, opt = make(torch.bfloat16)
    train(model, opt, range(3))
    sd = roundtrip(opt.state_dict())
    resumed, opt_resumed = make(torch.bfloat16)
    resumed.load_state_dict(model.state_dict())
    opt_resumed.load_state_dict(sd)
    got = buffer_shadows(opt_resumed)
    assert all(got[b].dtype == torch.float32 and bitwise(got[b], buffer_shadows(opt)[b]) for b in AVERAGED)


def test_a_dict_saved_without_buffers_loads_with_a_warning_and_restarts_the_buffers():
    model, opt_plain = make(buffers=None)
    train(model, opt_plain, range(3))
    sd = roundtrip(opt_plain.state_dict())
    param_shadows = [s["ema"] for s in sd["state"].values()]

    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=0.8, buffers=model)
    with pytest.warns(UserWarning, match="without buffer shadows"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[p]["ema"], s) for p, s in zip(model.parameters(), param_shadows))
    record = recorded()
    train(model, opt, range(3, 6), record)  # the buffers' EMA starts from the buffers at the next step
    got = swapped_buffers(opt, model)
    for buf in AVERAGED:
        torch.testing.assert_close(got[buf].double(), reference(record, buf, 0.8), atol=1e-6, rtol=1e-6)


def full_state(model, opt):
    return (
        {n: t.clone() for n, t in model.state_dict().items()},
        copy.deepcopy({id(p): dict(s) for p, s in opt.state.items()}),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        opt._rt.counters,
    )


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys() and all(bitwise(a[0][k], b[0][k]) for k in a[0])
    assert a[1].keys() == b[1].keys()
    for p in a[1]:
        assert a[1][p].keys() == b[1][p].keys(), (list(a[1][p]), list(b[1][p]))
        for k, v in a[1][p].items():
            assert bitwise(v, b[1][p][k]) if isinstance(v, torch.Tensor) else v == b[1][p][k]
    assert a[2] == b[2] and a[3] == b[3]


@pytest.mark.parametrize("target", ["other-names", "no-buffers"])
def test_a_dict_for_other_buffers_is_refused_and_nothing_changes(target):
    model, opt = make()
    train(model, opt, range(3))
    sd = roundtrip(opt.state_dict())
    if target == "other-names":  # the same params, the BatchNorm under another name
        other, other_opt = make(norm_name="norm")
        expected = r"norm\.running_mean.*bn\.running_mean|bn\.running_mean.*norm\.running_mean"
    else:
        other, other_opt = make(buffers=None)
        expected = r"bn\.running_mean.*buffers="
    train(other, other_opt, range(2))
    before = full_state(other, other_opt)
    with pytest.raises(ValueError, match=expected):
        other_opt.load_state_dict(sd)
    assert_same_state(full_state(other, other_opt), before)
    train(other, other_opt, [2])  # and it trains on as before


def test_a_dict_with_only_some_buffer_shadows_is_refused():
    model, opt = make(decay=(0.8, 0.9))
    train(model, opt, range(2))
    sd = roundtrip(opt.state_dict())
    anchor = next(i for i, s in sd["state"].items() if "ema_1:bn.running_var" in s)
    del sd["state"][anchor]["ema_1:bn.running_var"]
    before = full_state(model, opt)
    with pytest.raises(ValueError, match="ema_1:bn.running_var"):
        opt.load_state_dict(sd)
    assert_same_state(full_state(model, opt), before)


def test_a_buffer_shadow_of_the_wrong_shape_is_refused():
    model, opt = make()
    train(model, opt, range(2))
    sd = roundtrip(opt.state_dict())
    anchor = next(i for i, s in sd["state"].items() if "ema:bn.running_mean" in s)
    sd["state"][anchor]["ema:bn.running_mean"] = torch.zeros(5)
    before = full_state(model, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert_same_state(full_state(model, opt), before)


def test_buffer_shadows_live_with_the_first_trained_param():
    # DCP's set_optimizer_state_dict drops the state of frozen params: the shadows sit elsewhere.
    model, opt = make()
    model.fc1.weight.requires_grad_(False)
    train(model, opt, range(2))
    sd = opt.state_dict()["state"]
    holders = [i for i, s in sd.items() if any(":" in k for k in s)]
    assert holders == [1]  # fc1.bias, the first param that requires grad


def test_buffer_shadows_move_when_their_param_is_frozen():
    model, opt = make()
    record = recorded()
    train(model, opt, range(3), record)
    model.fc1.weight.requires_grad_(False)  # it held them
    model.fc1.bias.requires_grad_(False)
    train(model, opt, range(3, 6), record)
    sd = opt.state_dict()["state"]
    assert [i for i, s in sd.items() if any(":" in k for k in s)] == [2]  # bn.weight
    got = swapped_buffers(opt, model)
    for buf in AVERAGED:
        torch.testing.assert_close(got[buf].double(), reference(record, buf, 0.8), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ AMP, offload, posthoc


@pytest.mark.parametrize("inner", ["adamw", "adamw_fused"], ids=["scaler-skips-step", "fused-skip-on-device"])
def test_a_grad_scaler_skip_leaves_the_buffer_shadows_unchanged(inner):
    model, opt = make(inner=inner)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(5):
        scaler.scale(model(batch(step)).square().mean()).backward()
        if step == 2:
            model.fc1.weight.grad[0, 0] = float("inf")
        before = buffer_shadows(opt) if step > 0 else None
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            after = buffer_shadows(opt)
            assert all(bitwise(after[b], before[b]) for b in AVERAGED), "a skipped step moved a buffer shadow"
        elif step > 0:
            after = buffer_shadows(opt)
            assert not torch.equal(after["bn.running_mean"], before["bn.running_mean"])
    assert opt._step_supports_amp_scaling == (inner == "adamw_fused")


def test_offloaded_buffer_shadows_equal_on_device_bitwise(monkeypatch):
    timing = dict(decay=schedules.warmup(0.9), bias_correction=True)
    model, opt = make(**timing)
    record = recorded()
    train(model, opt, range(6), record)
    expected = buffer_shadows(opt)

    monkeypatch.setattr(_kernels, "offloaded", lambda shadow_device, param_device: True)
    model_o, opt_o = make(ema_device="cpu", **timing)
    train(model_o, opt_o, range(6))
    assert all(g.staged is not None for g in opt_o._rt.layout.groups), "the offload pipeline must be used"
    got = buffer_shadows(opt_o)  # waits for the pending fold
    assert all(bitwise(got[b], expected[b]) for b in AVERAGED)
    swapped = swapped_buffers(opt_o, model_o)
    for b in AVERAGED:
        assert torch.equal(swapped[b], expected[b])
        torch.testing.assert_close(got[b].double(), reference(record, b, **timing), atol=1e-6, rtol=1e-6)


def power_run():
    model, opt = make(decay=(schedules.power(sigma_rel=0.05), schedules.power(sigma_rel=0.1)))
    train(model, opt, range(5))
    return model, opt


def test_posthoc_snapshot_has_the_buffer_shadows_by_name():
    model, opt = power_run()
    snap = roundtrip(posthoc.snapshot(opt, model))
    params = [n for n, _ in model.named_parameters()]
    for k in (0, 1):
        assert sorted(snap["shadows"][k]) == sorted(params + AVERAGED)
        stored = buffer_shadows(opt, k)
        assert all(torch.equal(snap["shadows"][k][b], stored[b]) for b in AVERAGED)
    result = posthoc.reconstruct([snap, posthoc.snapshot(opt, model)], sigma_rel=0.07)
    model.load_state_dict(result, strict=False)  # buffers load by name too


def test_posthoc_snapshot_inside_the_swap_has_the_buffer_averages():
    model, opt = power_run()
    outside = posthoc.snapshot(opt, model)
    with opt.swap_ema_weights():
        inside = posthoc.snapshot(opt, model)
    for k in (0, 1):
        assert all(torch.equal(inside["shadows"][k][n], t) for n, t in outside["shadows"][k].items())


def test_a_block_that_converts_the_model_gets_its_buffers_back():
    model, opt = make()
    train(model, opt, range(3))
    before = {n: b for n, b in model.named_buffers()}
    values = {n: b.clone() for n, b in before.items()}
    params = [p.clone() for p in model.parameters()]
    with opt.swap_ema_weights():
        model.double()  # the module's buffers are new float64 tensors inside the block
    for n in AVERAGED:  # the averaged ones come back as they were (the live "seen" stays converted)
        b = dict(model.named_buffers())[n]
        assert b is before[n] and bitwise(b, values[n]), n
    assert all(bitwise(p, q) for p, q in zip(model.parameters(), params))


def test_a_failed_swap_leaves_the_buffers_of_an_earlier_swap_out_of_the_model():
    """SPEC (Swapping): a swap that fails before it swaps anything changes nothing; its undo
    knows only what this swap did, never the buffers an earlier swap saw."""
    model, opt = make(inner="sgd")
    train(model, opt, range(1))
    with opt.swap_ema_weights():
        pass
    model.double()  # new float64 buffer tensors, which the earlier swap never saw
    train(model, opt, range(1, 3))
    before = dict(model.named_buffers())
    values = {n: b.clone() for n, b in before.items()}
    model.fc1.weight.data = torch.randn(6, 5, dtype=torch.float64)  # no longer fits its shadows
    with pytest.raises(ValueError, match="param 0 of param group 0"):
        with opt.swap_ema_weights():
            pass  # pragma: no cover
    for n, b in model.named_buffers():
        assert b is before[n] and bitwise(b, values[n]), n


# ------------------------------------------------------------------------------------ example


def test_batchnorm_example_runs_quick():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "batchnorm.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("|") and line[1:].strip()[:1].isdigit()
    ]
    assert rows, result.stdout
    for row in rows:  # step | online | EMA live | EMA averaged | EMA update_bn
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and all(0.0 <= float(c) <= 100.0 for c in cells[1:]), row


# ------------------------------------------------------------------------------------ spectral norm


def readme_norm_layers():
    """The README's ``norm_layers`` recipe, run as written there."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "def norm_layers" in b).split("```")[0]
    namespace = {"torch": torch}
    exec(block.split("opt = EMAOptimizer")[0], namespace)  # the function, not the usage line
    return namespace["norm_layers"]


def spectral_model():
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(spectral_norm(nn.Linear(4, 6)), nn.BatchNorm1d(6)),
        nn.ReLU(),
        spectral_norm(nn.Linear(6, 2)),
    )


UV = [
    "0.0.parametrizations.weight.0._u",
    "0.0.parametrizations.weight.0._v",
    "2.parametrizations.weight.0._u",
    "2.parametrizations.weight.0._v",
]
BN = ["0.1.running_mean", "0.1.running_var"]


def spectral_run(buffers_of, steps=4):
    model = spectral_model()
    opt = EMAOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), decay=0.8, buffers=buffers_of(model))
    initial, history = None, []
    for step in range(steps):
        model(batch(step)).square().mean().backward()
        if initial is None:
            initial = {n: b.double().clone() for n, b in model.named_buffers()}
        opt.step()
        opt.zero_grad()
        history.append({n: b.double().clone() for n, b in model.named_buffers()})
    return model, opt, initial, history


def test_spectral_norm_vectors_are_persistent_buffers_that_buffers_model_averages():
    model, opt, _, _ = spectral_run(lambda m: m)
    assert sorted(buffer_shadows(opt)) == sorted(UV + BN)


def test_norm_layers_recipe_averages_only_batchnorm_under_the_model_names():
    norm_layers = readme_norm_layers()
    keys = list(spectral_model().state_dict())
    model, opt, initial, history = spectral_run(norm_layers)
    assert list(model.state_dict()) == keys, "the recipe must not change the model"
    assert sorted(buffer_shadows(opt)) == BN
    live = {n: b.clone() for n, b in model.named_buffers()}
    with opt.swap_ema_weights():
        inside = dict(model.named_buffers())
        for n in UV:  # the power-iteration vectors stay live
            assert bitwise(inside[n], live[n]), n
        for n in BN:
            ref = reference_shadows(initial[n], [h[n] for h in history], 0.8)[-1]
            torch.testing.assert_close(inside[n].double(), ref, atol=1e-6, rtol=1e-6)
    # names that fit the model: a resumed run with its own norm_layers loads the dict
    resumed = spectral_model()
    resumed.load_state_dict(model.state_dict())
    opt2 = EMAOptimizer(
        torch.optim.Adam(resumed.parameters(), lr=0.05), decay=0.8, buffers=norm_layers(resumed)
    )
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert all(bitwise(buffer_shadows(opt2)[n], buffer_shadows(opt)[n]) for n in BN)


def test_a_dict_saved_with_buffers_before_the_first_step_loads_silently():
    # nothing was averaged yet, so nothing is lost: no "without buffer shadows" warning
    model, opt = make()
    sd = roundtrip(opt.state_dict())
    other, other_opt = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other_opt.load_state_dict(sd)
    train(other, other_opt, range(2))


@pytest.mark.parametrize("side", ["saved-has-fewer", "saved-has-more"])
def test_a_buffer_name_mismatch_names_only_the_buffers_that_differ(side):
    model, opt = make()
    train(model, opt, range(2))
    sd = roundtrip(opt.state_dict())
    anchor = next(i for i, s in sd["state"].items() if "ema:bn.running_var" in s)
    if side == "saved-has-fewer":
        del sd["state"][anchor]["ema:bn.running_var"]
        expected = r"has no shadows for the buffers \['bn.running_var'\]"
    else:
        sd["state"][anchor]["ema:extra.running_var"] = sd["state"][anchor]["ema:bn.running_var"].clone()
        expected = r"has shadows for the buffers \['extra.running_var'\] that this optimizer does not average"
    with pytest.raises(ValueError, match=expected) as info:
        opt.load_state_dict(sd)
    assert "[]" not in str(info.value)
