"""The check of a whole state dict before anything is loaded: it fits the optimizer, or a
``ValueError``/``TypeError`` names what does not, and nothing has changed."""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple, Optional, Sequence

from torch import Tensor

from . import _kernels, _shadows
from ._plan import Counters
from ._state_dict import (
    DECAY_PROD,
    RECORD,
    STEPS,
    UPDATES,
    counter_keys,
    inner_part,
    is_counter_key,
    is_group_key,
)


class LoadPlan(NamedTuple):
    inner: dict  # what the inner optimizer loads: the dict without the EMA keys
    shadows: dict[Tensor, dict[str, Tensor]]  # per param: shadow key -> saved value
    counters: Optional[Counters]  # None: the dict has no EMA (a plain inner-optimizer dict)
    buffer_shadows: dict[str, Tensor]  # buffer shadow key ("ema:bn.running_mean") -> saved value
    notes: tuple[str, ...] = ()  # warnings to give before anything changes (a changed decay)


def check(
    sd: Any,
    param_groups: list[dict],
    state: Mapping,
    n: int,
    buffers: Optional[dict[str, Tensor]] = None,
    decays: Optional[Sequence[Any]] = None,
) -> LoadPlan:
    """Validate a whole state dict for an optimizer with ``n`` shadows (and the averaged
    buffers ``{name: tensor}``, if any; ``decays``: its decay record, see
    ``_state_dict.record``); changes nothing."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for name in ("state", "param_groups"):
        if name not in sd:
            raise ValueError(f"the state dict has no {name!r} key; pass the dict from opt.state_dict()")
    saved_groups, saved_state = sd["param_groups"], sd["state"]
    if not isinstance(saved_state, Mapping) or not isinstance(saved_groups, (list, tuple)):
        raise ValueError("state_dict['state'] must be a dict and state_dict['param_groups'] a list")
    _check_groups(saved_groups, param_groups)
    id_map = _id_map(saved_groups, param_groups)
    for k, entry in saved_state.items():
        if k in id_map and not isinstance(entry, Mapping):
            raise ValueError(f"state[{k!r}] must be a dict of the param's state, got {type(entry).__name__}")
    per_group = [_group_counters(i, g, n) for i, g in enumerate(saved_groups)]
    counted = [(i, c) for i, c in enumerate(per_group) if c is not None]
    for i, c in counted[1:]:
        if c != counted[0][1]:
            raise ValueError(
                f"param groups {counted[0][0]} and {i} of the state dict disagree on the EMA counters: "
                f"{_describe(counted[0][1])} and {_describe(c)}"
            )
    counters = counted[0][1] if counted else None
    shadows = _shadows_of(saved_groups, saved_state, param_groups, id_map, per_group, n)
    buffer_shadows = _buffer_shadows_of(saved_state, id_map, buffers, n, counters)
    for k, entry in saved_state.items():
        if k in id_map:
            _check_inner_state(k, id_map[k], entry, state.get(id_map[k], {}))
    _check_flag_state(saved_groups, saved_state)
    notes = check_record(saved_groups, decays) if decays is not None and counters is not None else []
    return LoadPlan(inner_part(sd), shadows, counters, buffer_shadows, tuple(notes))


def check_record(saved_groups: Sequence[Any], decays: Sequence[Any]) -> list[str]:
    """The saved decay record against this optimizer's (``decays``). A ``schedules.power`` shadow
    saved with another gamma, or with a constant decay, is refused: its post-hoc snapshots would
    be labelled with the wrong profile. Another changed decay is returned as a note for a
    warning. A dict saved before the record existed has none: nothing to compare."""
    saved = next(
        (g[RECORD] for g in saved_groups if isinstance(g, Mapping) and g.get(RECORD) is not None), None
    )
    if saved is None:
        return []
    if not isinstance(saved, (list, tuple)) or not all(map(_is_record_entry, saved)):
        raise ValueError(
            f"the state dict's {RECORD!r} is {reprlib.repr(saved)}; it must list each shadow's decay "
            "(a float, {'power_gamma': g} or None), as opt.state_dict() saves it"
        )
    if len(saved) != len(decays):
        raise ValueError(
            f"the state dict's {RECORD!r} lists {len(saved)} decays, this optimizer keeps {len(decays)} "
            "shadows (one per decay): the state dict does not fit"
        )
    notes = []
    for k, (was, now) in enumerate(zip(saved, decays)):
        if _same_decay(was, now):
            continue
        where = f"shadow {k} ({_shadows.key(k)!r})"
        if isinstance(now, Mapping) and was is not None:  # a power shadow saved as another decay
            # (None: a schedule that cannot be described, possibly this profile: polyak() is gamma 0)
            order = ", ".join(map(_describe_decay, saved))
            raise ValueError(
                f"{where} was saved as {_describe_decay(was)}, this optimizer's decay[{k}] is "
                f"{_describe_decay(now)}: its post-hoc snapshots would be labelled with the wrong profile "
                f"(the decay tuple reordered?). Build the optimizer with the decays as saved: ({order})"
            )
        notes.append(
            f"{where} was saved with the decay {_describe_decay(was)}, this optimizer's is "
            f"{_describe_decay(now)}: its average goes on with the new decay"
        )
    return notes


def check_shadow_keys(saved_state: Any, n: int) -> None:
    """No state entry holds a shadow that an optimizer with ``n`` shadows does not keep (what a
    load through the inner optimizer checks when the dict has no decay record): it would never
    be updated, and every later state dict would not fit."""
    if not isinstance(saved_state, Mapping):
        return
    names = _shadows.keys(n)
    for k, entry in saved_state.items():
        if not isinstance(entry, Mapping):
            continue
        extra = sorted(
            str(kk) for kk in entry if _shadows.is_key(kk) and str(kk).split(":", 1)[0] not in names
        )
        if extra:
            raise ValueError(
                f"state[{k!r}] has the shadows {extra[:5]}, this optimizer keeps {list(names)} "
                f"(decay has {n} entries): the state dict does not fit"
            )


def _is_record_entry(v: Any) -> bool:
    if isinstance(v, Mapping):
        return set(v) == {"power_gamma"} and _is_number(v["power_gamma"])
    return v is None or (_is_number(v) and not isinstance(v, Tensor))


def _same_decay(was: Any, now: Any) -> bool:
    if isinstance(was, Mapping) and isinstance(now, Mapping):
        # abs_tol: a profile given by its sigma_rel has a rounded gamma (12 ** -0.5: ~4e-16, not 0)
        return math.isclose(
            float(was["power_gamma"]), float(now["power_gamma"]), rel_tol=1e-12, abs_tol=1e-12
        )
    if isinstance(was, Mapping) or isinstance(now, Mapping):
        return False
    if was is None or now is None:  # a schedule that cannot be described: nothing to compare
        return was is None and now is None
    return float(was) == float(now)


def _describe_decay(v: Any) -> str:
    if isinstance(v, Mapping):
        return f"schedules.power(gamma={float(v['power_gamma'])!r})"
    return "a schedule" if v is None else repr(float(v))


def _buffer_shadows_of(
    saved_state: Mapping,
    id_map: dict[Any, Tensor],
    buffers: Optional[dict[str, Tensor]],
    n: int,
    counters: Any,
) -> dict[str, Tensor]:
    """The saved buffer shadows (wherever a param's state holds them), checked against the
    optimizer's buffers: all of them for every shadow, or none (a dict saved without buffers)."""
    found = {
        kk: v
        for k, entry in saved_state.items()
        if k in id_map
        for kk, v in entry.items()
        if _shadows.is_buffer_key(kk)
    }
    if not found:
        return {}
    _check_names({_shadows.split_buffer_key(kk)[1] for kk in found}, list(buffers) if buffers else None)
    ours = set(buffers or ())
    if counters is None:
        raise ValueError("the state dict has buffer shadows but no EMA counters")
    wanted = {_shadows.buffer_key(k, name) for name in ours for k in range(n)}
    if set(found) != wanted:
        raise ValueError(
            f"the state dict's buffer shadows {sorted(set(found) ^ wanted)[:5]} do not fit this optimizer's "
            f"{n} shadow(s) per buffer"
        )
    assert buffers is not None  # its names are those of the shadows found (checked above)
    for kk, v in found.items():
        _checked_shadow("buffer", kk, buffers[_shadows.split_buffer_key(kk)[1]], v)
    return found


def check_buffer_names(saved_state: Any, ours: Optional[Sequence[str]]) -> None:
    """The buffers that the dict's shadows belong to (wherever they are kept) are this
    optimizer's (``ours``; None: built without ``buffers=``)."""
    if not isinstance(saved_state, Mapping):
        return
    names = {
        _shadows.split_buffer_key(kk)[1]
        for entry in saved_state.values()
        if isinstance(entry, Mapping)
        for kk in entry
        if _shadows.is_buffer_key(kk)
    }
    if names:
        _check_names(names, ours)


def _check_names(names: set[str], ours: Optional[Sequence[str]]) -> None:
    if not ours:
        raise ValueError(
            f"the state dict has buffer shadows ({sorted(names)[:5]}) but this optimizer was built "
            "without buffers=; pass buffers=model to load them"
        )
    extra, missing = sorted(names - set(ours)), sorted(set(ours) - names)
    if extra or missing:
        what = []
        if extra:
            what.append(f"has shadows for the buffers {extra[:5]} that this optimizer does not average")
        if missing:
            what.append(f"has no shadows for the buffers {missing[:5]} that it does")
        raise ValueError(
            f"the state dict {' and '.join(what)}; build the optimizer with the same buffers= module"
        )


def _check_groups(saved_groups: Sequence, param_groups: list[dict]) -> None:
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}"
        )
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"param group {i} of the state dict has no 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {i} of the state dict has {len(saved['params'])} params, "
                f"this optimizer's has {len(group['params'])}"
            )
        if "lr" in group and "lr" not in saved:
            raise ValueError(f"param group {i} of the state dict has no 'lr'")
        if _shadows.ENABLE in saved:
            _shadows.enabled(saved, i)
        for key, live in group.items():
            if key in saved and not is_group_key(key) and not _same_kind(live, saved[key]):
                raise ValueError(
                    f"param group {i} of the state dict has {key!r}: {reprlib.repr(saved[key])}, this "
                    f"optimizer's has {reprlib.repr(live)}; pass a state dict saved by this kind of optimizer"
                )


