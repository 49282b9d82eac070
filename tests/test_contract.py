"""torch's generic optimizer contract, held by the wrapper for several inner optimizers.

Our own statement of what torch.optim promises any optimizer (step hooks, state-dict hooks,
non-param state keys, deepcopy, printing, defaults, schedulers, closures), each checked
against the plain inner optimizer doing the same thing: the wrapper must look like its
inner optimizer plus the EMA, never like two optimizers.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ema_optim import EMAOptimizer

from .test_reliability import freeze

INNERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_forloop": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.01),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.01),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3),
}
each_inner = pytest.mark.parametrize("name", list(INNERS))


def build(name, wrapped=True, seed=0):
    """Two params (a matrix and a vector), the named inner optimizer, wrapped or not."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(3, 2, generator=g)),
        torch.nn.Parameter(torch.randn(3, generator=g)),
    ]
    inner = INNERS[name](params)
    return params, (EMAOptimizer(inner, decay=0.7) if wrapped else inner)


def closure_for(params, opt):
    """A closure that computes a loss and its gradients (every optimizer here accepts one)."""

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    return closure


def run_steps(params, opt, steps=3):
    closure = closure_for(params, opt)
    return [opt.step(closure) for _ in range(steps)]


def inner_of(opt):
    return opt.optimizer if isinstance(opt, EMAOptimizer) else opt


# ---------------------------------------------------------------------------------------------
# Step hooks: torch runs global pre hooks, the instance's pre hooks, the step, the instance's
# post hooks, then global post hooks, each once, with the stepping optimizer and its
# (self, *args) and kwargs. With the wrapper, the stepping optimizer is the wrapper; the
# inner optimizer's own instance hooks run inside its step, with the inner optimizer.
# ---------------------------------------------------------------------------------------------


def record_hooks(opt, calls):
    """Register every kind of step hook; each call is recorded as (hook, optimizer, args, kwargs)."""

    def hook(name):
        def record(optimizer, args, kwargs):
            calls.append((name, optimizer, args, dict(kwargs)))

        return record

    handles = [
        register_optimizer_step_pre_hook(hook("global_pre")),
        register_optimizer_step_post_hook(hook("global_post")),
    ]
    for who, target in (("wrapper", opt), ("inner", inner_of(opt))):
        if who == "wrapper" and target is inner_of(opt):
            continue  # a plain optimizer: only its own instance hooks
        handles.append(target.register_step_pre_hook(hook(f"{who}_pre")))
        handles.append(target.register_step_post_hook(hook(f"{who}_post")))
    return handles


@each_inner
def test_step_hooks_run_once_per_step_in_torch_order(name):
    params, opt = build(name)
    plain_params, plain = build(name, wrapped=False)
    calls, plain_calls = [], []
    handles = record_hooks(opt, calls) + record_hooks(plain, plain_calls)
    try:
        closure = closure_for(params, opt)
        for _ in range(2):
            opt.step(closure)
        plain_closure = closure_for(plain_params, plain)
        for _ in range(2):
            plain.step(plain_closure)
    finally:
        for h in handles:
            h.remove()
    inner = opt.optimizer
    one_step = [
        ("global_pre", opt, (opt, closure)),
        ("wrapper_pre", opt, (opt, closure)),
        ("inner_pre", inner, (inner, closure)),
        ("inner_post", inner, (inner, closure)),
        ("wrapper_post", opt, (opt, closure)),
        ("global_post", opt, (opt, closure)),
    ]
    assert [(n, o, a) for n, o, a, _ in calls if o in (opt, inner)] == one_step * 2
    assert all(k == {} for *_, k in calls)
    # the plain optimizer: the same sequence without the wrapper's own hooks
    plain_step = [("global_pre", plain), ("inner_pre", plain), ("inner_post", plain), ("global_post", plain)]
    assert [(n, o) for n, o, _, _ in plain_calls if o is plain] == plain_step * 2
    # and the removed hooks no longer run
    calls.clear()
    opt.step(closure)
    assert calls == []


@each_inner
def test_step_pre_hooks_may_replace_the_arguments(name):
    params, opt = build(name)
    ran = []

    def closure():
        ran.append(1)
        return closure_for(params, opt)()

    # a wrapper hook and an inner hook each hand the step a closure the caller did not pass
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, closure), kwargs))
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: (args, kwargs) if len(args) == 2 else None)
    loss = opt.step()
    assert ran and isinstance(loss, torch.Tensor)


@each_inner
def test_a_step_pre_hook_that_returns_a_bad_value_is_refused_like_torch(name):
    for wrapped in (False, True):
        params, opt = build(name, wrapped=wrapped)
        run_steps(params, opt, 1)
        before = freeze([list(params), opt.state_dict()])
        inner_of(opt).register_step_pre_hook(lambda o, args, kwargs: 5)
        with pytest.raises(
            RuntimeError, match=r"must return None or a tuple of \(new_args, new_kwargs\), but got 5"
        ):
            opt.step(closure_for(params, opt))
        assert freeze([list(params), opt.state_dict()]) == before


@each_inner
def test_a_scheduler_on_the_inner_optimizer_leaves_the_hooks_once_per_step(name):
    params, inner = build(name, wrapped=False)
    scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)  # patches inner.step
    opt = EMAOptimizer(inner, decay=0.7)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(o))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
            run_steps(params, opt, 2)
            scheduler.step()
    finally:
        handle.remove()
    assert calls == [opt, opt]
    assert inner.param_groups[0]["lr"] == pytest.approx(INNERS[name](params).defaults["lr"] / 2)


