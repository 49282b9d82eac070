"""How the EMA appears in a torch optimizer state dict (the check of a whole dict before
anything is loaded is in ``_load_check``).

Layout (the inner optimizer's own, plus):

- ``state[i]["ema"]``, ``state[i]["ema_1"]``, ...: the shadows of param ``i``;
- in each param group that has shadows (before the first step, every group without
  ``"ema": False``): the counters
  ``ema_steps``, ``ema_updates``, ``ema_decay_prod`` (and ``ema_decay_prod_1``, ... for more
  shadows), plain ints and floats, and ``ema_decays``: each shadow's decay where it can be
  described (a float for a constant, ``{"power_gamma": g}`` for a ``schedules.power`` profile,
  None for another schedule). The live groups carry the same keys with ``None`` placeholders,
  so that loaders which rebuild groups from the live keys (DCP's flattened layout) find them,
  and a compiled step never sees them change.

The inner optimizer's own ``state_dict()`` gives the same dict (a post hook fills the
counters), so code that saves through ``opt.optimizer`` keeps the EMA exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import _shadows
from ._plan import Counters

STEPS, UPDATES, DECAY_PROD = "ema_steps", "ema_updates", "ema_decay_prod"
RECORD = "ema_decays"  # per shadow: its decay, as far as it can be described


# Keys a live group may have that a saved one may lack (torch's LR schedulers add initial_lr).
OPTIONAL_GROUP_KEYS = frozenset({"initial_lr", "param_names", _shadows.ENABLE})


def counter_keys(n: int) -> tuple[str, ...]:
    return (STEPS, UPDATES, DECAY_PROD) + tuple(f"{DECAY_PROD}_{k}" for k in range(1, n))


def is_counter_key(name: Any) -> bool:
    return name in (STEPS, UPDATES, DECAY_PROD) or (
        isinstance(name, str) and name.startswith(DECAY_PROD + "_") and name[len(DECAY_PROD) + 1 :].isdigit()
    )


def is_group_key(name: Any) -> bool:
    """A key the EMA keeps in a param group: a counter or the decay record."""
    return name == RECORD or is_counter_key(name)


def record(decays: Sequence[Any]) -> list[Any]:
    """Each decay as saved: a float (a constant), ``{"power_gamma": g}`` (``schedules.power``),
    or None (another schedule, which cannot be described)."""
    from .schedules import _power_gamma  # schedules imports posthoc, which reads state dicts

    out: list[Any] = []
    for d in decays:
        gamma = _power_gamma(d)
        out.append(float(d) if not callable(d) else None if gamma is None else {"power_gamma": gamma})
    return out


def publish(param_groups: list[dict], state: Mapping, n: int) -> None:
    """Name the counters (``None`` placeholders) in the live groups whose params have shadows,
    while none has any in every group that will (not an ``"ema": False`` one, which never does);
    a group added since the last step has none yet."""
    has = [any(_shadows.key(0) in state.get(p, ()) for p in g["params"]) for g in param_groups]
    for i, (g, h) in enumerate(zip(param_groups, has)):
        for name in [k for k in g if is_group_key(k)]:
            del g[name]
        if h or (not any(has) and _shadows.enabled(g, i)):
            g.update(dict.fromkeys((*counter_keys(n), RECORD)))


def to_saved(sd: dict, live_groups: list[dict], counters: Counters, decays: list[Any]) -> dict:
    """The inner optimizer's state dict with the real counters and decay record in place of
    the placeholders and plain dicts for the per-param state (``torch.load(weights_only=True)``
    reads it)."""
    values = (counters.steps, counters.updates, *counters.decay_prods)
    for saved, live in zip(sd["param_groups"], live_groups):
        if STEPS in live:
            saved.update(zip(counter_keys(len(counters.decay_prods)), values))
            saved[RECORD] = list(decays)
    sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
    return sd


def missing_group_keys(before: Sequence[dict], after: Sequence[dict]) -> Optional[str]:
    """After the inner optimizer loaded (its ``__setstate__`` fills defaults): a group that
    lacks keys the optimizer's groups had, described; None if every group has them."""
    for i, (old, new) in enumerate(zip(before, after)):
        lost = [k for k in old if k not in new and k not in OPTIONAL_GROUP_KEYS and not is_group_key(k)]
        if lost:
            return f"param group {i} of the state dict lacks the keys {sorted(map(str, lost))}"
    return None


def inner_part(sd: Mapping) -> dict:
    """The dict without the EMA keys; per-param entries left empty are dropped."""
    state = {}
    for k, v in sd["state"].items():
        if isinstance(v, Mapping):
            v = {kk: vv for kk, vv in v.items() if not _shadows.is_key(kk)}
            if not v:
                continue
        state[k] = v
    groups = [{k: v for k, v in g.items() if not is_group_key(k)} for g in sd["param_groups"]]
    return {**sd, "state": state, "param_groups": groups}


