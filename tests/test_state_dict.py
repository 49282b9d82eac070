"""state_dict / load_state_dict: standard layout, exact resume, atomic failures."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from ema_optim import EMAOptimizer, _shadows, schedules


def make(dtype=torch.float32, inner="adamw", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    params = model.parameters()
    inners = {
        "adamw": lambda: torch.optim.AdamW(params, lr=0.01),
        "sgd": lambda: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=0.01),
    }
    kwargs.setdefault("decay", 0.9)
    return model, EMAOptimizer(inners[inner](), **kwargs)


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g).to(dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def bitwise_equal(a, b):
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def full_snapshot(model, opt):
    """Everything a failed call must leave alone: params, all state, groups, counters."""
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy({id(p): s for p, s in opt.state.items()}),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        opt._rt.counters,
        opt.state is opt.optimizer.state and opt.param_groups is opt.optimizer.param_groups,
    )


def assert_unchanged(before, after):
    (p0, s0, g0, c0, shared0), (p1, s1, g1, c1, shared1) = before, after
    assert all(bitwise_equal(a, b) for a, b in zip(p0, p1))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k].keys() == s1[k].keys()
        for kk in s0[k]:
            v0, v1 = s0[k][kk], s1[k][kk]
            assert bitwise_equal(v0, v1) if torch.is_tensor(v0) else v0 == v1
    assert g0 == g1 and c0 == c1 and shared0 and shared1


def test_layout_and_weights_only_load():
    model, opt = make()
    train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    params = list(model.parameters())
    for i, p in enumerate(params):
        assert set(sd["state"][i]) == {"step", "exp_avg", "exp_avg_sq", "ema"}
        assert sd["state"][i]["ema"] is opt.state[p]["ema"]
    assert sd["param_groups"][0]["ema_steps"] == 3
    loaded = roundtrip(sd)
    assert torch.equal(loaded["state"][0]["ema"], sd["state"][0]["ema"])


CONFIGS = [
    ("adamw", torch.float32, dict(decay=0.9)),
    ("sgd", torch.float64, dict(decay=schedules.warmup(0.999), update_after_step=2, update_every=3)),
    ("rmsprop", torch.float32, dict(decay=schedules.cosine(0.5, 0.99, 5), bias_correction=True)),
    ("adamw", torch.bfloat16, dict(decay=0.95, bias_correction=True)),
]


@pytest.mark.parametrize("inner,dtype,kwargs", CONFIGS, ids=["adamw", "sgd_sched", "rmsprop_bc", "bf16"])
@pytest.mark.parametrize("n", [1, 4, 5])
def test_resume_is_exact(inner, dtype, kwargs, n):
    model, opt = make(dtype, inner, **kwargs)
    train(model, opt, n, seed=1)
    train(model, opt, n, seed=2)

    model_a, opt_a = make(dtype, inner, **kwargs)
    train(model_a, opt_a, n, seed=1)
    saved_model, saved_opt = roundtrip(model_a.state_dict()), roundtrip(opt_a.state_dict())
    model_b, opt_b = make(
        dtype, inner, seed=123, **kwargs
    )  # different init: everything must come from the files
    model_b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    train(model_b, opt_b, n, seed=2)

    for p, q in zip(model.parameters(), model_b.parameters()):
        assert bitwise_equal(p.detach(), q.detach())
        assert bitwise_equal(opt.state[p]["ema"], opt_b.state[q]["ema"])
    assert opt_b.state is opt_b.optimizer.state and opt_b.param_groups is opt_b.optimizer.param_groups


def test_fp32_shadows_of_bf16_params_stay_fp32_and_lr_stays_shared():
    model, opt = make(torch.bfloat16)
    train(model, opt, 2, seed=1)
    sd = roundtrip(opt.state_dict())
    model2, opt2 = make(torch.bfloat16)
    opt2.load_state_dict(sd)
    for p in model2.parameters():
        assert opt2.state[p]["ema"].dtype == torch.float32
        assert opt2.state[p]["exp_avg"].dtype == torch.bfloat16
    opt2.param_groups[0]["lr"] = 0.5
    assert opt2.optimizer.param_groups[0]["lr"] == 0.5


def test_plain_inner_state_dict_warns_and_restarts():
    model, opt = make()
    train(model, opt, 3, seed=1)
    plain_model = copy.deepcopy(model)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.01)
    train(plain_model, plain, 2, seed=3)
    with pytest.warns(UserWarning, match="restarts"):
        opt.load_state_dict(plain.state_dict())
    assert all("ema" not in opt.state[p] for p in model.parameters())
    assert opt._rt.counters.steps == 0 and opt._rt.counters.updates == 0
    weights = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1, seed=4)
    # restarted: the shadow is 0.9 * (weights at this step's start) + 0.1 * (weights after it)
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(opt.state[p]["ema"], 0.9 * w + 0.1 * p.detach())


def test_state_dict_before_first_step_loads_silently():
    model, opt = make()
    sd = opt.state_dict()
    _, opt2 = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)


def _drop_ema_of_param_1(sd):
    sd["state"][1].pop("ema")


def _counters_missing(sd):
    for g in sd["param_groups"]:
        g.pop("ema_steps")


def _bad_shape(sd):
    sd["state"][0]["ema"] = torch.zeros(3, 3)


def _bad_inner_shape(sd):
    sd["state"][2]["exp_avg"] = torch.zeros(5)


def _missing_inner_key(sd):
    sd["state"][0].pop("exp_avg_sq")


def _extra_group(sd):
    sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))


def _short_group(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


def _no_state(sd):
    sd.pop("state")


def _ema_not_tensor(sd):
    sd["state"][0]["ema"] = 1.0


def _bad_counter(sd):
    for g in sd["param_groups"]:
        g["ema_updates"] = -1


def _last_param_bad_shape(sd):  # fails late: after most of the dict was checked
    sd["state"][3]["ema"] = torch.zeros(7)


BAD = [
    (_drop_ema_of_param_1, "have no 'ema'"),
    (_counters_missing, "counters"),
    (_bad_shape, "shape"),
    (_bad_inner_shape, "shape"),
    (_missing_inner_key, "lacks the keys"),
    (_extra_group, "param groups"),
    (_short_group, "params"),
    (_no_state, "'state'"),
    (_ema_not_tensor, "floating tensor"),
    (_bad_counter, "ema_updates"),
    (_last_param_bad_shape, "shape"),
]


@pytest.mark.parametrize("corrupt,match", BAD, ids=[f.__name__.strip("_") for f, _ in BAD])
def test_bad_state_dict_raises_and_changes_nothing(corrupt, match):
    model, opt = make()
    train(model, opt, 2, seed=1)
    sd = roundtrip(opt.state_dict())
    model_b, opt_b = make(seed=5)
    train(model_b, opt_b, 3, seed=6)
    corrupt(sd)
    before = full_snapshot(model_b, opt_b)
    with pytest.raises(ValueError, match=match):
        opt_b.load_state_dict(sd)
    assert_unchanged(before, full_snapshot(model_b, opt_b))
    train(model_b, opt_b, 1, seed=7)  # still usable


def test_load_does_not_mutate_the_given_dict():
    model, opt = make()
    train(model, opt, 2, seed=1)
    sd = roundtrip(opt.state_dict())
    keys = {i: set(s) for i, s in sd["state"].items()}
    group_keys = [set(g) for g in sd["param_groups"]]
    _, opt2 = make()
    opt2.load_state_dict(sd)
    assert {i: set(s) for i, s in sd["state"].items()} == keys
    assert [set(g) for g in sd["param_groups"]] == group_keys


def test_group_added_after_last_step_may_lack_shadows():
    model, opt = make()
    extra = torch.nn.Parameter(torch.ones(3))
    train(model, opt, 2, seed=1)
    opt.add_param_group({"params": [extra]})
    sd = roundtrip(opt.state_dict())
    model2, opt2 = make()
    extra2 = torch.nn.Parameter(torch.ones(3))
    opt2.add_param_group({"params": [extra2]})
    opt2.load_state_dict(sd)
    extra2.grad = torch.ones(3)
    train(model2, opt2, 1, seed=2)
    assert "ema" in opt2.state[extra2]


def test_plain_inner_dict_keeps_ema_false_groups_out():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([{"params": [a]}, {"params": [b], "ema": False}], lr=1.0)
    opt = EMAOptimizer(inner, decay=0.5)
    plain = torch.optim.SGD([{"params": [a.detach().clone()]}, {"params": [b.detach().clone()]}], lr=1.0)
    with pytest.warns(UserWarning, match="restarts"):
        opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[1]["ema"] is False
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert "ema" in opt.state[a] and "ema" not in opt.state[b]


def _fresh_adam(shapes):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    return params, EMAOptimizer(torch.optim.Adam(params, lr=0.1), decay=0.9)


def _stepped_adam(shapes):
    params, opt = _fresh_adam(shapes)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


def _plain_adam_dict(shapes):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    adam = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    return adam.state_dict()


def _drop_step(sd):
    sd["state"][0].pop("step")


def _counters_as_lists(sd):
    for g in sd["param_groups"]:
        g["ema_steps"] = [2]


def _params_not_a_list(sd):
    sd["param_groups"][0]["params"] = 5


def _complex_ema(sd):
    sd["state"][0]["ema"] = torch.zeros(3, dtype=torch.complex64)


def _no_lr(sd):
    sd["param_groups"][0].pop("lr")


FRESH_BAD = [
    (lambda: _plain_adam_dict([(4,), (2, 2)]), "shape"),  # a plain dict from a differently shaped model
    (lambda: _with(_stepped_adam([(3,), (2, 2)])[1].state_dict(), _drop_step), "could not load"),
    (lambda: _with(_stepped_adam([(3,), (2, 2)])[1].state_dict(), _counters_as_lists), "ema_steps"),
    (lambda: _with(_stepped_adam([(3,), (2, 2)])[1].state_dict(), _params_not_a_list), "'params' list"),
    (lambda: _with(_stepped_adam([(3,), (2, 2)])[1].state_dict(), _complex_ema), "real floating"),
    (lambda: _with(_stepped_adam([(3,), (2, 2)])[1].state_dict(), _no_lr), "'lr'"),
]


def _with(sd, corrupt):
    sd = roundtrip(sd)
    corrupt(sd)
    return sd


@pytest.mark.parametrize(
    "make_sd,match",
    FRESH_BAD,
    ids=["plain_wrong_shapes", "no_step", "counter_list", "params_int", "complex_ema", "no_lr"],
)
def test_bad_state_dict_into_a_fresh_optimizer(make_sd, match):
    params, opt = _fresh_adam([(3,), (2, 2)])
    sd = make_sd()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0 and opt.state is opt.optimizer.state
    assert opt.param_groups is opt.optimizer.param_groups and opt.param_groups[0]["lr"] == 0.1
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # still usable


def test_shadow_missing_for_a_whole_group_that_had_one_is_refused():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = EMAOptimizer(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), decay=0.9)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    sd = roundtrip(opt.state_dict())
    sd["state"][1].pop("ema")
    with pytest.raises(ValueError, match="have no 'ema'"):
        opt.load_state_dict(sd)


def test_inner_state_dict_override_and_hooks_are_kept():
    class Counting(torch.optim.SGD):
        def state_dict(self):
            sd = super().state_dict()
            sd["calls"] = 1
            return sd

        def load_state_dict(self, sd):
            sd = dict(sd)
            assert sd.pop("calls") == 1
            super().load_state_dict(sd)

    w = torch.nn.Parameter(torch.zeros(2))
    opt = EMAOptimizer(Counting([w], lr=0.1), decay=0.5)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "wrapper_hook": True})
    w.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    assert sd["calls"] == 1 and sd["wrapper_hook"] is True
    opt.load_state_dict(roundtrip(sd))


def test_duplicate_param_in_a_group_is_averaged_once():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.warns(UserWarning, match="duplicate"):
        inner = torch.optim.SGD([w, w], lr=1.0)
    opt = EMAOptimizer(inner, decay=0.5)
    w.grad = -torch.ones(3, dtype=torch.float64)
    opt.step()  # SGD steps w twice: 0 -> 2; one EMA update: 0.5 * 0 + 0.5 * 2
    assert torch.equal(opt.state[w]["ema"], torch.ones(3, dtype=torch.float64))
    with opt.swap_ema_weights():
        assert torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.equal(w.detach(), torch.full((3,), 2.0, dtype=torch.float64))
    opt.load_state_dict(roundtrip(opt.state_dict()))


def test_deepcopy_after_a_scheduler_is_independent_and_inside_swap_gets_training_weights():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = EMAOptimizer(torch.optim.SGD([w], lr=1.0), decay=0.5)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    w.grad = torch.ones(2)
    opt.step()
    clone = copy.deepcopy(opt)
    (w2,) = clone.param_groups[0]["params"]
    w2.grad = torch.ones(2)
    clone.step()
    assert torch.equal(w.detach(), -torch.ones(2)) and torch.equal(w2.detach(), -2 * torch.ones(2))
    with opt.swap_ema_weights():
        inside = copy.deepcopy(opt)
    (w3,) = inside.param_groups[0]["params"]
    assert torch.equal(w3.detach(), w.detach()) and torch.equal(inside.state[w3]["ema"], opt.state[w]["ema"])
    w3.grad = torch.ones(2)
    inside.step()


def test_shadow_that_cannot_be_made_fails_the_load_before_anything_changes(monkeypatch):
    model, opt = make()
    train(model, opt, 2, seed=1)
    sd = roundtrip(opt.state_dict())
    model_b, opt_b = make(seed=5)
    train(model_b, opt_b, 3, seed=6)
    before = full_snapshot(model_b, opt_b)
    sd_meta = roundtrip(sd)
    sd_meta["state"][1]["ema"] = torch.empty(sd["state"][1]["ema"].shape, device="meta")
    with pytest.raises(ValueError, match="meta"):
        opt_b.load_state_dict(sd_meta)
    real, calls = _shadows.Spec.make, []

    def failing(self, p, value):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, p, value)

    monkeypatch.setattr(_shadows.Spec, "make", failing)
    with pytest.raises(ValueError, match="out of memory"):
        opt_b.load_state_dict(sd)
    assert_unchanged(before, full_snapshot(model_b, opt_b))


def test_counters_survive_when_no_group_has_shadows_yet():
    x = torch.nn.Parameter(torch.zeros(2))
    opt = EMAOptimizer(torch.optim.SGD([{"params": [x], "ema": False}], lr=0.1), update_after_step=5)
    for _ in range(3):
        x.grad = torch.ones(2)
        opt.step()
    y = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [y]})
    sd = roundtrip(opt.state_dict())
    x2, y2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt2 = EMAOptimizer(torch.optim.SGD([{"params": [x2], "ema": False}], lr=0.1), update_after_step=5)
    opt2.add_param_group({"params": [y2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    assert opt2._rt.counters.steps == 3


COUNTERS = ("ema_steps", "ema_updates", "ema_decay_prod")


def counter_layout(opt):
    """Per group: the counters state_dict() saves there, or None; checks that exactly those
    groups carry the (constant, None) placeholders in the live param groups."""
    saved = opt.state_dict()["param_groups"]
    for live, group in zip(opt.param_groups, saved):
        assert (COUNTERS[0] in live) == (COUNTERS[0] in group)
        assert all(live.get(k) is None for k in COUNTERS)
    return [tuple(g[k] for k in COUNTERS) if COUNTERS[0] in g else None for g in saved]


def test_counters_are_named_in_the_live_param_groups_that_have_shadows():
    # Loaders that rebuild groups from the live keys (DCP with flatten_optimizer_state_dict)
    # need the keys there; their live values are constant so that Dynamo never re-guards.
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    inner = torch.optim.SGD([{"params": [a]}, {"params": [b], "ema": False}], lr=1.0)
    opt = EMAOptimizer(inner, decay=0.5, bias_correction=True)
    # no shadows anywhere yet: every group that will have them (DCP's flattened load asks the
    # saved dict for the keys a live group names, and an "ema": False group never saves any)
    assert counter_layout(opt) == [(0, 0, 1.0), None]
    for p in (a, b):
        p.grad = torch.ones(2)
    opt.step()
    opt.step()
    assert counter_layout(opt) == [(2, 2, 0.25), None]
    opt.add_param_group({"params": [c]})  # no shadows until the next step, so no counters
    assert counter_layout(opt) == [(2, 2, 0.25), None, None]
    c.grad = torch.ones(2)
    opt.step()
    assert counter_layout(opt) == [(3, 3, 0.125), None, (3, 3, 0.125)]

    # Editing a placeholder changes neither the EMA nor what state_dict() saves.
    opt.param_groups[0]["ema_updates"] = 99
    assert counter_layout(opt)[0] == (3, 3, 0.125)

    # Loading puts the placeholders where the loaded counters belong; a plain dict resets them.
    sd = roundtrip(opt.state_dict())
    a2, b2, c2 = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt2 = EMAOptimizer(
        torch.optim.SGD([{"params": [a2]}, {"params": [b2], "ema": False}], lr=1.0), decay=0.5
    )
    opt2.add_param_group({"params": [c2]})
    opt2.load_state_dict(sd)
    assert counter_layout(opt2) == [(3, 3, 0.125), None, (3, 3, 0.125)]
    with pytest.warns(UserWarning, match="without EMA shadows"):
        opt2.load_state_dict({"state": {}, **_plain_groups(sd)})
    assert counter_layout(opt2) == [(0, 0, 1.0), None, (0, 0, 1.0)]


def _plain_groups(sd):
    return {"param_groups": [{k: v for k, v in g.items() if k not in COUNTERS} for g in sd["param_groups"]]}


@pytest.mark.parametrize("layout", ["now", "every group (0.2)"])
@pytest.mark.parametrize("load", ["wrapper", "inner"])
def test_a_dict_saved_before_the_first_step_loads_silently(layout, load):
    def build():
        a, b = (torch.nn.Parameter(torch.zeros(2)) for _ in range(2))
        inner = torch.optim.SGD([{"params": [a]}, {"params": [b], "ema": False}], lr=1.0)
        return (a, b), EMAOptimizer(inner, decay=0.5)

    _, opt = build()
    sd = roundtrip(opt.state_dict())
    if layout != "now":  # before, a group with "ema": False named the counters too
        sd["param_groups"][1].update({k: v for k, v in sd["param_groups"][0].items() if k != "params"})
        sd["param_groups"][1]["ema"] = False
    params, opt2 = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (opt2 if load == "wrapper" else opt2.optimizer).load_state_dict(sd)
        for p in params:
            p.grad = torch.ones(2)
        opt2.step()
    twin_params, twin = build()  # never loaded anything
    for p in twin_params:
        p.grad = torch.ones(2)
    twin.step()
    assert counter_layout(opt2) == counter_layout(twin) and counter_layout(twin)[0][0] == 1