def test_a_profiler_sees_the_wrapper_step_and_the_inner_step_inside_it():
    params, opt = build("adam")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure_for(params, opt))
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#EMAOptimizer.step") == 1
    assert names.count("Optimizer.step#Adam.step") == 1


# ---------------------------------------------------------------------------------------------
# State-dict hooks and non-param state keys.
# ---------------------------------------------------------------------------------------------


def _mark_state(optimizer):
    optimizer.state["marker"] = 1  # a non-param key, as torch's own state-dict hook tests do


def _move_mark(optimizer, sd):
    sd["moved_marker"] = sd["state"].pop("marker", None)
    return sd


@each_inner
def test_state_dict_hooks_run_once_with_the_wrapper(name):
    params, opt = build(name)
    run_steps(params, opt, 2)
    calls = []
    opt.register_state_dict_pre_hook(_mark_state)
    opt.register_state_dict_post_hook(_move_mark)
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre_first", o)), prepend=True)
    opt.optimizer.register_state_dict_post_hook(lambda o, sd: calls.append(("inner_post", o)))
    sd = opt.state_dict()
    assert calls == [("pre_first", opt), ("inner_post", opt.optimizer)]
    assert sd["moved_marker"] == 1 and "marker" not in sd["state"]
    assert sd["state"][0]["ema"].shape == (3, 2)

    params2, opt2 = build(name, seed=1)
    loaded = []

    def halve_lr(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] /= 2
        return state_dict

    opt2.register_load_state_dict_pre_hook(halve_lr)
    opt2.register_load_state_dict_pre_hook(lambda o, s: loaded.append(("pre_first", o)), prepend=True)
    opt2.register_load_state_dict_post_hook(lambda o: loaded.append(("post", o, o.param_groups[0]["lr"])))
    opt2.optimizer.register_load_state_dict_post_hook(lambda o: loaded.append(("inner_post", o)))
    opt2.load_state_dict(sd)
    lr = opt.param_groups[0]["lr"] / 2
    assert loaded == [("pre_first", opt2), ("inner_post", opt2.optimizer), ("post", opt2, lr)]
    assert opt2.optimizer.param_groups[0]["lr"] == lr
    run_steps(params2, opt2, 1)


@each_inner
def test_non_param_state_keys_pass_through_like_torch(name):
    results = []
    for wrapped in (False, True):
        params, opt = build(name, wrapped=wrapped)
        run_steps(params, opt, 2)
        opt.state["extra"] = {"note": torch.arange(3.0)}
        opt.state[7] = "an int key that names no param"
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        params2, opt2 = build(name, wrapped=wrapped, seed=1)
        opt2.load_state_dict(torch.load(buf, weights_only=True))
        run_steps(params2, opt2, 3)
        results.append(freeze([opt2.state["extra"], opt2.state[7], list(params2)]))
    assert results[0] == results[1]
    assert "ema" in opt2.state[params2[0]]


# ---------------------------------------------------------------------------------------------
# deepcopy, pickle, printing, defaults, schedulers, closures, zero_grad.
# ---------------------------------------------------------------------------------------------


@each_inner
def test_deepcopy_is_an_independent_optimizer_with_the_same_state(name):
    params, opt = build(name)
    run_steps(params, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert freeze(clone.state_dict()) == freeze(opt.state_dict())
        for attr in (
            "decay",
            "update_after_step",
            "update_every",
            "bias_correction",
            "ema_dtype",
            "ema_device",
        ):
            assert getattr(clone, attr) == getattr(opt, attr)
        # torch's __setstate__ adds "differentiable" to optimizers that lack it (LBFGS)
        assert clone.defaults is clone.optimizer.defaults
        assert {**opt.defaults, "differentiable": False} == {**clone.defaults, "differentiable": False}
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        assert all(c is not p and torch.equal(c, p) for c, p in zip(clone_params, params))
        if name == "lbfgs":  # torch's own LBFGS cannot step after a copy (it loses `_params`)
            continue
        before = freeze([list(params), opt.state_dict()])
        run_steps(clone_params, clone, 2)
        assert freeze([list(params), opt.state_dict()]) == before  # the original is untouched
    if name != "lbfgs":
        run_steps(params, opt, 2)
        assert freeze(clone.state_dict()) == freeze(opt.state_dict())  # and both compute the same


@each_inner
def test_printing_shows_the_settings_and_the_inner_optimizer(name):
    params, opt = build(name)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "ema": False})
    text = repr(opt)
    assert text.startswith("EMAOptimizer(decay=0.7, update_after_step=0, update_every=1")
    assert repr(opt.optimizer) in text and "Parameter Group 1" in text
    assert str(opt) == text


@each_inner
def test_defaults_are_the_inner_optimizers(name):
    params, opt = build(name)
    assert opt.defaults is opt.optimizer.defaults
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})  # filled from the defaults, as torch does
    assert opt.param_groups[-1]["lr"] == opt.defaults["lr"]
    assert {k for k in opt.param_groups[-1] if k in opt.defaults} == set(opt.defaults)


@each_inner
def test_a_scheduler_accepts_the_wrapper_without_warnings(name):
    params, opt = build(name)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr = opt.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            run_steps(params, opt, 1)
            scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(lr / 4)


@each_inner
def test_step_returns_the_closures_loss_and_matches_the_plain_optimizer(name):
    params, opt = build(name)
    plain_params, plain = build(name, wrapped=False)
    losses, plain_losses = run_steps(params, opt), run_steps(plain_params, plain)
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses))
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))  # the EMA never moves the weights


@each_inner
def test_zero_grad_like_torch(name):
    params, opt = build(name)
    for set_to_none in (False, True):
        run_steps(params, opt, 1)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.zero_grad(set_to_none=set_to_none)
        assert all(
            (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p)) for p in params
        )