def _same_kind(live: Any, saved: Any) -> bool:
    """A hyperparameter the inner step computes with is still of its kind: a flag (``amsgrad``),
    an option torch may choose (``foreach``: None), a number (``lr``), or a tuple of numbers
    (``betas``). Others (names, lists of names) are not checked."""
    if live is None:  # foreach, fused, LBFGS's line_search_fn
        return saved is None or isinstance(saved, (bool, str)) or _is_number(saved)
    if isinstance(live, bool):  # a flag; None lets torch choose, as for foreach
        return saved is None or isinstance(saved, bool)
    if _is_number(live):
        return _is_number(saved)
    if isinstance(live, (tuple, list)) and live and all(_is_number(v) for v in live):
        return isinstance(saved, (tuple, list)) and len(saved) == len(live) and all(map(_is_number, saved))
    return True


def _is_number(v: Any) -> bool:
    """A real number, or a one-element real tensor (torch accepts ``lr=torch.tensor(0.01)``)."""
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.is_complex()
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _id_map(saved_groups: Sequence[Mapping], param_groups: list[dict]) -> dict[Any, Tensor]:
    id_map: dict[Any, Tensor] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        for j, (k, p) in enumerate(zip(saved["params"], group["params"])):
            where = f"param group {i} of the state dict lists"
            if not isinstance(k, Hashable) or isinstance(k, Tensor):
                kind = type(k).__name__
                raise ValueError(f"{where} {kind} {k!r} as a param id (params[{j}]); ids are ints")
            if id_map.setdefault(k, p) is not p:
                raise ValueError(f"{where} param id {k!r} (params[{j}]) that names another param too")
    return id_map


