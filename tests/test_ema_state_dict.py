"""ema_optim.ema_state_dict: the average as the model's state dict (SPEC, "The average as a state dict").

The independent references are ``model.state_dict()`` taken inside ``swap_ema_weights(index)``
(what the function must equal), the shadows in ``opt.state`` (what each averaged entry must
*be*, same storage), and the float64 update rule of tests/reference.py.
"""

from __future__ import annotations

import copy
import gc
import io
import threading
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from ema_optim import EMAOptimizer, _average, ema_state_dict

from .reference import reference_shadows
from .test_host_cost import calls
from .test_offload import force_offload, gate  # noqa: F401 - fixtures

# ------------------------------------------------------------------------------------ models


class Tied(nn.Module):
    """An embedding tied to the output layer, a BatchNorm, a frozen param and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight  # tied: two names, one tensor
        self.scale = nn.Parameter(torch.ones(4), requires_grad=False)  # frozen: still averaged
        self.register_buffer("mask", torch.ones(4), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.emb(idx)) * self.scale * self.mask)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


def images(seed: int) -> torch.Tensor:
    return torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 7, (8,), generator=torch.Generator().manual_seed(seed))


def train(model, opt, steps, data=images, seed=0, history=None):
    for i in range(steps):
        model(data(seed + i)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        if history is not None:
            history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def swapped_state(opt, model, index=0):
    """What the function must equal: model.state_dict() inside the swap, copied out."""
    with opt.swap_ema_weights(index):
        return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_values(got, expected):
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        assert torch.equal(got[k], expected[k]), k


# ------------------------------------------------------------------------------------ the entries


@pytest.mark.parametrize("index", [0, 1, -1, -2])
def test_equals_model_state_dict_inside_the_swap_and_is_the_shadows(index):
    model = cnn()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=(0.9, 0.5), buffers=model)
    train(model, opt, 3)
    got = ema_state_dict(opt, model, index)
    assert type(got) is dict
    assert_same_values(got, swapped_state(opt, model, index))
    key = "ema" if index % 2 == 0 else "ema_1"
    anchor = model[0].weight  # the first trained param holds the buffer shadows
    for name, p in model.named_parameters():
        shadow = opt.state[p][key]
        assert got[name] is shadow, name  # the shadow itself: no copy
        assert got[name].untyped_storage().data_ptr() == shadow.untyped_storage().data_ptr()
        assert not got[name].requires_grad
    for name in ("1.running_mean", "1.running_var"):
        assert got[name] is opt.state[anchor][f"{key}:{name}"]
    # the integer buffer is not averaged: the live tensor, as model.state_dict() gives it
    live = model.state_dict()["1.num_batches_tracked"]
    assert got["1.num_batches_tracked"].untyped_storage().data_ptr() == live.untyped_storage().data_ptr()
    assert int(got["1.num_batches_tracked"]) == 3


def test_tied_weights_every_name_one_shadow():
    torch.manual_seed(0)
    model = Tied()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), decay=0.5)
    train(model, opt, 2, data=tokens)
    got = ema_state_dict(opt, model)
    assert list(got) == list(model.state_dict())  # emb.weight and out.weight, no "mask"
    assert got["emb.weight"] is got["out.weight"] is opt.state[model.emb.weight]["ema"]
    assert got["scale"] is opt.state[model.scale]["ema"]  # frozen params are averaged too
    # without buffers=, BatchNorm statistics are the live ones
    for name in ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"):
        assert got[name].untyped_storage().data_ptr() == model.get_buffer(name).untyped_storage().data_ptr()
    assert_same_values(got, swapped_state(opt, model))
    cast = ema_state_dict(opt, model, dtype=torch.float64)
    assert cast["emb.weight"] is cast["out.weight"]  # still tied after the cast
    # a tied model through functional_call: the same output as the swapped model, with or
    # without torch's tie handling (every tied name is in the dict, with the same tensor)
    x = tokens(9)
    model.eval()
    with opt.swap_ema_weights(), torch.no_grad():
        expected = model(x)
    for tie in (True, False):
        with torch.no_grad():
            out = functional_call(model, ema_state_dict(opt, model), (x,), tie_weights=tie)
        assert torch.equal(out, expected)


def test_params_without_a_shadow_and_buffers_are_live():
    model = cnn()
    head = list(model[4].parameters())
    inner = torch.optim.SGD(
        [
            {"params": list(model[0].parameters()) + list(model[1].parameters())},
            {"params": head, "ema": False},
        ],
        lr=0.1,
    )
    opt = EMAOptimizer(inner, decay=0.5)
    train(model, opt, 2)
    got = ema_state_dict(opt, model)
    live = model.state_dict()
    for name in ("4.weight", "4.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert got[name].untyped_storage().data_ptr() == live[name].untyped_storage().data_ptr(), name
        assert not got[name].requires_grad and torch.equal(got[name], live[name])
    assert got["0.weight"] is opt.state[model[0].weight]["ema"]
    assert_same_values(got, swapped_state(opt, model))


def test_before_the_first_step_every_entry_is_live():
    model = cnn()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), decay=0.9, buffers=model)
    got = ema_state_dict(opt, model)
    live = model.state_dict()
    assert list(got) == list(live)
    for name in live:
        assert got[name].untyped_storage().data_ptr() == live[name].untyped_storage().data_ptr(), name
    assert not any(v.requires_grad for v in got.values())
    assert_same_values(got, swapped_state(opt, model))  # the swap is a no-op there too
    # after the first step the same call gives the shadows (same layout object, new groups)
    train(model, opt, 1)
    assert ema_state_dict(opt, model)["0.weight"] is opt.state[model[0].weight]["ema"]


def test_dtype_gives_cast_copies_of_the_averaged_entries_only():
    torch.manual_seed(0)
    model = cnn().to(torch.bfloat16)
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9, buffers=model)
    train(model, opt, 3, data=lambda s: images(s).bfloat16())
    shadows = ema_state_dict(opt, model)
    assert shadows["0.weight"].dtype == torch.float32  # the shadow dtype of bf16 params
    got = ema_state_dict(opt, model, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        shadow = opt.state[p]["ema"]
        assert got[name].dtype == torch.bfloat16
        assert got[name].untyped_storage().data_ptr() != shadow.untyped_storage().data_ptr()
        assert torch.equal(got[name], shadow.to(torch.bfloat16))
    assert got["1.num_batches_tracked"].dtype == torch.int64  # live entries are not cast
    same = ema_state_dict(opt, model, dtype=torch.float32)  # the shadow dtype: still a copy
    assert torch.equal(same["0.weight"], shadows["0.weight"])
    assert same["0.weight"].untyped_storage().data_ptr() != shadows["0.weight"].untyped_storage().data_ptr()
    # the swap rounds half away from zero, a cast to nearest-even: at most one bf16 step apart
    with opt.swap_ema_weights():
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.detach(), atol=0, rtol=2**-7)
    # a bf16 teacher forward with dtype=: the same as a bf16 copy loaded with the rounded shadows
    x = images(7).bfloat16()
    model.eval()
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: v.to(reference.state_dict()[k].dtype) for k, v in shadows.items()})
    with torch.no_grad():
        assert torch.equal(functional_call(model, got, (x,)), reference(x))


# ------------------------------------------------------------------------------------ uses


@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no-buffers"])
def test_functional_call_equals_the_swapped_model(buffers):
    model = cnn()
    opt = EMAOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.05), decay=(0.8, 0.95), buffers=model if buffers else None
    )
    train(model, opt, 4)
    x = images(42)
    model.eval()
    for index in (0, 1):
        with torch.no_grad():
            teacher = functional_call(model, ema_state_dict(opt, model, index), (x,))
        with opt.swap_ema_weights(index), torch.no_grad():
            expected = model(x)
        assert torch.equal(teacher, expected)
    with torch.no_grad():
        assert not torch.equal(teacher, model(x))  # the live model differs: the test can fail


def test_teacher_every_step_follows_the_reference_average():
    """A mean-teacher loop: the teacher forward sees the average of the steps so far (float64 rule)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), decay=0.7)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    history: list[dict] = []
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        with torch.no_grad():
            target = functional_call(model, ema_state_dict(opt, model), (x,))
        averaged = {
            n: (reference_shadows(initial[n], [h[n] for h in history], 0.7)[-1] if history else initial[n])
            for n in initial
        }
        with torch.no_grad():
            torch.testing.assert_close(target, functional_call(model, averaged, (x,)), atol=1e-12, rtol=0)
        (model(x) - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_returned_dict_is_new_each_call():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9)
    train(model, opt, 1)
    first = ema_state_dict(opt, model)
    first["0.weight"] = torch.zeros(1)  # what functional_call's write-back or a user may do
    del first["4.bias"]
    second = ema_state_dict(opt, model)
    assert second is not first
    assert second["0.weight"] is opt.state[model[0].weight]["ema"] and "4.bias" in second


