"""EMAOptimizer: an exponential moving average of the weights, kept inside the optimizer."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from functools import partial
from typing import Any, Callable, DefaultDict, Iterator, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

from . import _load_check, _plan, _runtime, _shadows, _state_dict, _swap
from ._plan import Decay
from ._runtime import Runtime as _Runtime

__all__ = ["EMAOptimizer"]

# What torch.amp.GradScaler sets on the optimizer it steps when _step_supports_amp_scaling is
# true (and deletes after the step); forwarded to the inner optimizer.
_GRAD_SCALE, _FOUND_INF = "grad_scale", "found_inf"
# Per inner optimizer, the handles of the hooks of the wrapper around it now (see _runtime).
_HOOKS: weakref.WeakKeyDictionary[Optimizer, tuple[Any, ...]] = weakref.WeakKeyDictionary()


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
        decay: float in [0, 1], or a schedule ``t -> float`` (see :mod:`ema_optim.schedules`);
            or a tuple/list of those: one shadow each (``"ema"``, ``"ema_1"``, ...), all
            under the same timing and counters, e.g. two ``schedules.power`` profiles for
            post-hoc EMA (:mod:`ema_optim.posthoc`).
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
        buffers: ``None`` (buffers stay live), or a module (usually the model) whose
            persistent floating-point buffers (BatchNorm statistics) are averaged too, by
            name, with the same timing, weights and dtype rule; integer buffers stay live.

    Notes: edit a shadow in place (``opt.state[p]["ema"].copy_(...)``) or through
    ``load_state_dict``; assigning a new tensor to ``opt.state[p]["ema"]``, or removing it, is
    not picked up (except to drop a stale shadow that ``step()`` refused).
    Global step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``) run once
    per ``step()``, with the wrapper; hooks registered on the inner optimizer still run.

    Cost: one shadow per parameter and EMA in the shadow dtype (4 bytes/param for fp32 or
    bf16 params with default settings) and, per update, one read of every weight and one
    read-modify-write of every shadow, one multi-tensor kernel per shadow and (device,
    dtype) group. No host-device synchronisation; the host work per step does not grow
    with the number of params. Params of groups created with ``"ema": False`` and
    non-floating params have no shadow.

    Raises:
        TypeError: ``optimizer`` is not an Optimizer, or an argument has the wrong type.
        ValueError: an argument is out of range.

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
        decay: Union[Decay, Sequence[Decay]] = 0.9999,
        *,
        update_after_step: int = 0,
        update_every: int = 1,
        bias_correction: bool = False,
        ema_dtype: Optional[torch.dtype] = None,
        ema_device: Optional[Union[str, torch.device]] = None,
        buffers: Optional[torch.nn.Module] = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                "build the inner optimizer first, e.g. EMAOptimizer(torch.optim.AdamW(model.parameters()))"
            )
        if isinstance(optimizer, EMAOptimizer):
            raise TypeError("optimizer is already an EMAOptimizer; wrap the inner optimizer only once")
        decays = _plan.check_decays(decay)
        _plan.check_int("update_after_step", update_after_step, minimum=0)
        _plan.check_int("update_every", update_every, minimum=1)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__}")
        if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype) and ema_dtype.is_floating_point):
            raise TypeError(
                f"ema_dtype must be a floating torch.dtype such as torch.float32, got {ema_dtype!r}"
            )
        device = _shadows.check_device(ema_device)
        if buffers is not None and not isinstance(buffers, torch.nn.Module):
            raise TypeError(
                f"buffers must be None or a torch.nn.Module (usually the model), got {type(buffers).__name__}"
            )
        for i, group in enumerate(optimizer.param_groups):
            _shadows.enabled(group, i)

        # The base class sets up the hook registries and the step patch; param_groups, state
        # and defaults are then read through to the inner optimizer (properties below).
        super().__init__([{"params": []}], {})
        self.optimizer = optimizer
        self.decay = decay
        self.update_after_step = update_after_step
        self.update_every = update_every
        self.bias_correction = bias_correction
        self.ema_dtype = ema_dtype
        self.ema_device = device
        self.buffers = buffers
        self._buffers = _shadows.Buffers(buffers) if buffers is not None else None
        self._timing = _plan.Timing(decays, update_after_step, update_every, bias_correction)
        self._spec = _shadows.Spec(len(decays), ema_dtype, device)
        self._rt = self._runtime(counters=None)

    # ------------------------------------------------------------------ inner optimizer surface
    # param_groups, state and defaults are the inner optimizer's own objects, read at each
    # access, so that an LR scheduler on the wrapper reaches the inner optimizer even after
    # inner.load_state_dict() gave it new ones. Reading ``state`` first waits for an
    # offloaded update, so a shadow read or edited through it is current.

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if getattr(self, "optimizer", None) is not None:  # ignored in the base __init__
            self.optimizer.param_groups = value

    @property
    def state(self) -> DefaultDict[Any, Any]:
        self._rt.offload.wait()
        return self.optimizer.state

    @state.setter
    def state(self, value: DefaultDict[Any, Any]) -> None:
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.defaults = value

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
        if getattr(self, "optimizer", None) is None:  # the base __init__'s placeholder group
            return
        if isinstance(param_group, dict) and _shadows.ENABLE in param_group:
            _shadows.enabled(param_group, len(self.param_groups))
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"EMAOptimizer(decay={_plan.describe(self._timing.decays)}, "
            f"update_after_step={self.update_after_step}, "
            f"update_every={self.update_every}, bias_correction={self.bias_correction}, "
            f"ema_dtype={self.ema_dtype}, ema_device={self.ema_device},\n  {self.optimizer!r})"
        )

    def __copy__(self) -> EMAOptimizer:
        # A shallow copy shares the inner optimizer and the runtime, like a proxy does.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __getstate__(self) -> dict[str, Any]:
        # Like Optimizer.__getstate__, leave out what is tied to this instance: an LR
        # scheduler's patched `step` (it refers to this object), hooks and caches.
        self._rt.offload.wait()
        skip = {"step", "_opt_called", "_rt"}
        state = {k: v for k, v in self.__dict__.items() if k not in skip and "_hooks" not in k}
        return {**state, "_rt": (self._rt.counters, self._rt.swapped)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        counters, swapped = state.pop("_rt")
        for name in ("state", "param_groups", "defaults"):  # read through to the inner optimizer
            state.pop(name, None)
        super().__setstate__(state)
        self._rt = self._runtime(counters)
        if swapped:  # a copy taken inside swap_ema_weights(): give it its training weights back
            _swap.swap_out(swapped)

    def _runtime(self, counters: Optional[_plan.Counters]) -> _Runtime:
        """A new runtime, with its hooks on the inner optimizer (``opt.optimizer.state_dict()``
        and ``load_state_dict()`` then keep the EMA exact, see ``Runtime.inner_saved``)."""
        inner, spec = self.optimizer, self._spec
        rt = _Runtime(spec.count)
        rt.record = _state_dict.record(self._timing.decays)
        rt.may_copy = _plan.may_copy(self._timing)
        if counters is not None:
            rt.counters = counters
        # Closures over the runtime, not the wrapper: the inner optimizer does not keep it alive.
        # It holds one set of them, this wrapper's: one that wrapped it before (a notebook cell
        # run twice, `EMAOptimizer(opt.optimizer, ...)`) would save its own counters. Each runs
        # for this inner optimizer only (a copy of one may share its hook registries).
        for handle in _HOOKS.pop(inner, ()):
            handle.remove()
        _HOOKS[inner] = (
            inner.register_state_dict_pre_hook(_only_for(inner, rt.before_inner_save)),
            inner.register_state_dict_post_hook(_only_for(inner, rt.inner_saved), prepend=True),
            inner.register_load_state_dict_pre_hook(
                _only_for(inner, partial(rt.before_inner_load, buffers=self._buffers))
            ),
            inner.register_load_state_dict_post_hook(
                _only_for(inner, partial(rt.inner_loaded, spec=spec, buffers=self._buffers)), prepend=True
            ),
        )
        _state_dict.publish(inner.param_groups, inner.state, spec.count)
        return rt

    # ------------------------------------------------------------------ step

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Run the inner optimizer's step, then update the shadows.

        Returns:
            What the inner step returns (the closure's loss, if a closure was given).

        Raises:
            RuntimeError: inside ``swap_ema_weights()`` (nothing is changed); or one param was
                given a new shape or dtype since the last step (see the note).
            ValueError: the decay schedule returned a value outside [0, 1], a param group's
                ``"ema"`` flag is not a bool, or a shadow no longer fits its param's shape
                (nothing is changed).

        Note:
            A model converted as a whole between steps (``model.half()``, ``model.double()``,
            ``model.to(memory_format=torch.channels_last)``) is followed: the shadows keep their
            dtype and take the new weights. A change to one param only (``p.data = ...`` with
            a new shape or dtype) is not looked for at every step, which would cost host work
            per param: its EMA update then fails after the inner step ran (the weights moved,
            and shadows before it in its (device, dtype) group may have taken this update; the
            counters did not advance) with a ``RuntimeError``. The next step adapts to a new
            dtype; for a new shape it raises ``ValueError`` before changing anything, until
            that param's stale shadows are dropped (``"ema"``, and ``"ema_1"``, ... with
            several decays; the error gives the line that drops them all), which restarts
            its EMA from its current weights.
        """
        rt, inner = self._rt, self.optimizer
        args = () if closure is None else (closure,)
        body = rt.begin(inner, self._timing, self._spec, self._buffers, torch.compiler.is_compiling())
        found_inf = getattr(self, _FOUND_INF, None)
        forwarded = self._step_supports_amp_scaling and hasattr(self, _GRAD_SCALE)
        if forwarded:  # GradScaler with a scale-aware inner optimizer
            setattr(inner, _GRAD_SCALE, getattr(self, _GRAD_SCALE))
            setattr(inner, _FOUND_INF, found_inf)
        found_inf = found_inf if forwarded else None
        try:
            if body is not None:  # steady state: one traced body (the inner update, then the EMA)
                loss = _runtime.fused_step(inner, body, args, partial(rt.update, found_inf))
            else:  # new shadows to install after the inner update, or a non-standard inner step
                loss = _runtime.inner_step(inner, args)
                rt.adopt(inner, self._spec.count)
                with torch.no_grad():
                    rt.update(found_inf)
        finally:
            if forwarded:
                delattr(inner, _GRAD_SCALE)
                delattr(inner, _FOUND_INF)
        rt.end(found_inf)
        return loss

    def _layout(self) -> _shadows.Layout:
        return self._rt.current_layout(self.optimizer, self._spec, self._buffers)

    # ------------------------------------------------------------------ swap

    @contextlib.contextmanager
    def swap_ema_weights(self, index: int = 0) -> Iterator[None]:
        """Context manager: the model's params hold the EMA weights of shadow ``index`` inside the block.

        On exit, also by exception, the training weights come back bit for bit, even if
        the block replaced a param's data (``model.float()``, ``model.to(memory_format=...)``,
        ``p.data = ...``). Params without a shadow (before the first step, ``"ema": False``
        groups) are left alone.

        Cost: no model-sized copy. Same-dtype pairs trade values in place through a
        scratch of at most 1M elements; bf16 params with fp32 shadows are packed in place
        (the param gets the EMA rounded to bf16, half away from zero; the shadow's 32 bits
        keep the 16 training bits and the 16 bits the rounding dropped); fp16 params with
        fp32 shadows likewise (the param gets ``ema.half()``, the shadow keeps the residual)
        while the EMA is in fp16's normal range, and fp32/bf16/fp16 params with float64
        shadows (the param gets the EMA in its dtype) while the EMA is in the param dtype's
        normal range. Tensors that cannot be packed (a NaN EMA, an EMA out of that range,
        shadows narrower than their params, params with gaps in memory) keep a copy of their
        training values ("copy" pairs).

        Inside the block, ``opt.step()`` and a nested swap raise ``RuntimeError``;
        ``opt.state_dict()`` returns what it returns outside; ``opt.state[p]["ema"]`` holds
        swap bookkeeping, not the EMA, and so do the ``"ema"`` tensors of a ``state_dict()``
        taken before the block (they are the live shadows, as in any torch state dict): save
        checkpoints outside the block, or call ``state_dict()`` inside it. In-place edits of
        the params inside the block edit the EMA (except for "copy" pairs, and params whose
        data the block replaced, where they are dropped); the training weights come back
        unchanged either way.

        Args:
            index: which shadow to swap in (0 for the first ``decay``; ``k`` for ``decay[k]``).
                Negative values count from the last, as for a sequence: with ``n`` shadows,
                ``index`` is in ``[-n, n - 1]`` and ``-1`` is the last. Any integer that
                ``operator.index()`` takes (numpy ints, integer 0-dim tensors), not a bool.

        Raises:
            TypeError: ``index`` is not an integer (nothing is changed).
            IndexError: ``index`` is outside ``[-n, n - 1]`` (nothing is changed).
            RuntimeError: a swap is already active (nothing is changed).
            ValueError: a param no longer has its shadows' shape (``p.data = ...`` with a new
                shape; the message says what to do; nothing is changed).

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
        index = _shadows.as_index(index)
        if not -self._spec.count <= index < self._spec.count:
            raise IndexError(
                f"swap_ema_weights({index}): this optimizer keeps {self._spec.count} shadow(s) "
                f"(one per decay), so index must be in [-{self._spec.count}, {self._spec.count - 1}] "
                "(negative values count from the last, as for a sequence)"
            )
        if self._rt.swapped is not None:
            raise RuntimeError("swap_ema_weights() is already active; it cannot be nested")
        try:
            self._swap_in(index % self._spec.count)  # on failure half-way, what was done is undone below
            yield
        finally:
            self._swap_out()

    def _swap_in(self, index: int) -> None:
        rt = self._rt
        rt.offload.wait()
        layout = self._layout()
        rt.swapped, rt.swapped_index, rt.swapped_buffers = [], index, list(layout.buffer_tensors)
        _swap.swap_in(layout.pairs(index), rt.swapped)

    def _swap_out(self) -> None:
        rt = self._rt
        # this swap's undo record, taken whole and cleared: the next swap starts from nothing
        records, buffers, rt.swapped, rt.swapped_buffers = rt.swapped or [], rt.swapped_buffers, None, []
        try:
            _swap.swap_out(records)
        finally:
            if self._buffers is not None:  # the block may have replaced them (model.double())
                self._buffers.put_back(buffers)

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with each param's shadows under ``"ema"``, ``"ema_1"``, ...

        ``state_dict()["state"][i]["ema"]`` is the shadow of the i-th param (in the shadow
        dtype); the EMA counters are plain ints/floats in each param group that has
        shadows. Inside ``swap_ema_weights()`` the same values are returned (as copies).
        """
        self._rt.offload.wait()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # The inner's own layout and hooks: the shadows are in the shared state, and the
        # runtime's hooks on the inner optimizer fill in the counters (Runtime.inner_saved).
        sd = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or from the plain inner optimizer).

        The whole dict is checked before anything changes. Shadows keep the shadow dtype
        (fp32 shadows of bf16 params stay fp32). A plain inner-optimizer state dict (no
        shadows anywhere) loads the inner state and restarts the EMA from the current
        weights at the next step, with a ``UserWarning``. State entries keyed by something
        other than a param pass through to the inner optimizer, as in torch.

        Raises:
            RuntimeError: inside ``swap_ema_weights()``.
            TypeError: ``state_dict`` is not a dict.
            ValueError: the state dict does not fit this optimizer; nothing was changed.
        """
        rt, inner = self._rt, self.optimizer
        if rt.swapped is not None:
            raise RuntimeError(
                "load_state_dict() cannot run inside swap_ema_weights(); leave the block first"
            )
        rt.offload.wait()
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        buffers = dict(zip(self._buffers.names, self._buffers.tensors())) if self._buffers else None
        plan = _load_check.check(
            state_dict, inner.param_groups, inner.state, self._spec.count, buffers, self._rt.record
        )
        rt.load(inner, self._spec, buffers, plan)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _only_for(inner: Optimizer, hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run when ``inner`` itself calls it; for another optimizer (a shallow copy that
    shares ``inner``'s hook registries) it does nothing: None leaves a state dict as it is."""
    ref = weakref.ref(inner)

    def run(opt: Optimizer, *args: Any) -> Any:
        return hook(opt, *args) if opt is ref() else None

    return run
