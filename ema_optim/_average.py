"""``ema_state_dict``: the average as the model's state dict, without swapping anything.

The answer is ``model.state_dict()`` with each averaged entry replaced by its shadow. Which
entry is which (names, order, tied names, shadow or live tensor) is worked out once per
(optimizer layout, model) and cached, so that a call in steady state does no Python work per
parameter: it copies one cached dict (a C-level copy, a few ns per entry), reads the shape
of each averaged tensor in one C-level pass (about 0.1 us each: a ``p.data = ...`` with a new
shape raises the swap's ValueError instead of giving the old-shape shadow), and re-reads the
live entries (params and buffers without a shadow) from their modules. Entries that a
``state_dict`` hook adds or rewrites come from ``model.state_dict()`` itself at each call (its
hooks run again, O(model)); a model without such entries does not pay for that.

When the cached view is rebuilt (each is O(model), once):

- the optimizer's layout changed: param groups, state or shadows (a step that made the
  first shadows, ``add_param_group``, ``load_state_dict``), an averaged buffer replaced, the
  model converted as a whole (``model.half()``, ``model.to(device)``); ``opt._layout()``
  checks this in O(param groups) and gives a new object;
- a live entry's tensor is no longer the one the view holds (``module.running_mean = t``
  for a buffer without a shadow, ``model.to(...)``, an FSDP2 module caught unsharded) or is
  gone (``del module.bias``): each live entry is checked at each call;
- the model's structure changed by assignment: a submodule, parameter or buffer registered
  or replaced on one of its modules (``model.head = nn.Linear(...)``,
  ``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``). torch calls its
  global registration hooks there; the hook installed here only bumps a counter when the
  module is one of a cached model's.

Not seen (docs/teachers.md): for an averaged entry, a write straight into
``module._parameters`` / ``module._buffers`` (what ``functional_call`` does for the length of
one call, on purpose) or a ``del``; and a ``state_dict`` hook registered after the first call.

Under FSDP2, ``functional_call`` cannot work (FSDP2's pre-forward hook all-gathers its own
shards over the tensors it was given): a forward pre-hook put on the model's FSDP2 modules
refuses such a forward before anything runs.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from . import _shadows
from .optimizer import EMAOptimizer

__all__ = ["ema_state_dict"]

_EXTRA = "_extra_state"  # the key suffix of Module.get_extra_state() in a state dict

# Bumped when a module of a cached model registers a submodule, parameter or buffer.
_generation = 0
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hooks: list[Any] = []
# layout -> {id(model): view}; an entry goes away with its layout (the optimizer drops a
# stale layout), and a view holds its model only weakly.
_views: weakref.WeakKeyDictionary[_shadows.Layout, dict[int, _View]] = weakref.WeakKeyDictionary()

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch without distributed
    FSDPModule = None  # type: ignore[assignment,misc]

# FSDP2 module -> one of the averaged param slots it manages (the owner's ``_parameters``,
# the name): what _refuse_reparametrized looks at before FSDP2's own pre-forward hook runs.
_fsdp_slots: weakref.WeakKeyDictionary[nn.Module, tuple[dict, str]] = weakref.WeakKeyDictionary()


def _structure_changed(module: nn.Module, name: str, value: Any) -> None:
    global _generation
    if module in _watched:
        _generation += 1


def _install_hooks() -> None:
    """torch's global registration hooks (called from ``register_parameter``,
    ``register_buffer``, ``add_module`` and the ``__setattr__`` paths that use them)."""
    if _hooks:
        return
    from torch.nn.modules import module as m

    _hooks.extend(
        [
            m.register_module_module_registration_hook(_structure_changed),
            m.register_module_parameter_registration_hook(_structure_changed),
            m.register_module_buffer_registration_hook(_structure_changed),
        ]
    )


# A live entry: (name, the module's _parameters or _buffers dict, local name, the tensor
# found there when the view was built) or (name, None, owner module, None) for extra state.
_Live = tuple[str, Optional[dict], Any, Optional[Tensor]]


class _View:
    """``model.state_dict()``'s entries as one layout of one optimizer sees them."""

    __slots__ = ("model", "generation", "groups", "templates", "averaged", "live", "hooked")

    def __init__(self, model: nn.Module, layout: _shadows.Layout, count: int) -> None:
        self.model = weakref.ref(model)
        self.generation = _generation
        self.groups = layout.groups  # a new list once the first shadows are installed
        entries = model.state_dict(keep_vars=True)  # runs its hooks: the exact keys and order
        owners = dict(model.named_modules(remove_duplicate=False))
        shadows = [{id(t): s for t, s in layout.pairs(k)} for k in range(count)]
        # per shadow index: the whole dict in order (live entries hold a placeholder) and
        # the (name, shadow) of its averaged entries
        self.templates: list[dict[str, Any]] = [{} for _ in range(count)]
        self.averaged: list[list[tuple[str, Tensor]]] = [[] for _ in range(count)]
        self.live: list[_Live] = []
        for name, value in entries.items():
            found = isinstance(value, Tensor) and id(value) in shadows[0]
            for k in range(count):
                if found:
                    shadow = shadows[k][id(value)]
                    self.templates[k][name] = shadow
                    self.averaged[k].append((name, shadow))
                else:
                    self.templates[k][name] = value
            if not found:
                self.live.append(_live_source(name, value, owners))
        # entries a state_dict hook made (no module slot holds them): read again at each call
        self.hooked = [name for name, tensors, local, _ in self.live if tensors is None and local is None]

    def fresh(self, model: nn.Module, layout: _shadows.Layout) -> bool:
        return self.model() is model and self.generation == _generation and self.groups is layout.groups