def test_write_back_switch_ema_then_training_goes_on():
    model = cnn()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=0.6, buffers=model)
    history: list[dict] = []
    train(model, opt, 3, history=history)
    before = copy.deepcopy(opt.state_dict())
    expected = swapped_state(opt, model)
    model.load_state_dict(ema_state_dict(opt, model))
    assert_same_values(model.state_dict(), expected)  # the model now holds the average
    after = opt.state_dict()  # shadows and the inner optimizer's state are as they were
    for i, s in before["state"].items():
        for k, v in s.items():
            assert (
                torch.equal(after["state"][i][k], v)
                if isinstance(v, torch.Tensor)
                else after["state"][i][k] == v
            )
    # training goes on from the written-back weights; the shadows follow the rule from there
    shadows = {n: opt.state[p]["ema"].double().clone() for n, p in model.named_parameters()}
    train(model, opt, 2, seed=10, history=history)
    for n, p in model.named_parameters():
        ref = reference_shadows(shadows[n], [h[n] for h in history[3:]], 0.6)[-1]
        torch.testing.assert_close(opt.state[p]["ema"].double(), ref, atol=1e-6, rtol=1e-6)


def test_export_loads_strict_into_a_fresh_model():
    torch.manual_seed(0)
    model = Tied()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=0.8, buffers=model)
    train(model, opt, 3, data=tokens)
    buf = io.BytesIO()
    torch.save(ema_state_dict(opt, model), buf)
    buf.seek(0)
    torch.manual_seed(1)
    fresh = Tied()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = tokens(5)
    model.eval()
    fresh.eval()
    with opt.swap_ema_weights(), torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_compiled_model_keys_and_forward():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.7, buffers=model)
    train(model, opt, 2)
    compiled = torch.compile(model, backend="eager")
    got = ema_state_dict(opt, compiled)
    assert list(got) == list(compiled.state_dict()) and all(k.startswith("_orig_mod.") for k in got)
    assert got["_orig_mod.0.weight"] is opt.state[model[0].weight]["ema"]
    assert_same_values(got, swapped_state(opt, compiled))
    compiled.eval()
    x = images(3)
    with torch.no_grad():
        teacher = functional_call(compiled, got, (x,))
    with opt.swap_ema_weights(), torch.no_grad():
        assert torch.equal(teacher, compiled(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_target_decay_zero_update_every_is_an_exact_copy(dtype):
    """docs/teachers.md: decay=0.0, update_every=N copies the weights exactly on every N-th step
    (a lerp with weight 1; bf16 weights into fp32 shadows too) and leaves them alone between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    opt = EMAOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.0, update_every=3)
    initial = [p.detach().float().clone() for p in model.parameters()]
    held = initial
    for step in range(1, 10):
        model(torch.randn(4, 3).to(dtype)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        target = list(ema_state_dict(opt, model).values())
        if step % 3 == 0:
            held = [p.detach().float().clone() for p in model.parameters()]
            assert not any(torch.equal(h, i) for h, i in zip(held, initial))
        assert all(torch.equal(t, h) for t, h in zip(target, held)), step


# ------------------------------------------------------------------------------------ swap, offload


class Mixed(nn.Module):
    """An fp32 layer (exchanged by the swap) and a bf16 one (packed into its fp32 shadow)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).to(torch.bfloat16)).float()


