"""Which tensors have shadows, under which keys, in which dtype and device, and the cached
layout the update runs on.

The shadows live in the inner optimizer's per-param state under :func:`key` (``"ema"``,
``"ema_1"``, ...). The :class:`Layout` is built from ``param_groups`` and ``state`` when
they change and is checked for staleness in O(param groups) per step, so the steady-state
step does no per-parameter Python work.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import _kernels

ENABLE = "ema"  # param-group flag: False keeps the group's params out of the EMA


def key(k: int) -> str:
    """The state key of shadow ``k``: ``"ema"``, then ``"ema_1"``, ``"ema_2"``, ..."""
    return "ema" if k == 0 else f"ema_{k}"


def keys(n: int) -> tuple[str, ...]:
    return tuple(key(k) for k in range(n))


def as_index(index: Any) -> int:
    """A shadow index as an int: anything ``operator.index()`` takes (as a sequence does: numpy
    ints, integer 0-dim tensors), except a bool (``True`` is no index into a decay tuple)."""
    if not isinstance(index, bool) and not (isinstance(index, Tensor) and index.dtype == torch.bool):
        try:
            return operator.index(index)
        except TypeError:
            pass
    got = f"a {index.dtype} tensor" if isinstance(index, Tensor) else type(index).__name__
    raise TypeError(f"index must be an int (or an integer that operator.index() takes), got {got}")


def buffer_key(k: int, name: str) -> str:
    """The state key of shadow ``k`` of the buffer ``name`` (kept in the anchor param's state)."""
    return f"{key(k)}:{name}"


def is_param_key(name: Any) -> bool:
    return name == "ema" or (
        isinstance(name, str) and name.startswith("ema_") and name[4:].isdigit() and name[4] != "0"
    )


def is_buffer_key(name: Any) -> bool:
    """A buffer's shadow key: ``"ema:bn.running_mean"``, ``"ema_1:bn.running_mean"``, ..."""
    return isinstance(name, str) and ":" in name and is_param_key(name.split(":", 1)[0])


def is_key(name: Any) -> bool:
    """Any shadow key: a param's (``"ema"``, ``"ema_1"``) or a buffer's (``"ema:bn.running_mean"``)."""
    return is_param_key(name) or is_buffer_key(name)


def split_buffer_key(name: str) -> tuple[str, str]:
    shadow, buffer = name.split(":", 1)
    return shadow, buffer


class ShadowState(dict):
    """The state of a param that the inner optimizer may still initialise: it holds shadows only.

    Stock optimizers (Adam, RMSprop, ...) initialise a param's state when ``len(state) == 0``,
    lazily, at the first step where the param has a gradient. Shadows are not counted here, so
    they still do. It is used only where that can still happen: a param that had no gradient
    when its shadows were made (frozen, unused), or whose state a load left empty. A param whose
    inner optimizer stepped it and kept nothing (SGD without momentum, LBFGS's later params)
    gets a plain dict: its ``len()`` counts its shadows, as any dict's does.
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


def enabled(group: Mapping, i: int) -> bool:
    flag = group.get(ENABLE, True)
    if not isinstance(flag, bool):
        raise ValueError(
            f"param group {i} has 'ema': {flag!r}; it must be True or False "
            "(False keeps the group out of the EMA)"
        )
    return flag


def is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@dataclass(frozen=True)
class Spec:
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


class Buffers:
    """The persistent floating-point buffers of a module, followed by name.

    The names are fixed when the optimizer is built; the tensors are looked up at each
    step, so a buffer replaced later (``module.running_mean = t``, ``model.to(...)``) is
    followed.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.entries: list[tuple[str, torch.nn.Module, str]] = []
        seen: set[int] = set()
        for prefix, owner in module.named_modules(remove_duplicate=False):
            for local, buf in owner._buffers.items():
                if buf is None or local in owner._non_persistent_buffers_set or not buf.is_floating_point():
                    continue
                if id(buf) not in seen:
                    seen.add(id(buf))
                    self.entries.append((f"{prefix}.{local}" if prefix else local, owner, local))
        self.names = [name for name, _, _ in self.entries]

    def tensors(self) -> list[Tensor]:
        out = []
        for name, owner, local in self.entries:
            buf = owner._buffers.get(local)
            if not isinstance(buf, Tensor) or not buf.is_floating_point():
                now = type(buf).__name__ if buf is None else buf.dtype
                raise ValueError(
                    f"the averaged buffer {name!r} is now {now}; "
                    "it must stay a floating-point tensor (buffers are chosen when the optimizer is built)"
                )
            out.append(buf)
        return out

    def unchanged(self, tensors: list[Tensor]) -> bool:
        return all(owner._buffers.get(local) is t for (_, owner, local), t in zip(self.entries, tensors))

    def put_back(self, tensors: list[Tensor]) -> None:
        """Make ``tensors`` (from :meth:`tensors`) the module's buffers again, where the module
        replaced them since (e.g. ``model.double()`` inside ``swap_ema_weights()``)."""
        for (_, owner, local), t in zip(self.entries, tensors):
            if owner._buffers.get(local) is not t:
                owner._buffers[local] = t


def anchor(params: Sequence[Tensor]) -> Optional[Tensor]:
    """The param whose state holds the buffer shadows: the first trained averaged param.

    Loaders that map state to parameter names (torch.distributed.checkpoint) carry only
    the state of params, and skip frozen ones when they rebuild it.
    """
    return next((p for p in params if p.requires_grad), params[0] if params else None)


def install(state: dict, p: Tensor, shadows: dict[str, Tensor], settled: bool = False) -> None:
    """Put shadows into ``state[p]``. An empty state stays empty for the inner optimizer
    (:class:`ShadowState`) unless ``settled``: the inner optimizer has stepped ``p`` already
    and kept no state for it."""
    current = state.get(p)
    if current is None or (not current and not isinstance(current, ShadowState)):
        state[p] = dict(current or {}) if settled else ShadowState(current or {})
    state[p].update(shadows)


class Layout:
    """The averaged params, their shadows and (device, dtype) groups, as of one view of the
    param groups. :meth:`fresh` tells in O(groups) whether that view still holds."""

    def __init__(self, param_groups: list[dict], state: dict, spec: Spec, buffers: Optional[Buffers]) -> None:
        self._seen = (
            param_groups,
            state,
            [(g, g["params"], len(g["params"]), g.get(ENABLE, True)) for g in param_groups],
        )
        names = keys(spec.count)
        self.params = averaged(param_groups)
        self.buffers = buffers
        self.buffer_tensors = buffers.tensors() if buffers is not None else []
        self.anchor = anchor(self.params) if buffers is not None else None
        self._anchor_trained = self.anchor is not None and self.anchor.requires_grad  # frozen later: move
        if buffers is not None and buffers.names and self.anchor is None:
            raise ValueError(
                "buffers= needs at least one averaged parameter: the buffer shadows are kept in its state"
            )
        self.missing: dict[Tensor, dict[str, Tensor]] = {}  # made by make_missing, not installed yet
        self.incomplete = True  # some averaged params may lack shadows
        self._stale = False  # check_shapes() found a tensor that no longer fits its shadows
        self._state, self._names, self._spec = state, names, spec
        self._check_params()
        self._gather_buffer_shadows(param_groups)
        self._check_buffers()
        self.groups: list[_kernels.Group] = []
        self.here: list[_kernels.Group] = []
        self.offloaded: list[_kernels.Group] = []
        self._regroup()

    def _check_params(self) -> None:
        param_groups = self._seen[0]
        for p in self.params:
            have = self._state.get(p, {})
            for name in self._names:
                if name in have:
                    _check_pair(have[name], p, name, partial(_where, param_groups, p))

    def _check_buffers(self) -> None:
        if self.buffers is not None:
            for k in range(len(self._names)):
                held = self.buffer_shadows(k)
                for n, t in zip(self.buffers.names, self.buffer_tensors):
                    if n in held:
                        _check_buffer_pair(held[n], t, n, buffer_key(k, n))

    def check_shapes(self) -> None:
        """Raise the ValueError of :meth:`__init__` if a tensor no longer has its shadows' shape.

        :meth:`fresh` sees a new shape only on the first param of each (device, dtype) group
        (``model.half()`` changes them all); a ``p.data = ...`` on another param shows here.
        Host metadata only, in one C-level pass (no Python work per tensor): for the swap and
        ``ema_state_dict``, not the step (whose update fails on it instead, see ``step()``).
        The layout is then stale: the next step rebuilds it and refuses before changing anything.
        """
        tensors, shapes = self._sized
        if list(map(_SHAPE, tensors)) != shapes:
            self._stale = True
            self._check_params()
            self._check_buffers()

    def _gather_buffer_shadows(self, param_groups: list[dict]) -> None:
        """Move buffer shadows kept by another param (the anchor changed: frozen, or its group
        left the EMA) to the anchor."""
        if self.anchor is None:
            return
        for p in {id(q): q for g in param_groups for q in g["params"]}.values():
            here = self._state.get(p, {})
            if p is not self.anchor and any(map(is_buffer_key, here)):
                moved = {k: here.pop(k) for k in [k for k in here if is_buffer_key(k)]}
                install(self._state, self.anchor, moved)

    def buffer_shadows(self, k: int) -> dict[str, Tensor]:
        """{buffer name: shadow k} of the buffers that have shadows."""
        if self.buffers is None:
            return {}
        held = self._state.get(self.anchor, {})
        return {n: held[buffer_key(k, n)] for n in self.buffers.names if buffer_key(k, n) in held}

    def _buffer_pairs(self) -> tuple[list[list[Tensor]], list[Tensor]]:
        if self.buffers is None:
            return [], []
        columns = [self.buffer_shadows(k) for k in range(len(self._names))]
        ready = [
            (n, t) for n, t in zip(self.buffers.names, self.buffer_tensors) if all(n in c for c in columns)
        ]
        return [[c[n] for c in columns] for n, _ in ready], [t for _, t in ready]

    def _regroup(self) -> None:
        ready = [p for p in self.params if all(n in self._state.get(p, ()) for n in self._names)]
        columns = [[self._state[p][n] for n in self._names] for p in ready]
        buffer_columns, buffers = self._buffer_pairs()
        self.groups = _kernels.group_pairs(columns + buffer_columns, ready + buffers)
        # updated on the device now, and offloaded to the background pipeline (ema_device)
        self.here = [g for g in self.groups if g.staged is None]
        self.offloaded = [g for g in self.groups if g.staged is not None]
        # every averaged tensor and its shadows' shape, for check_shapes()
        self._sized = (ready + buffers, [c[0].shape for c in columns + buffer_columns])
        self._reps = [
            (g.params[0], g.params[0].dtype, g.params[0].shape, g.params[0].device) for g in self.groups
        ]

    def fresh(self, param_groups: list[dict], state: dict) -> bool:
        groups0, state0, seen = self._seen
        if param_groups is not groups0 or state is not state0 or len(param_groups) != len(seen):
            return False
        for g, (g0, params0, n0, flag0) in zip(param_groups, seen):
            if (
                g is not g0
                or g["params"] is not params0
                or len(params0) != n0
                or g.get(ENABLE, True) != flag0
            ):
                return False
        if self.buffers is not None and not self.buffers.unchanged(self.buffer_tensors):
            return False
        if self._anchor_trained and self.anchor is not None and not self.anchor.requires_grad:
            return False  # DCP's loader skips the state of frozen params: move the buffer shadows
        if self._stale:
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
        if self.buffers is not None:
            held = self._state.get(self.anchor, {})
            made = {
                buffer_key(k, n): self._spec.make(t, t)
                for n, t in zip(self.buffers.names, self.buffer_tensors)
                for k in range(len(self._names))
                if buffer_key(k, n) not in held
            }
            if made:
                assert self.anchor is not None  # buffers with names need one (checked in __init__)
                self.missing.setdefault(self.anchor, {}).update(made)
        self.incomplete = bool(self.missing)  # nothing to install after the inner step: complete

    def adopt_missing(self) -> bool:
        """Install the shadows made by :meth:`make_missing`; True if there were any."""
        self.incomplete = False
        if not self.missing:
            return False
        for p, shadows in self.missing.items():  # after the inner step: it had p's gradient
            install(self._state, p, shadows, settled=p.grad is not None)
        self.missing = {}
        self._regroup()
        return True

    def pairs(self, k: int) -> list[tuple[Tensor, Tensor]]:
        """(tensor, shadow k) of every param and buffer that has shadows, each of its shadow's
        shape (else the ValueError of :meth:`check_shapes`)."""
        self.check_shapes()
        name = self._names[k]
        params = [(p, self._state[p][name]) for p in self.params if name in self._state.get(p, ())]
        if self.buffers is None:
            return params
        shadows = self.buffer_shadows(k)
        return params + [
            (t, shadows[n]) for n, t in zip(self.buffers.names, self.buffer_tensors) if n in shadows
        ]


_SHAPE = operator.attrgetter("shape")


def _check_buffer_pair(shadow: Any, buf: Tensor, name: str, shadow_key: str) -> None:
    if not isinstance(shadow, Tensor) or shadow.shape != buf.shape:
        got = tuple(shadow.shape) if isinstance(shadow, Tensor) else type(shadow).__name__
        raise ValueError(
            f"the averaged buffer {name!r} now has shape {tuple(buf.shape)}, its shadow {shadow_key!r} has "
            f"{got}: a buffer replaced by name must keep its shape. Load a state dict that fits, or "
            "drop all the shadows of this buffer at once, which restarts its EMA from the current "
            f"buffer: `for s, k in [(s, k) for s in opt.state.values() for k in s "
            f"if str(k).endswith({':' + name!r})]: del s[k]`"
        )


def _where(param_groups: Sequence[dict], p: Tensor) -> str:
    for i, group in enumerate(param_groups):
        for j, q in enumerate(group["params"]):
            if q is p:
                return f"param {j} of param group {i}"
    return "a param"  # pragma: no cover - p comes from param_groups


def _check_pair(shadow: Any, p: Tensor, name: str, where: Callable[[], str] = lambda: "a param") -> None:
    if not isinstance(shadow, Tensor) or shadow.shape != p.shape:
        got = tuple(shadow.shape) if isinstance(shadow, Tensor) else type(shadow).__name__
        raise ValueError(
            f"{where()} (shape {tuple(p.shape)}) has a shadow state[p][{name!r}] of shape {got}: the param "
            "was replaced (p.data = ...) after its shadows were made. Load a state dict that fits, or "
            "drop all the shadows of this param p at once ('ema', 'ema_1', ...), which restarts its EMA "
            "from the current weights: `for k in [k for k in opt.state[p] if k == 'ema' or "
            "str(k).startswith('ema_') and k[4:].isdigit()]: del opt.state[p][k]`"
        )


def check_device(ema_device: Any) -> Optional[torch.device]:
    if ema_device is None:
        return None
    try:
        device = torch.device(ema_device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"ema_device must be None or 'cpu', got {ema_device!r}") from e
    if device.type != "cpu":
        raise ValueError(
            f"ema_device must be None (shadows with their params) or 'cpu' (offloaded to host memory), "
            f"got {str(device)!r}"
        )
    return device