def _live_source(name: str, value: Any, owners: dict[str, nn.Module]) -> _Live:
    prefix, _, local = name.rpartition(".")
    owner = owners.get(prefix)
    if owner is not None:
        if local in owner._parameters and owner._parameters[local] is value:
            return name, owner._parameters, local, value
        if local in owner._buffers and owner._buffers[local] is value:
            return name, owner._buffers, local, value
        if local == _EXTRA and not isinstance(value, Tensor):
            return name, None, owner, None
    return name, None, None, value  # made by a state_dict hook: see _View.hooked


def _check(opt: Any, model: Any, index: Any, dtype: Any) -> int:
    if not isinstance(opt, EMAOptimizer):
        raise TypeError(f"opt must be an ema_optim.EMAOptimizer, got {type(opt).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module (the model whose parameters opt trains), "
            f"got {type(model).__name__}"
        )
    index = _shadows.as_index(index)
    n = opt._spec.count
    if not -n <= index < n:
        raise IndexError(
            f"ema_state_dict(index={index}): this optimizer keeps {n} shadow(s) (one per decay), "
            f"so index must be in [-{n}, {n - 1}]"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be None or a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return index % n


def _view(opt: EMAOptimizer, model: nn.Module, layout: _shadows.Layout) -> _View:
    views = _views.get(layout)
    if views is None:
        views = _views[layout] = {}
    view = views.get(id(model))
    if view is not None and view.fresh(model, layout):
        return view
    _install_hooks()
    view = _View(model, layout, opt._spec.count)
    if not view.averaged[0]:
        _check_model(opt, model)
    for key in [k for k, v in views.items() if v.model() is None]:  # views of models gone since
        del views[key]
    views[id(model)] = view
    _watched.update(model.modules())
    if FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules()):
        _guard_fsdp(model, view)
    return view


def _guard_fsdp(model: nn.Module, view: _View) -> None:
    """Make a forward of an FSDP2 module whose params were replaced (functional_call with
    this dict) fail before FSDP2 all-gathers its own shards and silently runs those."""
    owners = dict(model.named_modules(remove_duplicate=False))
    slots: dict[nn.Module, tuple[dict, str]] = {}
    for name, _ in view.averaged[0]:
        prefix, _, local = name.rpartition(".")
        owner = owners[prefix]
        if local not in owner._parameters:
            continue  # an averaged buffer: FSDP2 leaves buffers alone, functional_call works
        up = prefix  # the FSDP2 module that manages it: the nearest one above
        while not isinstance(owners[up], FSDPModule) and up:
            up = up.rpartition(".")[0]
        if isinstance(owners[up], FSDPModule):
            slots.setdefault(owners[up], (owner._parameters, local))
    for fsdp, slot in slots.items():
        if fsdp not in _fsdp_slots:
            # prepend: runs before FSDP2's own pre-forward hook (prepended when it was sharded)
            fsdp.register_forward_pre_hook(_refuse_reparametrized, prepend=True)
        _fsdp_slots[fsdp] = slot