def test_inside_the_swap_it_still_gives_the_average():
    model = Mixed()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=(0.7, 0.9))
    train(model, opt, 3, data=lambda s: torch.randn(5, 3, generator=torch.Generator().manual_seed(s)))
    outside = [{k: v.clone() for k, v in ema_state_dict(opt, model, i).items()} for i in (0, 1)]
    with opt.swap_ema_weights(0):
        assert [r.method for r in opt._rt.swapped] == ["exchange", "exchange", "pack", "pack"]
        inside = [ema_state_dict(opt, model, i) for i in (0, 1)]
        assert_same_values(inside[0], outside[0])
        assert_same_values(inside[1], outside[1])
        for name, p in model.named_parameters():
            # shadow 0 holds swap bookkeeping now: its entry is a copy; shadow 1 is untouched
            assert (
                inside[0][name].untyped_storage().data_ptr()
                != opt.state[p]["ema"].untyped_storage().data_ptr()
            )
            assert inside[1][name] is opt.state[p]["ema_1"]
    assert ema_state_dict(opt, model, 0)["a.weight"] is opt.state[model.a.weight]["ema"]
    assert_same_values(ema_state_dict(opt, model, 0), outside[0])


def test_inside_the_swap_copy_pairs_give_the_shadow_itself():
    # a param with gaps in memory is swapped by copy: its shadow keeps the average, no bookkeeping
    p = nn.Parameter(torch.randn(4, 6)[:, ::2])
    model = nn.Module()
    model.register_parameter("p", p)
    opt = EMAOptimizer(torch.optim.SGD([p], lr=0.1), decay=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    with opt.swap_ema_weights():
        assert [r.method for r in opt._rt.swapped] == ["copy"]
        got = ema_state_dict(opt, model)
        assert got["p"] is opt.state[p]["ema"]
        assert torch.equal(got["p"], p.detach())


def test_waits_for_an_offloaded_update(force_offload, gate):  # noqa: F811 - fixtures
    model = cnn()
    opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), decay=0.6, ema_device="cpu")
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    history: list[dict] = []
    train(model, opt, 2, history=history)
    opt._rt.offload.wait()  # the earlier folds are done; hold the next one
    gate.clear()
    train(model, opt, 1, seed=2, history=history)
    assert not opt._rt.offload._pending.done()
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    got = ema_state_dict(opt, model)  # waits for the fold of step 3
    opener.join()
    for n in initial:
        ref = reference_shadows(initial[n], [h[n] for h in history], 0.6)[-1]
        torch.testing.assert_close(got[n].double(), ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ bad input

BAD = [
    # (args, kwargs, exception, match)
    (("opt", "not a module"), {}, TypeError, "model must be a torch.nn.Module"),
    (("inner", "model"), {}, TypeError, "opt must be an ema_optim.EMAOptimizer"),
    (("opt", "model", 2), {}, IndexError, r"index must be in \[-2, 1\]"),
    (("opt", "model", -3), {}, IndexError, r"index must be in \[-2, 1\]"),
    (("opt", "model", True), {}, TypeError, "index must be an int"),
    (("opt", "model", 0.0), {}, TypeError, "index must be an int"),
    (("opt", "model", torch.tensor(1.0)), {}, TypeError, "index must be an int"),
    (("opt", "model", torch.tensor(True)), {}, TypeError, "index must be an int"),
    (("opt", "model"), {"dtype": torch.int32}, TypeError, "floating torch.dtype"),
    (("opt", "model"), {"dtype": "bfloat16"}, TypeError, "floating torch.dtype"),
    (("opt", "other"), {}, ValueError, "none of the parameters"),
]


@pytest.mark.parametrize("args,kwargs,error,match", BAD)
def test_bad_input_raises_and_changes_nothing(args, kwargs, error, match):
    model = cnn()
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt = EMAOptimizer(inner, decay=(0.9, 0.99), buffers=model)
    train(model, opt, 2)
    named = {"opt": opt, "inner": inner, "model": model, "other": cnn()}
    before_opt, before_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        ema_state_dict(*[named.get(a, a) if isinstance(a, str) else a for a in args], **kwargs)
    after_opt = opt.state_dict()
    for i, s in before_opt["state"].items():
        for k, v in s.items():
            assert (
                torch.equal(after_opt["state"][i][k], v)
                if isinstance(v, torch.Tensor)
                else v == after_opt["state"][i][k]
            )
    assert_same_values(model.state_dict(), before_model)


@pytest.mark.parametrize("j", [0, 1, 3, 4])
def test_a_param_given_a_new_shape_is_refused_clearly(j):
    """p.data = ... with a new shape on any param, also after the names were cached: the
    ValueError the swap gives, not the old-shape shadow under the param's name."""
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    train(model, opt, 1)
    ema_state_dict(opt, model)
    p = list(model.parameters())[j]
    p.data = torch.randn(7, *p.shape[1:])
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"param {j} of param group 0 \(shape \(7.*Load a state dict"):
            ema_state_dict(opt, model)


