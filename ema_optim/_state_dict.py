"""How the EMA appears in a torch optimizer state dict (the check of a whole dict before
anything is loaded is in ``_load_check``).

Layout (the inner optimizer's own, plus):

- ``state[i]["ema"]``, ``state[i]["ema_1"]``, ...: the shadows of param ``i``;
- in each param group that has shadows (every group before the first step): the counters
  ``ema_steps``, ``ema_updates``, ``ema_decay_prod`` (and ``ema_decay_prod_1``, ... for more
  shadows), plain ints and floats. The live groups carry the same keys with ``None``
  placeholders, so that loaders which rebuild groups from the live keys (DCP's flattened
  layout) find them, and a compiled step never sees them change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

from . import _shadows
from ._plan import Counters

STEPS, UPDATES, DECAY_PROD = "ema_steps", "ema_updates", "ema_decay_prod"


# Keys a live group may have that a saved one may lack (torch's LR schedulers add initial_lr).
OPTIONAL_GROUP_KEYS = frozenset({"initial_lr", "param_names", _shadows.ENABLE})


def counter_keys(n: int) -> tuple[str, ...]:
    return (STEPS, UPDATES, DECAY_PROD) + tuple(f"{DECAY_PROD}_{k}" for k in range(1, n))


def is_counter_key(name: Any) -> bool:
    return name in (STEPS, UPDATES, DECAY_PROD) or (
        isinstance(name, str) and name.startswith(DECAY_PROD + "_") and name[len(DECAY_PROD) + 1 :].isdigit()
    )


def publish(param_groups: list[dict], state: Mapping, n: int) -> None:
    """Name the counters (``None`` placeholders) in the live groups whose params have shadows,
    in every group while none has any; a group added since the last step has none yet."""
    has = [any(_shadows.key(0) in state.get(p, ()) for p in g["params"]) for g in param_groups]
    for g, h in zip(param_groups, has):
        for name in [k for k in g if is_counter_key(k)]:
            del g[name]
        if h or not any(has):
            g.update(dict.fromkeys(counter_keys(n)))


def to_saved(sd: dict, live_groups: list[dict], counters: Counters) -> dict:
    """The inner optimizer's state dict with the real counters in place of the placeholders
    and plain dicts for the per-param state (``torch.load(weights_only=True)`` reads it)."""
    values = (counters.steps, counters.updates, *counters.decay_prods)
    for saved, live in zip(sd["param_groups"], live_groups):
        if STEPS in live:
            saved.update(zip(counter_keys(len(counters.decay_prods)), values))
    sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
    return sd


def missing_group_keys(before: Sequence[dict], after: Sequence[dict]) -> Optional[str]:
    """After the inner optimizer loaded (its ``__setstate__`` fills defaults): a group that
    lacks keys the optimizer's groups had, described; None if every group has them."""
    for i, (old, new) in enumerate(zip(before, after)):
        lost = [k for k in old if k not in new and k not in OPTIONAL_GROUP_KEYS and not is_counter_key(k)]
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
    groups = [{k: v for k, v in g.items() if not is_counter_key(k)} for g in sd["param_groups"]]
    return {**sd, "state": state, "param_groups": groups}


def load_inner(inner: Any, inner_sd: dict) -> None:
    """Load the inner optimizer's part; on any failure put it back as it was."""
    old = (inner.state, inner.param_groups)
    try:
        inner.load_state_dict(inner_sd)
        problem = missing_group_keys(old[1], inner.param_groups)
        if problem:
            raise ValueError(f"{problem}; pass a state dict saved by this kind of optimizer")
    except Exception as e:
        inner.state, inner.param_groups = old
        if isinstance(e, ValueError) and str(e).startswith("param group"):
            raise
        raise ValueError(f"the inner optimizer could not load the state dict: {e!r}") from e
    for group, before in zip(inner.param_groups, old[1]):  # a dict saved without "ema": keep ours
        if _shadows.ENABLE not in group and _shadows.ENABLE in before:
            group[_shadows.ENABLE] = before[_shadows.ENABLE]
