"""EMAOptimizer: an exponential moving average of the weights, kept inside the optimizer."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Mapping
from itertools import chain
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _kernels, _offload

__all__ = ["EMAOptimizer"]

# Per-param state key of the shadow, and the counters kept in the param groups that have
# shadows: optimizer steps seen (n), EMA updates folded in (t), product of the decays.
EMA = "ema"
STEPS = "ema_steps"
UPDATES = "ema_updates"
DECAY_PROD = "ema_decay_prod"
COUNTERS = (STEPS, UPDATES, DECAY_PROD)

Decay = Union[float, Callable[[int], float]]


class EMAOptimizer(Optimizer):
    r"""Wraps any optimizer and keeps an exponential moving average (EMA) of the weights.

    After every inner ``step()`` each parameter's *shadow* is updated with one
    multi-tensor kernel per (device, dtype)::

        ema <- d * ema + (1 - d) * w                       (bias_correction=False)
        ema <- ema + (1 - d) / (1 - prod(d)) * (w - ema)   (bias_correction=True)

    where ``d`` is ``decay`` (a constant, or ``decay(t)`` for a schedule, ``t`` = EMA
    updates already done) and ``prod(d)`` the product of every decay used so far. The
    bias-corrected shadow is the Adam-style debiased average ``m / (1 - prod(d))`` of an
    EMA ``m`` started from zero, so the first update gives ``ema = w``.

    Timing, with ``a = update_after_step`` and ``e = update_every``, after step ``n``:
    ``n <= a``: the shadows copy the weights; ``(n - a) % e == 0``: one EMA update;
    otherwise nothing. The shadows start from the weights as they are when ``step()`` is
    first called, before its update. In steps: a constant decay ``d`` averages over about
    ``1 / (1 - d)`` updates and halves a weight's influence every ``0.69 / (1 - d)``
    (``d=0.999``: ~693 updates; ``d=0.9999``: ~6.9K). With ``update_every=e`` multiply by ``e``.

    The shadows live in the optimizer state (``opt.state[p]["ema"]``), so
    ``opt.state_dict()`` / ``opt.load_state_dict()`` save and resume them exactly, and
    ``torch.load(..., weights_only=True)`` reads them. Everything else (``param_groups``,
    ``state``, ``zero_grad``, ``add_param_group``, hooks, LR schedulers, GradScaler) is the
    inner optimizer's, shared. The one extra method is :meth:`swap_ema_weights`.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer``).
        decay: float in [0, 1], or a schedule ``t -> float`` (see :mod:`ema_optim.schedules`).
        update_after_step: for the first ``update_after_step`` steps the shadows just copy
            the weights (skip the noisy start of training).
        update_every: afterwards, update on every ``update_every``-th step only (>= 1).
        bias_correction: debias the average as if it had started from zero.
        ema_dtype: shadow dtype. ``None``: float32 for bfloat16/float16 params, else the
            param dtype (so bf16 models average in fp32 without losing small updates).
        ema_device: where shadows live. ``None``: with each param. ``"cpu"``: offloaded to
            host memory (pinned when CUDA is available). The update of step k then runs
            behind step k+1: the params are copied into pinned host staging buffers on a
            side CUDA stream and a background thread folds them into the shadows while the
            next forward and backward run; the next ``step()``, :meth:`swap_ema_weights`,
            :meth:`state_dict` and :meth:`load_state_dict` first wait for the fold. Costs
            host memory for the shadows plus one staging copy of the params in their dtype
            (pinned). See docs/distributed.md, "Offloading the shadows".

    Notes: edit a shadow in place (``opt.state[p]["ema"].copy_(...)``) or through
    ``load_state_dict``; assigning a new tensor to ``opt.state[p]["ema"]`` is not picked up.
    Global step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``) run for
    the wrapper and for the inner optimizer, so twice per ``step()``.

    Cost: one shadow per parameter in the shadow dtype (4 bytes/param for fp32 or bf16
    params with default settings) and, per update, one read of every weight and one
    read-modify-write of every shadow. No host-device synchronisation. Params of groups
    created with ``"ema": False`` and non-floating params have no shadow.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, or an argument has the wrong type.
        ValueError: an argument is out of range.

    .. note::
        Buffers (BatchNorm running statistics) are not parameters, so they are not
        averaged. Inside ``swap_ema_weights()`` either keep the training statistics or
        recompute them for the EMA weights with ``torch.optim.swa_utils.update_bn``.

    Example:
        >>> import torch
        >>> from ema_optim import EMAOptimizer
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = EMAOptimizer(torch.optim.SGD([w], lr=1.0), decay=0.5)
        >>> w.grad = -torch.ones(2)
        >>> opt.step()                      # w: 0 -> 1; ema: 0.5 * 0 + 0.5 * 1
        >>> opt.state[w]["ema"]
        tensor([0.5000, 0.5000])
        >>> with opt.swap_ema_weights():
        ...     print(w.data)
        tensor([0.5000, 0.5000])
        >>> w.data
        tensor([1., 1.])

    References:
        Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", 1992.
        Kingma and Ba, "Adam: A method for stochastic optimization", arXiv:1412.6980
        (bias correction). Izmailov et al., "Averaging weights leads to wider optima and
        better generalization", arXiv:1803.05407.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay: Decay = 0.9999,
        *,
        update_after_step: int = 0,
        update_every: int = 1,
        bias_correction: bool = False,
        ema_dtype: Optional[torch.dtype] = None,
        ema_device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                "build the inner optimizer first, e.g. EMAOptimizer(torch.optim.AdamW(model.parameters()))"
            )
        if isinstance(optimizer, EMAOptimizer):
            raise TypeError("optimizer is already an EMAOptimizer; wrap the inner optimizer only once")
        _check_decay_arg(decay)
        _check_int("update_after_step", update_after_step, minimum=0)
        _check_int("update_every", update_every, minimum=1)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__}")
        if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
            raise TypeError(
                f"ema_dtype must be a floating torch.dtype such as torch.float32, got {ema_dtype!r}"
            )
        if ema_device is not None:
            try:
                ema_device = torch.device(ema_device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"ema_device must be None or 'cpu', got {ema_device!r}") from e
            if ema_device.type != "cpu":
                raise ValueError(
                    f"ema_device must be None (shadows with their params) or 'cpu' (offloaded to host "
                    f"memory), got {str(ema_device)!r}"
                )

        # The base class sets up the hook registries and the step patch; the param groups
        # and state are then the inner optimizer's own objects, so both see every change.
        super().__init__([{"params": []}], {})
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state

        self.decay = decay
        self.update_after_step = update_after_step
        self.update_every = update_every
        self.bias_correction = bias_correction
        self.ema_dtype = ema_dtype
        self.ema_device = ema_device

        self._steps = 0  # optimizer steps seen (n)
        self._updates = 0  # EMA updates folded in (t)
        self._decay_prod = 1.0  # product of the decays used, for bias correction
        self._next_counters = (0, 0, 1.0)  # what _commit() stores once the step has succeeded
        self._weight = 0.0  # this step's lerp weight, computed on the host
        self._weight_tensor: Optional[Tensor] = None  # the same as a 0-dim tensor, for torch.compile
        self._groups: Optional[list[_kernels.Group]] = None  # cached (device, dtype) groups
        self._needs_init = True  # some EMA params may lack a shadow
        self._bare: list[Tensor] = []  # params whose state holds the shadow only (see _hide_bare)
        self._swapped: Optional[list[_Swapped]] = None  # inside swap_ema_weights(): what was swapped
        self._counters_named = False  # the live groups name the counters where they belong
        self._offload = _offload.Offload()  # the update in flight for offloaded shadows
        self._publish_counters()

    # ------------------------------------------------------------------ inner optimizer surface

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler then hands us grad_scale/found_inf instead of unscaling; only true when
        # the inner optimizer can take them, or it would step with scaled gradients.
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer; its params get shadows at the next step.

        A group with ``"ema": False`` gets no shadows (e.g. for params that should stay as trained).
        """
        real = _unproxied(self)
        if real is not self:
            return real.add_param_group(param_group)
        if "optimizer" not in self.__dict__:  # the base __init__'s placeholder group
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._groups = None
        self._needs_init = True
        self._publish_counters()

    def __repr__(self) -> str:
        decay = getattr(self.decay, "__qualname__", None) or repr(self.decay)
        return (
            f"EMAOptimizer(decay={decay}, update_after_step={self.update_after_step}, "
            f"update_every={self.update_every}, bias_correction={self.bias_correction}, "
            f"ema_dtype={self.ema_dtype}, ema_device={self.ema_device},\n  {self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Like Optimizer.__getstate__, leave out what is tied to this instance: an LR
        # scheduler's patched `step` (it refers to this object), hooks and caches.
        self._offload.wait()
        skip = {"step", "_opt_called", "_groups", "_weight_tensor", "_offload"}
        return {k: v for k, v in self.__dict__.items() if k not in skip and "_hooks" not in k}

    def __setstate__(self, state: dict[str, Any]) -> None:
        swapped = state.pop("_swapped", None)
        super().__setstate__(
            {
                **state,
                "_swapped": swapped,
                "_groups": None,
                "_weight_tensor": None,
                "_offload": _offload.Offload(),
            }
        )
        if swapped:  # a copy taken inside swap_ema_weights(): give it its training weights back
            self._swap_out()

    # ------------------------------------------------------------------ step

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """Run the inner optimizer's step, then update the shadows.

        Returns:
            What the inner step returns (the closure's loss, if a closure was given).

        Raises:
            RuntimeError: inside ``swap_ema_weights()`` (nothing is changed).
            ValueError: the decay schedule returned a value outside [0, 1] (nothing is changed).
        """
        if self._swapped is not None:
            raise RuntimeError(
                "step() was called inside swap_ema_weights(): the params hold the EMA weights; "
                "leave the with-block before training"
            )
        if self._offload.active:  # the last offloaded update must be done before params change
            self._offload.wait()
        action = self._plan()
        new_shadows = self._new_shadows() if self._needs_init else {}
        hidden = self._hide_bare(everything=closure is not None)
        found_inf = getattr(self, "found_inf", None)
        forwarded = self._step_supports_amp_scaling and hasattr(self, "grad_scale")
        if forwarded:  # GradScaler with a scale-aware inner optimizer
            self.optimizer.grad_scale = self.grad_scale
            self.optimizer.found_inf = found_inf
        try:
            loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        finally:
            if forwarded:
                del self.optimizer.grad_scale, self.optimizer.found_inf
            self._unhide_bare(hidden)
        if self._needs_init:
            self._adopt(new_shadows)
        with torch.no_grad():
            self._update(action, found_inf if forwarded else None)
        self._commit()
        return loss

    @torch.compiler.disable
    def _plan(self) -> str:
        """Decide this step's action on the host and compute its weight; changes nothing.

        Kept out of torch.compile so that neither the counters nor the weight become
        guards: a compiled step then reuses one graph whatever the decay.
        """
        n = self._steps + 1
        updates, prod = self._updates, self._decay_prod
        if n <= self.update_after_step:
            action = "copy"
        elif (n - self.update_after_step) % self.update_every == 0:
            d = self._decay_at(updates)
            updates += 1
            if self.bias_correction:
                prod *= d
                # (1 - d) / (1 - prod(d)) reweights the EMA-from-zero into its debiased form;
                # while every decay so far was exactly 1 that is 0/0, whose limit is the mean.
                self._weight = (1.0 - d) / (1.0 - prod) if prod < 1.0 else 1.0 / updates
            else:
                self._weight = 1.0 - d
            action = "lerp"
        else:
            action = "skip"
        self._next_counters = (n, updates, prod)
        return action

    @torch.compiler.disable
    def _commit(self) -> None:
        self._steps, self._updates, self._decay_prod = self._next_counters
        if not self._counters_named:  # shadows were just made
            self._publish_counters()

    def _publish_counters(self) -> None:
        """Name the counters in the live param groups where :meth:`state_dict` saves them.

        Loaders that rebuild each group from the keys of the live groups, such as DCP with
        ``flatten_optimizer_state_dict=True``, then load them. The live values are ``None``
        placeholders that never change: Dynamo guards param-group values one by one, so a
        value that changed every step would recompile a compiled step every step.
        :meth:`state_dict` writes the real counters. The marked groups are those whose
        params have shadows (every group while none has any); a group added since the last
        step has no shadows yet.
        """
        has = [any(EMA in self.state.get(p, ()) for p in g["params"]) for g in self.param_groups]
        shown = [h or not any(has) for h in has]
        for g, show in zip(self.param_groups, shown):
            for key in COUNTERS:
                if show:
                    g[key] = None
                else:
                    g.pop(key, None)
        self._counters_named = True

    def _decay_at(self, t: int) -> float:
        if not callable(self.decay):
            return float(self.decay)
        d = self.decay(t)
        if isinstance(d, Tensor) or isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise TypeError(f"the decay schedule must return a float, got {type(d).__name__} at t={t}")
        d = float(d)
        if not 0.0 <= d <= 1.0:  # also catches NaN
            raise ValueError(
                f"the decay schedule returned {d} at t={t} (EMA updates done); it must be in [0, 1]. "
                "Nothing was changed by this step."
            )
        return d

    def _update(self, action: str, found_inf: Optional[Tensor]) -> None:
        if action == "skip":
            return
        groups = self._ema_groups()
        if not groups:
            return
        weight: Optional[_kernels.Weight]
        if found_inf is not None:
            # A skipped (inf/NaN) step is only known on the device: weight it to zero there.
            # (computed where found_inf lives; each group takes it to its own device)
            keep = 1.0 - found_inf.to(torch.float64).reshape(())
            weight = keep if action == "copy" else keep * self._weight_as_tensor(keep.device)
        elif action == "copy":
            weight = None
        elif torch.compiler.is_compiling():
            weight = self._weight_as_tensor(groups[0].shadows[0].device)
        else:  # eager: a Python float is a kernel argument, the fastest form and sync-free
            weight = self._weight
        here = [g for g in groups if g.staged is None]
        if weight is None:
            _kernels.copy_(here)
        else:
            _kernels.lerp_(here, weight)
        offloaded = [g for g in groups if g.staged is not None]
        if offloaded:  # ema_device: in the background, behind the next step (see _offload.py)
            self._offload.launch(offloaded, weight)

    @torch.compiler.disable
    def _weight_as_tensor(self, device: torch.device) -> Tensor:
        """This step's weight in a cached 0-dim tensor, filled in place outside any compiled graph.

        A compiled step takes it as an input, so a changing decay is data, not a guard: one
        graph for every decay, no recompiles.
        """
        if self._weight_tensor is None or self._weight_tensor.device != device:
            self._weight_tensor = torch.zeros((), dtype=torch.float64, device=device)
        return self._weight_tensor.fill_(self._weight)

    # ------------------------------------------------------------------ shadows

    def _ema_params(self) -> Iterator[Tensor]:
        seen: set[int] = set()  # torch allows (with a warning) a param listed twice
        for group in self.param_groups:
            if group.get(EMA, True):
                for p in group["params"]:
                    if _is_float(p) and id(p) not in seen:
                        seen.add(id(p))
                        yield p

    def _shadow_dtype(self, p: Tensor) -> torch.dtype:
        if self.ema_dtype is not None and p.is_floating_point():
            return self.ema_dtype
        if p.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return p.dtype

    def _as_shadow(self, p: Tensor, value: Tensor) -> Tensor:
        """A shadow for ``p`` with ``value``'s contents, in the shadow dtype and device.

        It has the param's memory layout (strides) when the param is dense, e.g. channels_last,
        so that the update and the swap can walk both in memory order.
        """
        device = self.ema_device or p.device
        dtype = self._shadow_dtype(p)
        if _kernels.local(p) is not p and device.type != p.device.type:
            raise ValueError(
                f"ema_device={str(device)!r} is not supported for DTensor (FSDP2, tensor parallel) params "
                f"on {p.device.type}: their shadows are already sharded; leave ema_device=None"
            )
        if device.type == "cpu" and p.device.type != "cpu" and torch.cuda.is_available():
            shadow = _kernels.empty_like_dense(p, dtype, device, pin_memory=True)
        elif value is p:  # a new shadow: a copy that keeps the param's strides
            return p.detach().to(device=device, dtype=dtype, copy=True)
        else:  # a loaded one: in the param's layout
            shadow = torch.empty_like(p, dtype=dtype, device=device)
        shadow.copy_(value.detach())
        return shadow

    def _new_shadows(self) -> dict[Tensor, Tensor]:
        """Shadows for EMA params that have none yet, from their current (pre-step) weights."""
        with torch.no_grad():
            return {p: self._as_shadow(p, p) for p in self._ema_params() if EMA not in self.state.get(p, ())}

    def _adopt(self, new_shadows: dict[Tensor, Tensor]) -> None:
        for p, shadow in new_shadows.items():
            self.state[p][EMA] = shadow
        self._needs_init = False
        self._groups = None
        self._counters_named = False
        self._find_bare()

    def _ema_groups(self) -> list[_kernels.Group]:
        if self._groups is None:
            pairs = [(self.state[p][EMA], p) for p in self._ema_params() if EMA in self.state.get(p, ())]
            self._groups = _kernels.group_pairs([s for s, _ in pairs], [p for _, p in pairs])
        return self._groups

    # Stock optimizers such as Adam create their state when ``len(state) == 0``. A param that
    # has a shadow but no inner state yet (no grad so far, e.g. frozen then unfrozen) would
    # look initialised to them, so its state is hidden from the inner step until it has one.
    def _find_bare(self) -> None:
        self._bare = [p for p, s in self.state.items() if isinstance(p, Tensor) and s.keys() <= {EMA}]

    def _hide_bare(self, everything: bool) -> dict[Tensor, dict]:
        # With a closure the grads only appear inside the inner step, so hide them all.
        if not self._bare:
            return {}
        return {
            p: self.state.pop(p) for p in self._bare if (everything or p.grad is not None) and p in self.state
        }

    def _unhide_bare(self, hidden: dict[Tensor, dict]) -> None:
        if not hidden:
            return
        for p, ours in hidden.items():
            self.state[p].update(ours)
        self._find_bare()

    # ------------------------------------------------------------------ swap

    @contextlib.contextmanager
    def swap_ema_weights(self) -> Iterator[None]:
        """Context manager: the model's params hold the EMA weights inside the block.

        On exit, also by exception, the training weights come back bit for bit. Params
        without a shadow (before the first step, ``"ema": False`` groups) are left alone.

        Cost: no model-sized copy. Same-dtype pairs trade values in place through a
        scratch of at most 1M elements; bf16 params with fp32 shadows are packed in place
        (the param gets the EMA rounded to bf16, half away from zero; the shadow's 32 bits
        keep the 16 training bits and the 16 bits the rounding dropped); fp16 params with
        fp32 shadows likewise (the param gets ``ema.half()``, the shadow keeps the residual)
        while the EMA is in fp16's normal range. Tensors that cannot be packed (a NaN EMA,
        an fp16 EMA out of range, other dtype pairs, params with gaps in memory) keep a copy
        of their training values ("copy" pairs).

        Inside the block, ``opt.step()`` and a nested swap raise ``RuntimeError``;
        ``opt.state_dict()`` returns what it returns outside; ``opt.state[p]["ema"]`` holds
        swap bookkeeping, not the EMA, and so do the ``"ema"`` tensors of a ``state_dict()``
        taken before the block (they are the live shadows, as in any torch state dict): save
        checkpoints outside the block, or call ``state_dict()`` inside it. In-place edits of
        the params inside the block edit the EMA (except for "copy" pairs, where they are
        dropped); the training weights come back unchanged either way.

        Example:
            >>> import torch
            >>> from ema_optim import EMAOptimizer
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9)
            >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
            >>> before = [p.clone() for p in model.parameters()]
            >>> with opt.swap_ema_weights():
            ...     ema_out = model(torch.ones(1, 2))   # evaluate the EMA model here
            >>> all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            True
        """
        real = _unproxied(self)
        if real is not self:
            with real.swap_ema_weights():
                yield
            return
        if self._swapped is not None:
            raise RuntimeError("swap_ema_weights() is already active; it cannot be nested")
        try:
            self._swap_in()  # on failure half-way, what was swapped is recorded and undone below
            yield
        finally:
            self._swap_out()

    @torch.no_grad()
    def _swap_in(self) -> None:
        # Each pair is recorded before it is touched, with how many of its pieces are done,
        # so that _swap_out can undo exactly what was done if anything fails half-way.
        self._swapped = swapped = []
        self._offload.wait()
        pairs = [(p, self.state[p][EMA]) for p in self._ema_params() if EMA in self.state.get(p, ())]
        methods = [_kernels.swap_method(s, p) for p, s in pairs]
        packs = [(s, m) for (_, s), m in zip(pairs, methods) if m.startswith("pack")]
        fits = iter(_kernels.packable(packs))  # e.g. a NaN EMA must show as NaN: copy those
        methods = [m if not m.startswith("pack") or next(fits) else "copy" for m in methods]
        for (p, shadow), method in zip(pairs, methods):
            if method == "copy":
                record = _Swapped(p, shadow, method, stash=p.detach().clone())
                swapped.append(record)
                p.copy_(shadow)
                record.done = 1
                continue
            record = _Swapped(p, shadow, method)
            swapped.append(record)
            kernel = _kernels.SWAP_KERNELS[method][0]
            for s_piece, p_piece in _kernels.swap_pieces(shadow, p):
                kernel(s_piece, p_piece)
                record.done += 1

    @torch.no_grad()
    def _swap_out(self) -> None:
        swapped, self._swapped = self._swapped or [], None
        error = None
        for record in reversed(swapped):  # restore everything, then report the first failure
            try:
                record.undo()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                error = error or e
        if error is not None:
            raise error

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with each param's shadow under ``"ema"``.

        ``state_dict()["state"][i]["ema"]`` is the shadow of the i-th param (in the shadow
        dtype); the EMA counters are plain ints/floats in each param group that has
        shadows. Inside ``swap_ema_weights()`` the same values are returned (as copies).
        """
        real = _unproxied(self)
        if real is not self:
            return real.state_dict()
        self._offload.wait()
        if self._swapped is None:
            return self._state_dict()
        swapped = self._swapped
        self._swap_out()
        try:
            sd = self._state_dict()
            for i, s in sd["state"].items():
                if EMA in s:
                    sd["state"][i] = {**s, EMA: s[EMA].clone()}
        finally:
            self._swap_in()
            if len(self._swapped or ()) != len(swapped):  # pragma: no cover - defensive
                raise RuntimeError("could not re-enter swap_ema_weights() after state_dict()")
        return sd

    def _state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # The inner's own layout and hooks: "ema" is in the shared state, and the groups with
        # shadows carry placeholders for the counters, filled in here.
        self._publish_counters()
        sd = self.optimizer.state_dict()
        counters = {STEPS: self._steps, UPDATES: self._updates, DECAY_PROD: self._decay_prod}
        for saved, live in zip(sd["param_groups"], self.param_groups):
            if STEPS in live:
                saved.update(counters)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the plain inner optimizer).

        The whole dict is checked before anything changes. Shadows keep the shadow dtype
        (fp32 shadows of bf16 params stay fp32). A plain inner-optimizer state dict (no
        ``"ema"`` anywhere) loads the inner state and restarts the EMA from the current
        weights at the next step, with a ``UserWarning``.

        Raises:
            RuntimeError: inside ``swap_ema_weights()``.
            ValueError: the state dict does not fit this optimizer; nothing was changed.
        """
        real = _unproxied(self)
        if real is not self:
            return real.load_state_dict(state_dict)
        if self._swapped is not None:
            raise RuntimeError(
                "load_state_dict() cannot run inside swap_ema_weights(); leave the block first"
            )
        self._offload.wait()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        plan = self._check_state_dict(state_dict)
        inner_sd = {
            **state_dict,
            "state": {
                k: {kk: vv for kk, vv in v.items() if kk != EMA} for k, v in state_dict["state"].items()
            },
            "param_groups": [
                {k: v for k, v in g.items() if k not in COUNTERS} for g in state_dict["param_groups"]
            ],
        }
        shadows, counters = plan
        try:  # the new shadows first, so that nothing has changed if one cannot be made
            with torch.no_grad():
                shadows = {p: self._as_shadow(p, value) for p, value in shadows.items()}
        except Exception as e:
            raise ValueError(f"could not make a shadow from the state dict: {e!r}") from e
        old = (self.optimizer.state, self.optimizer.param_groups)
        try:
            self.optimizer.load_state_dict(inner_sd)
        except Exception as e:  # put the inner optimizer back as it was
            self.optimizer.state, self.optimizer.param_groups = old
            raise ValueError(f"the inner optimizer could not load the state dict: {e!r}") from e
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups
        for group, before in zip(self.param_groups, old[1]):  # a dict saved without "ema": keep ours
            if EMA not in group and EMA in before:
                group[EMA] = before[EMA]

        if counters is None:
            warnings.warn(
                "loaded a state dict without EMA shadows (a plain inner-optimizer state dict?): "
                "the EMA restarts from the current weights at the next step",
                UserWarning,
                stacklevel=2,
            )
            counters = (0, 0, 1.0)
        for p, shadow in shadows.items():
            self.state[p][EMA] = shadow
        self._steps, self._updates, self._decay_prod = counters
        self._groups = None
        self._needs_init = True
        self._publish_counters()
        self._find_bare()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_state_dict(self, sd: dict[str, Any]) -> tuple[dict[Tensor, Tensor], Optional[tuple]]:
        """Validate a whole state dict; return the shadows to install and the counters."""
        for key in ("state", "param_groups"):
            if key not in sd:
                raise ValueError(f"the state dict has no {key!r} key; pass the dict from opt.state_dict()")
        saved_groups, saved_state = sd["param_groups"], sd["state"]
        if not isinstance(saved_state, Mapping) or not isinstance(saved_groups, (list, tuple)):
            raise ValueError("state_dict['state'] must be a dict and state_dict['param_groups'] a list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"param group {i} of the state dict has no 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} of the state dict has {len(saved['params'])} params, "
                    f"this optimizer's has {len(group['params'])}"
                )
            if "lr" in group and "lr" not in saved:
                raise ValueError(f"param group {i} of the state dict has no 'lr'")
        id_map: dict[Any, Tensor] = {}
        for k, p in zip(
            chain.from_iterable(g["params"] for g in saved_groups),
            chain.from_iterable(g["params"] for g in self.param_groups),
        ):
            if id_map.setdefault(k, p) is not p:
                raise ValueError(f"the state dict lists param id {k!r} for two different params")
        unknown = [k for k in saved_state if k not in id_map]
        if unknown:
            raise ValueError(
                f"the state dict has state for param ids {unknown[:5]} that no param group lists"
            )

        group_counters = [_group_counters(i, g) for i, g in enumerate(saved_groups)]
        distinct = {c for c in group_counters if c is not None}
        if len(distinct) > 1:
            raise ValueError(f"the param groups of the state dict disagree on the EMA counters: {distinct}")
        counters = distinct.pop() if distinct else None
        shadows: dict[Tensor, Tensor] = {}
        have_by_group = []
        for saved, group in zip(saved_groups, self.param_groups):
            enabled = saved.get(EMA, group.get(EMA, True))
            averaged = list(
                {id(id_map[k]): k for k in saved["params"] if enabled and _is_float(id_map[k])}.values()
            )
            have_by_group.append((averaged, [k for k in averaged if EMA in saved_state.get(k, {})]))
        any_shadow = any(have for _, have in have_by_group)
        for i, ((averaged, have), own) in enumerate(zip(have_by_group, group_counters)):
            if have and own is None:
                raise ValueError(
                    f"param group {i} of the state dict has 'ema' shadows but no EMA counters "
                    f"({', '.join(COUNTERS)})"
                )
            # A group with counters had shadows when it was saved (unless none had any yet).
            if len(have) != len(averaged) and (have or (own is not None and own[0] > 0 and any_shadow)):
                missing = [k for k in averaged if k not in have]
                raise ValueError(f"param group {i}: params {missing[:5]} have no 'ema' shadow but others do")
            for k in have:
                shadows[id_map[k]] = _checked_shadow(k, id_map[k], saved_state[k][EMA])
        for k, saved in saved_state.items():
            self._check_inner_state(k, id_map[k], saved)
        return shadows, counters

    def _check_inner_state(self, k: Any, p: Tensor, saved: Any) -> None:
        """Inner keys must fit the param and what this optimizer already holds for it."""
        if not isinstance(saved, Mapping):
            raise ValueError(f"state[{k!r}] must be a dict, got {type(saved).__name__}")
        current = {kk: v for kk, v in self.state.get(p, {}).items() if kk != EMA}
        given = {kk: v for kk, v in saved.items() if kk != EMA}
        if current and given:
            missing = current.keys() - given.keys()
            if missing:
                raise ValueError(
                    f"state[{k!r}] lacks the keys {sorted(map(str, missing))} of this optimizer's state"
                )
        for kk, v in given.items():
            if not isinstance(v, Tensor):
                continue
            cur = current.get(kk)
            expected = cur.shape if isinstance(cur, Tensor) else p.shape if kk in PARAM_SHAPED else None
            if expected is not None and v.shape != expected:
                raise ValueError(
                    f"state[{k!r}][{kk!r}] has shape {tuple(v.shape)}, expected {tuple(expected)}"
                )


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


def _group_counters(i: int, group: Mapping) -> Optional[tuple[int, int, float]]:
    present = [c in group for c in COUNTERS]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"param group {i} of the state dict has only some of the EMA counters {COUNTERS}")
    steps, updates, prod = (group[c] for c in COUNTERS)
    for name, v in ((STEPS, steps), (UPDATES, updates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} in the state dict must be an int >= 0, got {v!r}")
    if isinstance(prod, bool) or not isinstance(prod, numbers.Real) or not 0.0 <= prod <= 1.0:
        raise ValueError(f"{DECAY_PROD} in the state dict must be a float in [0, 1], got {prod!r}")
    return steps, updates, float(prod)


def _checked_shadow(k: Any, p: Tensor, value: Any) -> Tensor:
    if not isinstance(value, Tensor) or not _is_float(value) or value.is_complex() != p.is_complex():
        kind = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"state[{k!r}]['ema'] must be a {'complex' if p.is_complex() else 'real'} floating "
            f"tensor like its param, got a {kind}"
        )
    if value.is_meta:
        raise ValueError(f"state[{k!r}]['ema'] is a meta tensor: it holds no values")
    if value.shape != p.shape:
        raise ValueError(
            f"state[{k!r}]['ema'] has shape {tuple(value.shape)}, its param has {tuple(p.shape)}"
        )
    if (_kernels.local(value) is value) != (_kernels.local(p) is p):
        raise ValueError(
            f"state[{k!r}]['ema'] and its param must both be DTensors or both plain tensors; "
            "for sharded models load through torch.distributed.checkpoint's set_optimizer_state_dict"
        )
    return value


class _Swapped:
    """One param inside swap_ema_weights(): how it was swapped and how far."""

    def __init__(self, p: Tensor, shadow: Tensor, method: str, stash: Optional[Tensor] = None) -> None:
        self.p, self.shadow, self.method, self.stash = p, shadow, method, stash
        self.done = 0  # pieces swapped (1 for "copy" once the EMA is in)

    def undo(self) -> None:
        if self.method == "copy":
            if self.done:
                self.p.copy_(self.stash)
            return
        kernel = _kernels.SWAP_KERNELS[self.method][1]
        pieces = _kernels.swap_pieces(self.shadow, self.p)
        while self.done:
            s_piece, p_piece = pieces[self.done - 1]
            kernel(s_piece, p_piece)
            self.done -= 1


def _unproxied(opt: EMAOptimizer) -> EMAOptimizer:
    """The EMAOptimizer behind a proxy subclass such as Lightning's ``LightningOptimizer``.

    Such a proxy (what ``self.optimizers()`` returns in a LightningModule) forwards attribute
    reads to the optimizer it wraps (``_optimizer``) but keeps writes to itself, so every
    method that changes the wrapper's own attributes runs on the real optimizer instead.
    """
    wrapped = opt.__dict__.get("_optimizer")
    return wrapped if isinstance(wrapped, EMAOptimizer) and wrapped is not opt else opt


def _is_float(p: Tensor) -> bool:
    return p.is_floating_point() or p.is_complex()


def _check_decay_arg(decay: Any) -> None:
    if callable(decay):
        return
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or isinstance(decay, Tensor):
        raise TypeError(
            f"decay must be a float in [0, 1] or a schedule t -> float, got {type(decay).__name__}"
        )
    if math.isnan(decay) or not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"decay must be in [0, 1], got {decay}; for a half-life of h updates use schedules.half_life(h)"
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