@pytest.mark.parametrize("index", [np.int64(1), np.int32(-1), torch.tensor(1)], ids=repr)
def test_any_integer_that_operator_index_takes_names_a_shadow(index):
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=(0.9, 0.5))
    train(model, opt, 2)
    assert ema_state_dict(opt, model, index)["0.weight"] is opt.state[model[0].weight]["ema_1"]


def test_a_submodule_of_the_model_is_fine():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    train(model, opt, 1)
    got = ema_state_dict(opt, model[4])
    assert list(got) == ["weight", "bias"] and got["weight"] is opt.state[model[4].weight]["ema"]


# ------------------------------------------------------------------------------------ the cache


def own_calls(n: int) -> int:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(n // 2)], nn.BatchNorm1d(2))
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), decay=0.9, buffers=model)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    ema_state_dict(opt, model)  # builds the view
    return calls(lambda: ema_state_dict(opt, model))


def test_host_work_per_call_does_not_grow_with_the_param_count():
    counts = [own_calls(n) for n in (10, 100, 1000)]
    assert counts[0] == counts[1] == counts[2], counts


def test_cache_follows_a_load_and_new_param_groups():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(list(model[:2].parameters()), lr=0.1), decay=0.5)
    train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    assert ema_state_dict(opt, model)["4.weight"].untyped_storage().data_ptr() == model[4].weight.data_ptr()
    opt.add_param_group({"params": list(model[4].parameters())})
    train(model, opt, 1, seed=5)
    got = ema_state_dict(opt, model)
    assert got["4.weight"] is opt.state[model[4].weight]["ema"]
    opt2 = EMAOptimizer(torch.optim.SGD(list(model[:2].parameters()), lr=0.1), decay=0.5)
    opt2.load_state_dict(saved)
    assert ema_state_dict(opt2, model)["0.weight"] is opt2.state[model[0].weight]["ema"]
    old = opt.state[model[0].weight]["ema"]
    opt.load_state_dict(opt.state_dict())  # new shadow tensors
    assert opt.state[model[0].weight]["ema"] is not old
    assert ema_state_dict(opt, model)["0.weight"] is opt.state[model[0].weight]["ema"]


