"""Which tensors have shadows, under which keys, in which dtype and device, and the cached
layout the update runs on.

The shadows live in the inner optimizer's per-param state under :func:`key` (``"ema"``,
``"ema_1"``, ...). The :class:`Layout` is built from ``param_groups`` and ``state`` when
they change and is checked for staleness in O(param groups) per step, so the steady-state
step does no per-parameter Python work.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _kernels

ENABLE = "ema"  # param-group flag: False keeps the group's params out of the EMA


def key(k: int) -> str:
    """The state key of shadow ``k``: ``"ema"``, then ``"ema_1"``, ``"ema_2"``, ..."""
    return "ema" if k == 0 else f"ema_{k}"


def keys(n: int) -> tuple[str, ...]:
    return tuple(key(k) for k in range(n))


def is_key(name: Any) -> bool:
    return name == "ema" or (
        isinstance(name, str) and name.startswith("ema_") and name[4:].isdigit() and name[4] != "0"
    )


class ShadowState(dict):
    """The state of a param that the inner optimizer has not filled: it holds shadows only.

    Stock optimizers (Adam, RMSprop, ...) initialise a param's state when ``len(state) == 0``;
    shadows are not counted, so they still do, and a param whose inner optimizer keeps no
    state (SGD without momentum) needs no per-step handling.
    """

    __slots__ = ()

    def __len__(self) -> int:
        return dict.__len__(self) - sum(1 for k in self.keys() if is_key(k))


def averaged(param_groups: Sequence[dict]) -> list[Tensor]:
    """The params that have shadows, in ``param_groups`` order, each once."""
    seen: set[int] = set()  # torch allows (with a warning) a param listed twice
    out = []
    for i, group in enumerate(param_groups):
        if not enabled(group, i):
            continue
        for p in group["params"]:
            if is_float(p) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def enabled(group: dict, i: int) -> bool:
    flag = group.get(ENABLE, True)
    if not isinstance(flag, bool):
        raise ValueError(
            f"param group {i} has 'ema': {flag!r}; it must be True or False (False keeps the group out of the EMA)"
        )
    return flag


def is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Spec(NamedTuple):
    """How shadows are made: their count, dtype rule and device."""

    count: int
    dtype: Optional[torch.dtype]
    device: Optional[torch.device]

    def dtype_for(self, p: Tensor) -> torch.dtype:
        if self.dtype is not None and p.is_floating_point():
            return self.dtype
        if p.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return p.dtype

    def make(self, p: Tensor, value: Tensor) -> Tensor:
        """A shadow for ``p`` with ``value``'s contents, in the shadow dtype and device.

        It has the param's memory layout (strides) when the param is dense, e.g.
        channels_last, so that the update and the swap can walk both in memory order.
        """
        device = self.device or p.device
        dtype = self.dtype_for(p)
        if _kernels.local(p) is not p and device.type != p.device.type:
            raise ValueError(
                f"ema_device={str(device)!r} is not supported for DTensor (FSDP2, tensor parallel) params "
                f"on {p.device.type}: their shadows are already sharded; leave ema_device=None"
            )
        with torch.no_grad():
            if device.type == "cpu" and p.device.type != "cpu" and torch.cuda.is_available():
                shadow = _kernels.empty_like_dense(p, dtype, device, pin_memory=True)
            elif value is p:  # a new shadow: a copy that keeps the param's strides
                return p.detach().to(device=device, dtype=dtype, copy=True)
            else:  # a loaded one: in the param's layout
                shadow = torch.empty_like(p, dtype=dtype, device=device)
            shadow.copy_(value.detach())
        return shadow


def install(state: dict, p: Tensor, shadows: dict[str, Tensor]) -> None:
    """Put shadows into ``state[p]``, keeping an empty state empty for the inner optimizer."""
    current = state.get(p)
    if current is None or (not current and not isinstance(current, ShadowState)):
        state[p] = ShadowState(current or {})
    state[p].update(shadows)


class Layout:
    """The averaged params, their shadows and (device, dtype) groups, as of one view of the
    param groups. :meth:`fresh` tells in O(groups) whether that view still holds."""

    def __init__(self, param_groups: list[dict], state: dict, spec: Spec) -> None:
        self._seen = (param_groups, state, [(g, g["params"], len(g["params"]), g.get(ENABLE, True)) for g in param_groups])
        names = keys(spec.count)
        self.params = averaged(param_groups)
        self.missing: dict[Tensor, dict[str, Tensor]] = {}  # made by make_missing, not installed yet
        self.incomplete = True  # some averaged params may lack shadows
        for p in self.params:
            have = state.get(p, {})
            for name in names:
                if name in have:
                    _check_pair(have[name], p, name)
        self._state, self._names, self._spec = state, names, spec
        self.groups: list[_kernels.Group] = []
        self._regroup()

    def _regroup(self) -> None:
        ready = [p for p in self.params if all(n in self._state.get(p, ()) for n in self._names)]
        columns = [[self._state[p][n] for n in self._names] for p in ready]
        self.groups = _kernels.group_pairs(columns, ready)
        self._reps = [(g.params[0], g.params[0].dtype, g.params[0].shape, g.params[0].device) for g in self.groups]

    def fresh(self, param_groups: list[dict], state: dict) -> bool:
        groups0, state0, seen = self._seen
        if param_groups is not groups0 or state is not state0 or len(param_groups) != len(seen):
            return False
        for g, (g0, params0, n0, flag0) in zip(param_groups, seen):
            if g is not g0 or g["params"] is not params0 or len(params0) != n0 or g.get(ENABLE, True) != flag0:
                return False
        # a model converted as a whole (model.half(), model.to(device)) shows in every group
        return all(p.dtype == dt and p.shape == shape and p.device == dev for p, dt, shape, dev in self._reps)

    def make_missing(self) -> None:
        """Shadows for averaged params that lack some, from their current (pre-step) weights."""
        self.missing = {}
        for p in self.params:
            have = self._state.get(p, {})
            absent = [n for n in self._names if n not in have]
            if absent:
                self.missing[p] = {n: self._spec.make(p, p) for n in absent}

    def adopt_missing(self) -> bool:
        """Install the shadows made by :meth:`make_missing`; True if there were any."""
        self.incomplete = False
        if not self.missing:
            return False
        for p, shadows in self.missing.items():
            install(self._state, p, shadows)
        self.missing = {}
        self._regroup()
        return True

    def pairs(self, k: int) -> list[tuple[Tensor, Tensor]]:
        """(param, shadow k) of every param that has shadows."""
        name = self._names[k]
        return [(p, self._state[p][name]) for p in self.params if name in self._state.get(p, ())]


def _check_pair(shadow: Any, p: Tensor, name: str) -> None:
    if not isinstance(shadow, Tensor) or shadow.shape != p.shape:
        got = tuple(shadow.shape) if isinstance(shadow, Tensor) else type(shadow).__name__
        raise ValueError(
            f"a param of shape {tuple(p.shape)} has a shadow state[p][{name!r}] of shape {got}: the param "
            "was replaced (p.data = ...) after its shadow was made. Load a state dict that fits, or "
            f"drop the stale shadow (opt.state[p].pop({name!r})) to restart its EMA from the current weights."
        )
