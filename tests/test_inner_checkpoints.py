"""Checkpoints through the inner optimizer, the decay record, and what ``len(opt.state[p])`` says.

SPEC "State dict": code written before the wrapper that saves and loads through
``opt.optimizer`` either resumes exactly, or the next ``step()`` warns and says what was lost;
each shadow's decay is recorded, and a ``schedules.power`` shadow loaded with another gamma
is refused with nothing changed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ema_optim import EMAOptimizer, schedules
from tests.reference import reference_shadows

POWER = (schedules.power(sigma_rel=0.05), schedules.power(sigma_rel=0.10))


def _build(decay=POWER, dtype=torch.float32, inner=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    opt = EMAOptimizer((inner or torch.optim.AdamW)(model.parameters(), lr=1e-2), decay=decay)
    return model, opt


def _train(model, opt, steps, seed, record=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g).to(next(model.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if record is not None:
            record.append([p.detach().double().clone() for p in model.parameters()])


def _keys(decay):
    return ["ema"] + [f"ema_{k}" for k in range(1, len(decay))]


def _assert_same_state_dict(after, before):
    assert after["param_groups"] == before["param_groups"]
    for i, s in before["state"].items():
        assert s.keys() == after["state"][i].keys()
        assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items() if torch.is_tensor(v))


def test_save_and_load_through_the_inner_optimizer_resumes_exactly(tmp_path):
    model, opt = _build()
    _train(model, opt, 20, seed=1)
    _train(model, opt, 20, seed=2)

    model_a, opt_a = _build()
    _train(model_a, opt_a, 20, seed=1)
    torch.save({"model": model_a.state_dict(), "opt": opt_a.optimizer.state_dict()}, tmp_path / "c.pt")
    model_b, opt_b = _build()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert saved["opt"]["param_groups"][0]["ema_updates"] == 20  # the counters, not placeholders
    model_b.load_state_dict(saved["model"])
    opt_b.optimizer.load_state_dict(saved["opt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact resume says nothing
        _train(model_b, opt_b, 20, seed=2)
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 40
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for k in _keys(POWER):
            assert torch.equal(opt.state[p][k], opt_b.state[q][k])


def test_inner_state_dict_inside_a_swap_gives_the_ema():
    model, opt = _build(decay=0.5)
    _train(model, opt, 3, seed=1)
    outside = opt.optimizer.state_dict()
    outside = {i: s["ema"].clone() for i, s in outside["state"].items()}
    with opt.swap_ema_weights():
        inside = opt.optimizer.state_dict()
    for i, s in inside["state"].items():
        assert torch.equal(s["ema"], outside[i])


def test_a_plain_inner_dict_loaded_through_the_inner_optimizer_warns_and_restarts():
    model, opt = _build(decay=0.5)
    _train(model, opt, 5, seed=1)
    plain_model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    _train(plain_model, plain, 2, seed=3)
    opt.optimizer.load_state_dict(plain.state_dict())
    initial = [p.detach().double().clone() for p in model.parameters()]
    weights = []
    with pytest.warns(UserWarning, match="no EMA shadows.*restarts from the current weights"):
        _train(model, opt, 1, seed=4, record=weights)
    _train(model, opt, 2, seed=5, record=weights)
    assert opt.state_dict()["param_groups"][0]["ema_updates"] == 3  # counted from the restart
    for i, p in enumerate(model.parameters()):
        want = reference_shadows(initial[i], [w[i] for w in weights], 0.5)[-1]
        torch.testing.assert_close(opt.state[p]["ema"].double(), want, atol=1e-6, rtol=1e-6)


def test_shadows_without_counters_through_the_inner_optimizer_warn():
    # what ema_optim 0.2's inner state_dict() saved: the shadows, the counters as None
    model, opt = _build()
    _train(model, opt, 6, seed=1)
    sd = opt.optimizer.state_dict()
    for g in sd["param_groups"]:
        g.update(ema_steps=None, ema_updates=None, ema_decay_prod=None, ema_decay_prod_1=None)
    model_b, opt_b = _build()
    model_b.load_state_dict(model.state_dict())
    opt_b.optimizer.load_state_dict(sd)
    shadows = [opt_b.state[p]["ema_1"].clone() for p in model_b.parameters()]
    assert all(torch.equal(s, opt.state[p]["ema_1"]) for s, p in zip(shadows, model.parameters()))
    with pytest.warns(UserWarning, match="shadows but no EMA counters.*shadows are kept"):
        _train(model_b, opt_b, 1, seed=2)


def test_fp32_shadows_of_bf16_params_through_the_inner_optimizer():
    model, opt = _build(decay=0.9, dtype=torch.bfloat16)
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=0.9, dtype=torch.bfloat16)
    opt_b.optimizer.load_state_dict(opt.optimizer.state_dict())  # torch casts state to bf16
    for p in model_b.parameters():
        assert opt_b.state[p]["ema"].dtype == torch.float32
    with pytest.warns(UserWarning, match="rounded 4 shadows"):
        _train(model_b, opt_b, 1, seed=2)


def test_a_reordered_power_tuple_is_refused_with_nothing_changed():
    model, opt = _build()
    _train(model, opt, 4, seed=1)
    sd = opt.state_dict()
    model_b, opt_b = _build(decay=POWER[::-1])
    _train(model_b, opt_b, 2, seed=2)
    before = opt_b.state_dict()
    for load in (opt_b.load_state_dict, opt_b.optimizer.load_state_dict):
        with pytest.raises(ValueError, match=r"shadow 0 \('ema'\) was saved as schedules.power\(gamma="):
            load(sd)
        after = opt_b.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for i, s in before["state"].items():
            assert all(torch.equal(v, after["state"][i][k]) for k, v in s.items() if torch.is_tensor(v))


def test_another_changed_decay_loads_with_a_warning_naming_it():
    model, opt = _build(decay=(0.9, 0.99))
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=(0.9, 0.999))
    with pytest.warns(UserWarning, match=r"shadow 1 \('ema_1'\) was saved with the decay 0.99, .* 0.999"):
        opt_b.load_state_dict(opt.state_dict())
    assert opt_b.state_dict()["param_groups"][0]["ema_decays"] == [0.9, 0.999]


def test_a_dict_saved_before_the_record_loads_as_before():
    model, opt = _build()
    _train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["ema_decays"]
    model_b, opt_b = _build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_b.load_state_dict(sd)
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 3


def test_the_record_says_what_each_decay_is():
    _, opt = _build(decay=(0.99, schedules.power(gamma=7.0), schedules.warmup()))
    assert opt.state_dict()["param_groups"][0]["ema_decays"] == [0.99, {"power_gamma": 7.0}, None]


@pytest.mark.parametrize(
    "inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=2),
        lambda ps: torch.optim.AdamW(ps, lr=0.1),
    ],
    ids=["sgd", "sgd-momentum", "lbfgs", "adamw"],
)
def test_after_a_step_every_state_entry_is_non_empty_and_its_length_counts_its_keys(inner):
    # torch's test_non_empty_state, and what any dict promises
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = EMAOptimizer(inner(model.parameters()), decay=0.9)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    for p in model.parameters():
        state = opt.state[p]
        assert len(state) > 0 and len(state) == len(list(state.keys())) and "ema" in state


def test_a_frozen_param_unfrozen_later_still_gets_its_inner_state():
    # the reason for ShadowState: Adam initialises a param's state when len(state) == 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    opt = EMAOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.9)
    for _ in range(2):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    frozen = opt.state[model[0].weight]
    assert "ema" in frozen and len(frozen) == 0  # holds the shadow only: Adam has not started it
    model[0].weight.requires_grad_(True)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[model[0].weight]


@pytest.mark.parametrize(
    "inner", [torch.optim.AdamW, torch.optim.RMSprop, torch.optim.NAdam], ids=lambda c: c.__name__
)
def test_a_param_that_holds_only_shadows_survives_a_load_through_the_inner_optimizer(inner):
    # A frozen (or unused) param holds its shadows only; torch's load would hand the Adam family
    # a state entry without "step" (KeyError inside its __setstate__, the optimizer half-loaded).
    def build():
        model, opt = _build(decay=(0.9, 0.5), inner=inner)
        model[0].bias.requires_grad_(False)
        return model, opt

    model, opt = build()
    _train(model, opt, 3, seed=1)
    _train(model, opt, 3, seed=2)
    model_a, opt_a = build()
    _train(model_a, opt_a, 3, seed=1)
    saved = {"model": model_a.state_dict(), "opt": opt_a.optimizer.state_dict()}
    model_b, opt_b = build()
    model_b.load_state_dict(saved["model"])
    opt_b.optimizer.load_state_dict(saved["opt"])
    frozen = opt_b.state[model_b[0].bias]
    assert "ema" in frozen and len(frozen) == 0  # still the inner optimizer's to initialise
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact resume says nothing
        _train(model_b, opt_b, 3, seed=2)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for k in ("ema", "ema_1"):
            assert torch.equal(opt.state[p][k], opt_b.state[q][k])
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 6


@pytest.mark.parametrize("dtype,ema_dtype", [(torch.bfloat16, None), (torch.float32, torch.float64)])
def test_buffer_shadows_keep_their_dtype_through_the_inner_optimizer(dtype, ema_dtype):
    # torch's load casts every state tensor to its param's dtype; the buffer shadows too
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(dtype)
    opt = EMAOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2), decay=0.9, buffers=model, ema_dtype=ema_dtype
    )
    _train(model, opt, 3, seed=1)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items() if ":" in str(k)}
    assert before and all(v.dtype == (ema_dtype or torch.float32) for v in before.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the param shadows were rounded: that warning is another test's
        opt.optimizer.load_state_dict(opt.optimizer.state_dict())
        _train(model, opt, 0, seed=2)
    after = opt.state[model[0].weight]
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v)


def test_another_changed_decay_loaded_through_the_inner_optimizer_warns_before_anything_changes():
    model, opt = _build(decay=(0.9, 0.99))
    _train(model, opt, 3, seed=1)
    sd = opt.optimizer.state_dict()
    model_b, opt_b = _build(decay=(0.9, 0.999))
    _train(model_b, opt_b, 2, seed=2)
    before = {k: v.clone() for k, v in opt_b.state[model_b[0].weight].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning raised as an error changes nothing
        with pytest.raises(
            UserWarning, match=r"shadow 1 \('ema_1'\) was saved with the decay 0.99, .* 0.999"
        ):
            opt_b.optimizer.load_state_dict(sd)
    assert all(torch.equal(v, opt_b.state[model_b[0].weight][k]) for k, v in before.items())
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 2
    with pytest.warns(UserWarning, match=r"shadow 1 \('ema_1'\) was saved with the decay 0.99, .* 0.999"):
        opt_b.optimizer.load_state_dict(sd)
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 3


def test_a_dict_with_more_shadows_than_the_optimizer_is_refused_by_the_inner_load():
    # without the decay record (ema_optim 0.2's inner state_dict()), the count is in the keys:
    # a surplus shadow kept in the state would never be updated, and every later opt.state_dict()
    # would be a dict that this optimizer's load_state_dict() refuses
    model, opt = _build(decay=(0.9, 0.99))
    _train(model, opt, 3, seed=1)
    sd = opt.optimizer.state_dict()
    for g in sd["param_groups"]:
        g.update(
            ema_steps=None, ema_updates=None, ema_decay_prod=None, ema_decay_prod_1=None, ema_decays=None
        )
    model_b, opt_b = _build(decay=0.9)
    _train(model_b, opt_b, 2, seed=2)
    before = opt_b.state_dict()
    with pytest.raises(ValueError, match=r"has the shadows \['ema_1'\].*keeps \['ema'\]"):
        opt_b.optimizer.load_state_dict(sd)
    _assert_same_state_dict(opt_b.state_dict(), before)
    opt_b.load_state_dict(opt_b.state_dict())


# ---------------------------------------------------------------- this session's red-team findings


def test_a_rewrapped_inner_optimizer_saves_the_new_wrappers_counters():
    # `opt = EMAOptimizer(opt.optimizer, decay=...)` (or a notebook cell run twice): the inner
    # optimizer keeps the hooks of the wrapper that wraps it now, not of the dropped one, whose
    # counters (still zero) used to overwrite the live ones in every state dict.
    def build(rewrap):
        model, opt = _build(decay=schedules.polyak())
        if rewrap:
            opt = EMAOptimizer(opt.optimizer, decay=schedules.polyak())
        return model, opt

    model, opt = build(rewrap=True)
    _train(model, opt, 5, seed=1)
    for sd in (opt.state_dict(), opt.optimizer.state_dict()):
        assert sd["param_groups"][0]["ema_updates"] == 5
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 5, seed=2)

    model_b, opt_b = build(rewrap=False)
    model_b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    _train(model_b, opt_b, 5, seed=2)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(opt.state[p]["ema"], opt_b.state[q]["ema"])


@pytest.mark.parametrize(
    "dtype,ema_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]
)
def test_shadows_rounded_to_a_param_dtype_of_the_same_size_are_reported(dtype, ema_dtype):
    # torch's load casts every state tensor to its param's dtype: bf16 <-> fp16 loses bits
    # (fp16's range, bf16's precision) although both take 2 bytes
    model, opt = _build(decay=0.9, dtype=dtype)
    opt = EMAOptimizer(opt.optimizer, decay=0.9, ema_dtype=ema_dtype)
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=0.9, dtype=dtype)
    opt_b = EMAOptimizer(opt_b.optimizer, decay=0.9, ema_dtype=ema_dtype)
    opt_b.optimizer.load_state_dict(opt.optimizer.state_dict())
    for p in model_b.parameters():
        assert opt_b.state[p]["ema"].dtype == ema_dtype
    with pytest.warns(UserWarning, match="rounded 4 shadows"):
        _train(model_b, opt_b, 1, seed=2)


def test_an_exact_upcast_of_the_shadows_is_not_reported():
    # bf16 shadows of fp32 params come back from fp32 exactly: nothing to report
    model, opt = _build(decay=0.9)
    opt = EMAOptimizer(opt.optimizer, decay=0.9, ema_dtype=torch.bfloat16)
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=0.9)
    opt_b = EMAOptimizer(opt_b.optimizer, decay=0.9, ema_dtype=torch.bfloat16)
    opt_b.optimizer.load_state_dict(opt.optimizer.state_dict())
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(opt.state[p]["ema"], opt_b.state[q]["ema"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model_b, opt_b, 1, seed=2)


def _split_model():
    torch.manual_seed(0)
    body, head = nn.Linear(3, 3), nn.Linear(3, 1)
    return body, head


def test_a_plain_inner_dict_loaded_through_the_inner_optimizer_keeps_ema_false_groups_out():
    body, head = _split_model()
    plain = torch.optim.SGD([{"params": body.parameters()}, {"params": head.parameters()}], lr=0.1)
    head(body(torch.randn(4, 3))).sum().backward()
    plain.step()
    sd = plain.state_dict()
    groups = [{"params": body.parameters()}, {"params": head.parameters(), "ema": False}]
    opt = EMAOptimizer(torch.optim.SGD(groups, lr=0.1), decay=0.9)
    opt.optimizer.load_state_dict(sd)
    assert opt.param_groups[1]["ema"] is False
    assert "ema" not in sd["param_groups"][1]  # the caller's dict is left as it was
    head(body(torch.randn(4, 3))).sum().backward()
    with pytest.warns(UserWarning, match="no EMA shadows"):
        opt.step()
    assert all("ema" not in opt.state[p] for p in head.parameters())
    assert all("ema" in opt.state[p] for p in body.parameters())


def _bn_run(buffers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = EMAOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.1), decay=0.9, buffers=model if buffers else None
    )
    return model, opt


def _bn_train(model, opt, steps):
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        model(torch.randn(5, 3, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_buffer_shadows_missing_from_an_inner_dict_are_reported():
    model, opt = _bn_run(buffers=False)
    _bn_train(model, opt, 3)
    model_b, opt_b = _bn_run(buffers=True)
    opt_b.optimizer.load_state_dict(opt.optimizer.state_dict())
    with pytest.warns(UserWarning, match="no buffer shadows.*buffers' EMA restarts"):
        _bn_train(model_b, opt_b, 1)


def test_buffer_shadows_in_an_inner_dict_for_an_optimizer_without_buffers_are_refused():
    model, opt = _bn_run(buffers=True)
    _bn_train(model, opt, 3)
    sd = opt.optimizer.state_dict()
    model_b, opt_b = _bn_run(buffers=False)
    _bn_train(model_b, opt_b, 2)
    before = opt_b.state_dict()
    with pytest.raises(ValueError, match=r"buffer shadows .*built without buffers=; pass buffers=model"):
        opt_b.optimizer.load_state_dict(sd)
    _assert_same_state_dict(opt_b.state_dict(), before)
    opt_b.load_state_dict(opt_b.state_dict())  # its own dicts still load


def test_a_power_shadow_loaded_from_a_constant_decay_is_refused():
    # the decay tuple reordered: a power shadow would take over a shadow averaged with a
    # constant decay, and its post-hoc snapshots would be labelled with the power profile
    power = schedules.power(sigma_rel=0.05)
    model, opt = _build(decay=(power, 0.5))
    _train(model, opt, 4, seed=1)
    sd = opt.state_dict()
    model_b, opt_b = _build(decay=(0.5, power))
    _train(model_b, opt_b, 2, seed=2)
    before = opt_b.state_dict()
    for load in (opt_b.load_state_dict, opt_b.optimizer.load_state_dict):
        with pytest.raises(
            ValueError, match=r"shadow 1 \('ema_1'\) was saved as 0.5, .*schedules.power\(gamma="
        ):
            load(sd)
        after = opt_b.state_dict()
        assert after["param_groups"] == before["param_groups"]


def test_a_power_shadow_loaded_from_a_schedule_that_cannot_be_described_warns():
    # a schedule is saved as None: it may be this very profile (polyak() is power(gamma=0)),
    # so the load goes on, with the warning that names the change
    model, opt = _build(decay=(schedules.polyak(), 0.9))
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=(schedules.power(gamma=0.0), 0.9))
    with pytest.warns(UserWarning, match=r"shadow 0 \('ema'\) was saved with the decay a schedule"):
        opt_b.load_state_dict(opt.state_dict())
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(opt.state[p]["ema"], opt_b.state[q]["ema"])


def test_a_copy_of_an_inner_optimizer_that_shares_its_hooks_leaves_the_original_alone():
    # an inner optimizer whose __getstate__ keeps its whole __dict__: a shallow copy shares its
    # hook registries, and a wrapper of the copy must not change what the original saves
    class WholeDict(torch.optim.SGD):
        def __getstate__(self):
            return self.__dict__

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = EMAOptimizer(WholeDict(model.parameters(), lr=0.1), decay=0.9)
    _train_linear = [torch.randn(2, 3) for _ in range(3)]
    for x in _train_linear:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    other = EMAOptimizer(copy.copy(opt.optimizer), decay=0.9)
    assert opt.state_dict()["param_groups"][0]["ema_steps"] == 3
    assert opt.optimizer.state_dict()["param_groups"][0]["ema_steps"] == 3
    assert other.state_dict()["param_groups"][0]["ema_steps"] == 0


def test_a_power_profile_given_by_sigma_rel_matches_its_gamma():
    # sigma_rel = 12 ** -0.5 is gamma = 0 (polyak) up to rounding: a dict saved with the one
    # loads into an optimizer built with the other
    model, opt = _build(decay=(schedules.power(gamma=0.0), POWER[1]))
    _train(model, opt, 3, seed=1)
    model_b, opt_b = _build(decay=(schedules.power(sigma_rel=12**-0.5), POWER[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_b.load_state_dict(opt.state_dict())
    assert opt_b.state_dict()["param_groups"][0]["ema_updates"] == 3