def test_cache_follows_the_model_structure_and_live_tensors():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(list(model[:2].parameters()), lr=0.1), decay=0.5)
    train(model, opt, 1)
    ema_state_dict(opt, model)
    # a submodule replaced (not trained by the optimizer): its entries are the new live tensors
    model[4] = nn.Linear(4 * 5 * 5, 3)
    got = ema_state_dict(opt, model)
    assert got["4.weight"].untyped_storage().data_ptr() == model[4].weight.data_ptr()
    # an averaged param replaced by a new Parameter object: no longer the optimizer's, so live
    old = model[0].weight
    model[0].weight = nn.Parameter(old.detach() + 1)
    assert torch.equal(ema_state_dict(opt, model)["0.weight"], old.detach() + 1)
    model[0].weight = old
    assert ema_state_dict(opt, model)["0.weight"] is opt.state[old]["ema"]
    # a live buffer replaced, a live param's data replaced, a param removed
    model[1].num_batches_tracked = torch.tensor(41)
    assert int(ema_state_dict(opt, model)["1.num_batches_tracked"]) == 41
    model[4].bias.data = torch.full((3,), 7.0)
    assert torch.equal(ema_state_dict(opt, model)["4.bias"], torch.full((3,), 7.0))
    del model[4].bias
    model[4].register_parameter("bias", None)
    assert "4.bias" not in ema_state_dict(opt, model)
    assert list(ema_state_dict(opt, model)) == list(model.state_dict())
    # a live buffer replaced without any hook (what Module._apply does): seen at the next call
    model[1]._buffers["num_batches_tracked"] = torch.tensor(43)
    assert int(ema_state_dict(opt, model)["1.num_batches_tracked"]) == 43
    # a new buffer registered on a module of the model
    model[1].register_buffer("extra", torch.zeros(2))
    assert list(ema_state_dict(opt, model)) == list(model.state_dict())