def _group_counters(i: int, group: Mapping, n: int) -> Optional[Counters]:
    present = [k for k in group if is_counter_key(k)]
    if not present:
        return None
    wanted = counter_keys(n)
    if set(present) != set(wanted):
        has = sum(1 for k in present if k.startswith(DECAY_PROD))
        if {STEPS, UPDATES, DECAY_PROD} <= set(present) and has != n:
            raise ValueError(
                f"param group {i} of the state dict has EMA counters for {has} shadows, this optimizer "
                f"keeps {n} (decay has {n} entries): the state dict does not fit"
            )
        raise ValueError(f"param group {i} of the state dict has only some of the EMA counters {wanted}")
    steps, updates, *prods = (group[k] for k in wanted)
    for name, v in ((STEPS, steps), (UPDATES, updates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"param group {i} of the state dict has {name}={v!r}; it must be an int >= 0")
    where = f"param group {i} of the state dict has"
    if updates > steps:
        raise ValueError(f"{where} {UPDATES}={updates} > {STEPS}={steps}: more EMA updates than steps")
    for name, v in zip(wanted[2:], prods):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{where} {name}={v!r}; it must be a float in [0, 1]")
        if updates == 0 and v != 1.0:  # the product of no decays
            raise ValueError(f"{where} {name}={v!r} but {UPDATES}=0: with no update it must be 1.0")
    return Counters(steps, updates, tuple(float(v) for v in prods))


def _shadows_of(
    saved_groups: Sequence[Mapping],
    saved_state: Mapping,
    param_groups: list[dict],
    id_map: dict[Any, Tensor],
    per_group: list[Optional[Counters]],
    n: int,
) -> dict[Tensor, dict[str, Tensor]]:
    """The saved shadows by param, after checking that they fit."""
    names = _shadows.keys(n)
    found = []
    for saved, group in zip(saved_groups, param_groups):
        enabled = saved.get(_shadows.ENABLE, group.get(_shadows.ENABLE, True))
        averaged = list(
            {id(id_map[k]): k for k in saved["params"] if enabled and _shadows.is_float(id_map[k])}.values()
        )
        have = [k for k in averaged if any(_shadows.is_param_key(kk) for kk in saved_state.get(k, {}))]
        found.append((averaged, have))
    any_shadow = any(have for _, have in found)
    counted = [c for c in per_group if c is not None]
    if counted and counted[0].updates > 0 and not any_shadow and any(a for a, _ in found):
        raise ValueError(
            f"the state dict has EMA counters ({UPDATES}={counted[0].updates}) but no shadows: it does not "
            "fit (a dict whose shadows were removed?); load a complete dict, or a plain inner-optimizer "
            "dict without the EMA counters to restart the EMA"
        )
    shadows: dict[Tensor, dict[str, Tensor]] = {}
    for i, ((averaged, have), own) in enumerate(zip(found, per_group)):
        if have and own is None:
            raise ValueError(
                f"param group {i} of the state dict has 'ema' shadows but no EMA counters "
                f"({', '.join(counter_keys(n))})"
            )
        # A group with counters had shadows when it was saved (unless none had any yet).
        if len(have) != len(averaged) and (have or (own is not None and own.steps > 0 and any_shadow)):
            missing = [k for k in averaged if k not in have]
            raise ValueError(f"param group {i}: params {missing[:5]} have no 'ema' shadow but others do")
        for k in have:
            entry = saved_state[k]
            found = sorted(kk for kk in entry if _shadows.is_param_key(kk))
            if found != sorted(names):
                raise ValueError(
                    f"state[{k!r}] has the shadows {found}, this optimizer keeps {list(names)} "
                    f"(decay has {n} entries): the state dict does not fit"
                )
            shadows[id_map[k]] = {name: _checked_shadow(k, name, id_map[k], entry[name]) for name in names}
    for saved, group in zip(saved_groups, param_groups):  # groups out of the EMA keep their shadows
        if saved.get(_shadows.ENABLE, group.get(_shadows.ENABLE, True)):
            continue
        for k in saved["params"]:
            entry = saved_state.get(k, {})
            stopped = sorted(kk for kk in entry if _shadows.is_param_key(kk))
            if not stopped:
                continue
            if stopped != sorted(names):
                raise ValueError(
                    f"state[{k!r}] has the shadows {stopped}, this optimizer keeps {list(names)} "
                    f"(decay has {n} entries): the state dict does not fit"
                )
            shadows[id_map[k]] = {name: _checked_shadow(k, name, id_map[k], entry[name]) for name in names}
    return shadows


def _checked_shadow(k: Any, name: str, p: Tensor, value: Any) -> Tensor:
    """``value`` as the shadow ``name`` of ``p``: a param's (``k`` its state dict id) or a
    buffer's (``name`` is ``"ema:<buffer>"``)."""
    if _shadows.is_buffer_key(name):
        buffer = _shadows.split_buffer_key(name)[1]
        where, its = f"the shadow {name!r} of the buffer {buffer!r}", "the buffer"
    else:
        where, its = f"state[{k!r}][{name!r}]", "its param"
    if not isinstance(value, Tensor) or not _shadows.is_float(value) or value.is_complex() != p.is_complex():
        kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        like = "complex" if p.is_complex() else "real"
        raise ValueError(f"{where} must be a {like} floating tensor like {its}, got a {kind}")
    if value.is_meta:
        raise ValueError(f"{where} is a meta tensor: it holds no values")
    if value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, {its} has {tuple(p.shape)}")
    if (_kernels.local(value) is value) != (_kernels.local(p) is p):
        raise ValueError(
            f"{where} and {its} must both be DTensors or both plain tensors; "
            "for sharded models load through torch.distributed.checkpoint's set_optimizer_state_dict"
        )
    return value


def _check_inner_state(k: Any, p: Tensor, saved: Mapping, current: Mapping) -> None:
    """Inner keys must fit the param and what this optimizer already holds for it."""
    current = {kk: v for kk, v in current.items() if not _shadows.is_key(kk)}
    given = {kk: v for kk, v in saved.items() if not _shadows.is_key(kk)}
    if current and given:
        missing = current.keys() - given.keys()
        if missing:
            raise ValueError(
                f"state[{k!r}] lacks the keys {sorted(map(str, missing))} of this optimizer's state"
            )
    for kk, v in given.items():
        cur = current.get(kk)
        if kk in SCALARS:
            if not _is_number(v):
                kind = type(v).__name__
                raise ValueError(f"state[{k!r}][{kk!r}] must be a number or a one-element tensor, got {kind}")
            if not isinstance(v, Tensor):  # a Python number (older torch): torch's optimizers take it
                continue
        tensor_expected = isinstance(cur, Tensor) or kk in PARAM_SHAPED
        if not isinstance(v, Tensor):
            if tensor_expected and not (kk == "momentum_buffer" and v is None):
                raise ValueError(f"state[{k!r}][{kk!r}] must be a tensor, got {type(v).__name__}")
            continue
        if v.is_meta and not p.is_meta:
            raise ValueError(f"state[{k!r}][{kk!r}] is a meta tensor: it holds no values")
        expected = cur.shape if isinstance(cur, Tensor) else p.shape if kk in PARAM_SHAPED else None
        if expected is not None and v.shape != expected:
            raise ValueError(f"state[{k!r}][{kk!r}] has shape {tuple(v.shape)}, expected {tuple(expected)}")


def _check_flag_state(saved_groups: Sequence[Mapping], saved_state: Mapping) -> None:
    """A stock flag that needs per-param state (Adam's ``amsgrad``, RMSprop's ``centered``) has
    it for every param whose state the dict holds, or the first step would fail (KeyError)."""
    for i, group in enumerate(saved_groups):
        for flag, needed in FLAG_STATE.items():
            if group.get(flag) is not True:
                continue
            for k in group["params"]:
                entry = saved_state.get(k)
                inner = [kk for kk in entry if not _shadows.is_key(kk)] if isinstance(entry, Mapping) else []
                if inner and needed not in inner:
                    raise ValueError(
                        f"state[{k!r}] lacks {needed!r}, which param group {i}'s {flag!r}: True needs; "
                        "pass a state dict saved with the same settings"
                    )


def _describe(c: Counters) -> str:
    prods = ", ".join(f"{k}={v}" for k, v in zip(counter_keys(len(c.decay_prods))[2:], c.decay_prods))
    return f"({STEPS}={c.steps}, {UPDATES}={c.updates}, {prods})"


# Stock flags whose True value needs a per-param state entry.
FLAG_STATE = {"amsgrad": "max_exp_avg_sq", "centered": "grad_avg"}


# Stock torch.optim state entries that are one number: a 0-dim tensor, or a Python number, which
# torch's optimizers turn back into a tensor on load (older torch versions saved "step" so).
SCALARS = frozenset({"step", "eta", "mu", "mu_product"})


# Stock torch.optim state entries that always have their param's shape.
PARAM_SHAPED = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "square_avg",
        "acc_delta",
        "sum",
        "grad_avg",
        "ax",
        "prev",
        "step_size",
        "exp_inf",
    }
)


def counters_in(param_groups: Sequence[Mapping], n: int) -> tuple[Optional[Counters], str]:
    """The EMA counters that a dict loaded by the inner optimizer left in its groups, checked;
    or None and why not (none saved, placeholders only, or values that do not fit)."""
    found = []
    for i, group in enumerate(param_groups):
        if any(group.get(k) is not None for k in counter_keys(n)):
            try:
                c = _group_counters(i, group, n)
            except ValueError as e:
                return None, f"its EMA counters do not fit ({e})"
            if c is not None:
                found.append(c)
    if not found:
        return None, "no EMA counters (saved by ema_optim 0.2's inner state_dict()?)"
    if any(c != found[0] for c in found[1:]):
        return None, "its param groups disagree on the EMA counters"
    return found[0], ""