def _refuse_reparametrized(module: nn.Module, args: Any) -> None:
    slot = _fsdp_slots.get(module)
    if slot is None:
        return
    params, local = slot
    current = params.get(local)
    if current is not None and not isinstance(current, nn.Parameter):
        raise RuntimeError(
            f"a forward of the FSDP2 (fully_shard) module {type(module).__name__} found its parameter "
            f"{local!r} replaced by a plain tensor (torch.func.functional_call with ema_state_dict()?). "
            "FSDP2 all-gathers its own sharded parameters before the forward, so it would silently run "
            "the training weights. For a teacher forward on the average under FSDP2 use "
            "`with opt.swap_ema_weights(): out = model(x)` (exact); see docs/teachers.md"
        )


def _check_model(opt: EMAOptimizer, model: nn.Module) -> None:
    """No averaged entry: fine before the first step, but not for a model the optimizer does not train."""
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    if not any(id(p) in trained for p in model.parameters()):
        raise ValueError(
            f"none of the parameters of the {type(model).__name__} passed to ema_state_dict() is in the "
            "optimizer; pass the model whose parameters opt trains (or a submodule of it)"
        )


def _read_live(out: dict[str, Any], live: list[_Live]) -> bool:
    """Put the current live tensors into ``out``; False if one was replaced since the view was built."""
    for name, tensors, local, seen in live:
        if tensors is not None:
            t: Optional[Tensor] = tensors.get(local)
            if t is None or t is not seen:  # replaced, or removed (del module.bias)
                return False
            # A buffer as itself: model.state_dict()'s detach() gives the same storage, and an
            # alias would be a second input to a graph compiled after a break here, which a
            # compiled training step's in-place buffer update (BatchNorm) cannot take.
            out[name] = t.detach() if isinstance(t, nn.Parameter) or t.requires_grad else t
        elif local is not None:  # extra state
            out[name] = local.get_extra_state()
    return True


def _read_hooked(out: dict[str, Any], hooked: list[str], model: nn.Module) -> bool:
    """Put what the model's state_dict hooks make now into ``out`` (they run again: O(model),
    only for a model whose hooks add or rewrite entries); False if they gave other names."""
    current = model.state_dict(keep_vars=True)
    for name in hooked:
        if name in current:
            value = current[name]
            out[name] = value.detach() if isinstance(value, Tensor) else value
    return list(current) == list(out)


def _entries(view: _View, index: int, model: nn.Module) -> tuple[dict[str, Any], bool]:
    """The state dict from the cached view, and whether the view still fits the model."""
    out = view.templates[index].copy()
    if not _read_live(out, view.live):  # a live tensor was replaced: read the names again
        return out, False
    return out, not view.hooked or _read_hooked(out, view.hooked, model)