def test_a_call_during_functional_call_sees_its_tensors_and_the_next_one_the_shadows():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    train(model, opt, 1)
    given = torch.zeros_like(model[0].weight)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(ema_state_dict(opt, m)))
    with torch.no_grad():
        functional_call(model, {"0.weight": given}, (images(0),))
    hook.remove()
    assert seen[0]["0.weight"].untyped_storage().data_ptr() == given.data_ptr()  # as model.state_dict() there
    assert ema_state_dict(opt, model)["0.weight"] is opt.state[model[0].weight]["ema"]


def test_entries_a_state_dict_hook_makes_are_live_at_every_call():
    """SPEC: every entry without a shadow is what ``model.state_dict()`` gives, also one a
    state_dict post hook adds (an export-time scale) or rewrites: read again at each call."""
    model = cnn()

    def hook(module, sd, prefix, local_metadata):
        sd[prefix + "scale"] = module[0].weight.detach().abs().amax()  # a new tensor each time
        sd[prefix + "4.bias"] = module[4].bias.detach() * 2  # an entry rewritten
        sd[prefix + "step"] = int(module[1].num_batches_tracked)  # not a tensor

    model.register_state_dict_post_hook(hook)
    opt = EMAOptimizer(torch.optim.SGD(list(model[:2].parameters()), lr=0.1), decay=0.5)
    for seed in range(3):
        train(model, opt, 1, seed=seed)
        got, expected = ema_state_dict(opt, model), model.state_dict()
        assert list(got) == list(expected)
        for name in ("scale", "4.bias", "step"):
            assert torch.equal(torch.as_tensor(got[name]), torch.as_tensor(expected[name])), (seed, name)
        assert got["0.weight"] is opt.state[model[0].weight]["ema"]
    with opt.swap_ema_weights():  # inside the swap the hook sees the average, as model.state_dict() does
        assert torch.equal(ema_state_dict(opt, model)["scale"], model.state_dict()["scale"])


def test_cache_follows_a_model_converted_as_a_whole():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, buffers=model)
    train(model, opt, 1)
    ema_state_dict(opt, model)
    model.double()  # params keep their objects (p.data = ...), buffers are new tensors
    train(model, opt, 1, data=lambda s: images(s).double())
    got = ema_state_dict(opt, model)
    assert got["1.running_mean"] is opt.state[model[0].weight]["ema:1.running_mean"]
    assert (
        got["1.num_batches_tracked"].untyped_storage().data_ptr() == model[1].num_batches_tracked.data_ptr()
    )
    expected = swapped_state(opt, model)  # float64 params hold the float32 shadows, cast
    assert list(got) == list(expected)
    assert all(torch.equal(got[k].to(v.dtype), v) for k, v in expected.items())