def load_inner(inner: Any, inner_sd: dict) -> None:
    """Load the inner optimizer's part; on any failure put it back as it was."""
    old = (inner.state, inner.param_groups)
    try:
        inner.load_state_dict(with_enable_flags(inner_sd, inner.param_groups))
        problem = missing_group_keys(old[1], inner.param_groups)
        if problem:
            raise ValueError(f"{problem}; pass a state dict saved by this kind of optimizer")
    except Exception as e:
        inner.state, inner.param_groups = old
        if isinstance(e, ValueError) and str(e).startswith("param group"):
            raise
        raise ValueError(f"the inner optimizer could not load the state dict: {e!r}") from e


def with_enable_flags(sd: Mapping, live_groups: list[dict]) -> dict:
    """The dict (a new one: the caller's is left alone) with each live group's ``"ema"`` flag
    in the saved group that has none: torch's load keeps only the saved keys, so a dict saved
    without the flag (before the wrapper) would put an ``"ema": False`` group into the EMA."""
    groups, flag = sd.get("param_groups"), _shadows.ENABLE
    if not isinstance(groups, (list, tuple)) or len(groups) != len(live_groups):
        return dict(sd)  # torch's load refuses it
    new = [
        {**saved, flag: live[flag]}
        if isinstance(saved, Mapping) and flag not in saved and flag in live
        else saved
        for saved, live in zip(groups, live_groups)
    ]
    return {**sd, "param_groups": new}


def shadowed(state: Mapping) -> list[Any]:
    """The params whose state holds a shadow."""
    return [
        p for p, entry in state.items() if isinstance(entry, Mapping) and any(map(_shadows.is_key, entry))
    ]


def buffer_shadowed(state: Mapping) -> bool:
    """Whether some entry holds a buffer's shadow."""
    return any(
        isinstance(entry, Mapping) and any(map(_shadows.is_buffer_key, entry)) for entry in state.values()
    )


def hold_back(sd: Mapping, param_groups: list[dict]) -> tuple[Mapping, dict[Any, dict[str, Any]]]:
    """Before the inner optimizer loads a dict by itself: what torch's load must not see, by
    param, and the dict without it. An entry that holds shadows only (a param the inner
    optimizer has not initialised: torch's load would hand it to the inner's ``__setstate__``
    as a plain non-empty dict, and the Adam family reads its ``"step"``), and the buffer
    shadows (torch's load would cast them to their anchor param's dtype)."""
    state, groups = sd.get("state"), sd.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(groups, (list, tuple)):
        return sd, {}
    saved = [g.get("params", ()) if isinstance(g, Mapping) else () for g in groups]
    if len(saved) != len(param_groups) or any(
        len(s) != len(g["params"]) for s, g in zip(saved, param_groups)
    ):
        return sd, {}  # torch refuses it
    id_map = {k: p for s, g in zip(saved, param_groups) for k, p in zip(s, g["params"])}
    kept, held = {}, {}
    for k, entry in state.items():
        if k in id_map and isinstance(entry, Mapping) and any(map(_shadows.is_key, entry)):
            only = all(map(_shadows.is_key, entry))
            out = {kk: v for kk, v in entry.items() if only or _shadows.is_buffer_key(kk)}
            if out:
                held[id_map[k]] = out
                entry = {kk: v for kk, v in entry.items() if kk not in out}
                if not entry:
                    continue
        kept[k] = entry
    return ({**sd, "state": kept}, held) if held else (sd, {})


def adopt_inner_load(inner: Any, spec: _shadows.Spec, held: Optional[Mapping] = None) -> list[str]:
    """After the inner optimizer loaded a dict by itself: the shadows :func:`hold_back` kept
    from it installed (param shadows in the shadow dtype and device; buffer shadows as saved),
    its shadows back in the shadow dtype and device (torch's load casts every state tensor to
    its param's), and entries that hold shadows only back as ``ShadowState``. Returns what was
    lost, for a warning."""
    for p, entry in (held or {}).items():
        made = {}
        for k, v in entry.items():
            if not isinstance(v, Tensor):
                made[k] = v
            elif _shadows.is_param_key(k) and v.shape == p.shape:
                made[k] = spec.make(p, v)
            else:  # a buffer's shadow (checked against its buffer at the next step)
                made[k] = v.detach().to(device=spec.device or p.device, copy=True)
        _shadows.install(inner.state, p, made)
    rounded = []
    for p in shadowed(inner.state):
        entry = inner.state[p]
        for k, v in list(entry.items()):
            if _shadows.is_param_key(k) and isinstance(v, Tensor) and v.shape == p.shape:
                want = spec.dtype_for(p)
                if v.dtype != want or v.device != (spec.device or p.device):
                    if torch.promote_types(v.dtype, want) != v.dtype:  # its dtype cannot hold ours
                        rounded.append(k)
                    entry[k] = spec.make(p, v)
        if all(_shadows.is_key(k) for k in entry):
            inner.state[p] = _shadows.ShadowState(entry)
    if not rounded:
        return []
    return [
        f"it rounded {len(rounded)} shadows to their params' dtype (as torch's load_state_dict does for "
        "any state): they are back in the shadow dtype, with the precision lost"
    ]