def ema_state_dict(
    opt: EMAOptimizer, model: nn.Module, index: int = 0, *, dtype: Optional[torch.dtype] = None
) -> dict[str, Union[Tensor, Any]]:
    """The average as ``model``'s state dict: what ``model.state_dict()`` holds inside
    ``opt.swap_ema_weights(index)``, without swapping anything.

    Each averaged entry (a param with a shadow; with ``buffers=``, an averaged buffer) is
    shadow ``index`` itself (``opt.state[p]["ema"]``, ...): no copy, in the shadow dtype and
    on the shadow's device (DTensor shards under FSDP2). Every other entry (params without a
    shadow, integer and non-averaged buffers) is the live tensor ``model.state_dict()``
    gives (a buffer as itself rather than a detached alias of it, so that a compiled training
    step can update it in place). Same keys in the same order as ``model.state_dict()``, tied
    weights under every name. A plain ``dict`` (without ``model.state_dict()``'s ``_metadata``).

    Uses:

    - a teacher / target network forward every step, no copy:
      ``torch.func.functional_call(model, ema_state_dict(opt, model), (x,))``;
    - export: ``torch.save(ema_state_dict(opt, model), path)``, loads into a fresh model
      with ``strict=True``;
    - write the average into the training weights (Switch EMA):
      ``model.load_state_dict(ema_state_dict(opt, model))``; shadows and inner state stay.

    Cost: in steady state a few microseconds of Python, flat in the number of parameters,
    plus a dict copy (a few ns per entry), a shape check of each averaged tensor (about
    0.1 us each, in C) and a check of each live entry. The names are
    worked out once per optimizer layout and model, and again after the model's structure
    changes (a submodule, parameter or buffer assigned on one of its modules); see
    docs/teachers.md.

    Args:
        opt: the :class:`~ema_optim.EMAOptimizer` that trains ``model``.
        model: the model (or a submodule of it; a DDP, FSDP2 or ``torch.compile`` wrapper
            gives its own keys, e.g. ``_orig_mod.``).
        index: which shadow (``k`` for ``decay[k]``); negative counts from the end.
        dtype: if given, each averaged entry is a copy cast to it (e.g. ``torch.bfloat16``
            for a bf16 model with fp32 shadows); live entries are not cast.

    Returns:
        ``{name: tensor}`` in ``model.state_dict()`` order. Before the first ``step()`` every
        entry is live (the average still equals the weights). Inside
        ``swap_ema_weights()`` the swapped shadows hold bookkeeping: their entries are copies
        of the average they stand for. An offloaded update (``ema_device="cpu"``) is waited for.

    Raises:
        TypeError: ``opt`` is not an EMAOptimizer, ``model`` not an ``nn.Module``, ``index``
            not an int, ``dtype`` not a floating dtype.
        IndexError: ``index`` names no shadow.
        ValueError: none of ``model``'s parameters is in the optimizer, or an averaged
            tensor no longer has its shadows' shape (``p.data = ...``; the message says what to do).

    Example:
        >>> import torch
        >>> from ema_optim import EMAOptimizer, ema_state_dict
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> avg = ema_state_dict(opt, model)
        >>> avg["weight"] is opt.state[model.weight]["ema"]
        True
        >>> x = torch.ones(1, 2)
        >>> teacher = torch.func.functional_call(model, avg, (x,))
        >>> with opt.swap_ema_weights():
        ...     torch.equal(teacher, model(x))
        True
    """
    index = _check(opt, model, index, dtype)
    rt = opt._rt
    rt.offload.wait()
    layout = opt._layout()
    layout.check_shapes()  # p.data = ... with a new shape: the clear ValueError, not the old shadow
    view = _view(opt, model, layout)
    out, fits = _entries(view, index, model)
    if not fits:  # read the names again, once
        _views[layout].pop(id(model), None)
        view = _view(opt, model, layout)
        out, _ = _entries(view, index, model)
    if rt.swapped is not None and rt.swapped_index == index:
        _inside_swap(out, view.averaged[index], rt.swapped)
    if dtype is not None:
        cast: dict[int, Tensor] = {}
        for name, _ in view.averaged[index]:
            t = out[name]
            if id(t) not in cast:  # tied names keep sharing one tensor
                cast[id(t)] = t.detach().to(dtype=dtype, copy=True)
            out[name] = cast[id(t)]
    return out


def model_names(opt: EMAOptimizer, model: nn.Module) -> tuple[dict[int, str], dict[str, str]]:
    """The names in ``model`` of ``opt``'s averaged params and buffers: their keys in
    ``ema_state_dict(opt, model)`` (for a tied tensor, its first), worked out the same way.

    Returns ``{id(param): name}`` and ``{buffer name in the buffers= module: name}``, for
    those of them that have shadows and that ``model`` holds. :func:`ema_optim.posthoc.snapshot`
    keys its shadows with them, so that a reconstruction loads into ``model``.
    """
    layout = opt._layout()
    tensor_of = {id(shadow): t for t, shadow in layout.pairs(0)}
    by_tensor: dict[int, str] = {}
    for name, shadow in _View(model, layout, 1).averaged[0]:  # a fresh view: no cache, no check
        by_tensor.setdefault(id(tensor_of[id(shadow)]), name)
    params = {id(p): by_tensor[id(p)] for p in layout.params if id(p) in by_tensor}
    buffers = {}
    if layout.buffers is not None:
        for local, t in zip(layout.buffers.names, layout.buffer_tensors):
            if id(t) in by_tensor:
                buffers[local] = by_tensor[id(t)]
    return params, buffers


def _inside_swap(out: dict[str, Any], averaged: list[tuple[str, Tensor]], records: list) -> None:
    """The swapped shadows hold swap bookkeeping: give the average each stands for (a copy)."""
    by_shadow = {id(r.shadow): r for r in records if r.method != "copy"}  # "copy" keeps the shadow as is
    ema: dict[int, Tensor] = {}
    for name, shadow in averaged:
        record = by_shadow.get(id(shadow))
        if record is not None:
            if id(shadow) not in ema:
                ema[id(shadow)] = record.ema()
            out[name] = ema[id(shadow)]