def test_views_of_models_gone_are_dropped():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    train(model, opt, 1)
    for _ in range(5):  # e.g. a new wrapper each time: its view must not outlive it
        wrapper = nn.Sequential(model)
        ema_state_dict(opt, wrapper)
        del wrapper
        gc.collect()
    ema_state_dict(opt, model)
    assert len(_average._views[opt._layout()]) <= 2


def test_views_die_with_the_layout():
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    train(model, opt, 1)
    ema_state_dict(opt, model)
    layout = weakref.ref(opt._layout())
    assert id(model) in _average._views[layout()]
    opt.load_state_dict(opt.state_dict())  # drops the layout; the cache does not keep it alive
    assert ema_state_dict(opt, model)["0.weight"] is opt.state[model[0].weight]["ema"]
    gc.collect()
    assert layout() is None


# ------------------------------------------------------------------------------------ BatchNorm teachers


def test_train_mode_teacher_with_batch_statistics_changes_nothing():
    """The recipe of docs/teachers.md: the teacher's BatchNorm gets no running statistics (None),
    so a train-mode forward uses batch statistics and updates neither the shadows nor the
    student's buffers; its output is what a separate teacher copy computes in train mode."""
    model = cnn()
    opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.8, buffers=model)
    train(model, opt, 3)
    stats = {
        k: None
        for k in model.state_dict()
        if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shadows = {k: v.clone() for k, v in ema_state_dict(opt, model).items()}
    copy_teacher = copy.deepcopy(model)
    copy_teacher.load_state_dict(shadows)
    x = images(11)
    with torch.no_grad():
        out = functional_call(model, {**ema_state_dict(opt, model), **stats}, (x,))
        expected = copy_teacher(x)  # train mode: batch statistics
    assert torch.equal(out, expected)
    assert_same_values(model.state_dict(), before)
    assert_same_values({k: v.clone() for k, v in ema_state_dict(opt, model).items()}, shadows)
    # without the override a train-mode forward updates the buffer shadows it was given
    with torch.no_grad():
        functional_call(model, ema_state_dict(opt, model), (x,))
    assert not torch.equal(ema_state_dict(opt, model)["1.running_mean"], shadows["1.running_mean"])


def test_a_compiled_training_step_with_a_batchnorm_teacher_matches_eager():
    # the teacher pattern inside one compiled step, with the live BatchNorm statistics
    # (buffers=None): the live buffers come back as themselves, so a graph compiled after a
    # break in ema_state_dict does not take the buffer twice (an alias that the student's
    # in-place update of the statistics made aot_autograd refuse, at every step)
    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))
        opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), decay=0.9)
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()

        def train(x):
            model.eval()
            with torch.no_grad():
                teacher = torch.func.functional_call(model, ema_state_dict(opt, model), (x,))
            model.train()
            (model(x) - teacher).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        step = torch.compile(train, backend="aot_eager") if compiled else train
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            step(torch.randn(8, 4, generator=g))
        return {k: v.clone() for k, v in model.state_dict().items()}, ema_state_dict(opt, model)

    (live_e, ema_e), (live_c, ema_c) = run(False), run(True)
    for a, b in ((live_e, live_c), (ema_e, ema_c)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_live_buffers_are_the_model_buffers_and_live_params_detached():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "ema": False}]
    opt = EMAOptimizer(torch.optim.SGD(groups, lr=0.1), decay=0.5)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    sd = ema_state_dict(opt, model)
    assert sd["1.running_mean"] is model[1].running_mean  # the same storage as state_dict()'s
    assert type(sd["2.weight"]) is torch.Tensor and not sd["2.weight"].requires_grad
    assert sd["2.weight"].data_ptr() == model[2].weight.data_ptr()
