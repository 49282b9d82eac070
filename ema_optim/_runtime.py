"""The mutable side of one EMAOptimizer: counters, the cached layout, the step in progress,
the swap records and the offload pipeline, and the bookkeeping of one ``step()``.

It is one object so that proxies that copy the optimizer's ``__dict__`` (Lightning's
``LightningOptimizer``) and ``copy.copy`` share it: a step, swap or load through any of them
is seen by all. The host-side parts of a step are kept out of ``torch.compile``
(``torch.compiler.disable``) so that neither the counters nor the weights become guards: a
compiled step reuses one graph whatever the decay.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _kernels, _load_check, _offload, _plan, _shadows, _state_dict, _swap


class Runtime:
    def __init__(self, shadows: int) -> None:
        self.counters = _plan.Counters.start(shadows)
        self.plan: Optional[_plan.StepPlan] = None  # the step in progress (between begin and commit)
        self.layout: Optional[_shadows.Layout] = None  # cached; rebuilt when the groups change
        self.swapped: Optional[list[_swap.Record]] = None  # inside swap_ema_weights()
        self.swapped_index = 0
        self.swapped_buffers: list[Tensor] = []  # the averaged buffers when the swap began
        self.offload = _offload.Offload()  # the update in flight for offloaded shadows
        self.weight_tensors: list[Tensor] = []  # this step's weights as 0-dim tensors (compile)

    def current_layout(
        self, inner: Optimizer, spec: _shadows.Spec, buffers: Optional[_shadows.Buffers]
    ) -> _shadows.Layout:
        """The cached layout, rebuilt if the param groups or state changed (O(groups) check)."""
        if self.layout is None or not self.layout.fresh(inner.param_groups, inner.state):
            self.layout = None  # a failed build leaves no stale layout behind
            self.layout = _shadows.Layout(inner.param_groups, inner.state, spec, buffers)
        return self.layout

    @torch.compiler.disable
    def begin(
        self, inner: Optimizer, timing: _plan.Timing, spec: _shadows.Spec, buffers: Optional[_shadows.Buffers]
    ) -> str:
        """Everything decided before the inner step, on the host; a failure changes nothing.
        Returns the step's action; the plan is kept for :meth:`weights` and :meth:`commit`."""
        if self.swapped is not None:
            raise RuntimeError(
                "step() was called inside swap_ema_weights(): the params hold the EMA weights; "
                "leave the with-block before training"
            )
        self.offload.wait()  # the last offloaded update must be done before params change
        step_plan = _plan.plan(self.counters, timing)
        layout = self.current_layout(inner, spec, buffers)
        if layout.incomplete:
            layout.make_missing()  # from the weights before this step
        self.plan = step_plan
        return step_plan.action

    @torch.compiler.disable
    def adopt(self, inner: Optimizer, shadows: int) -> None:
        """After the inner step: install the shadows made by :meth:`begin` (the inner optimizer
        has created its state by now) and name the counters where they are saved."""
        if self.layout is not None and self.layout.adopt_missing():
            _state_dict.publish(inner.param_groups, inner.state, shadows)

    def update(self, action: str, found_inf: Optional[Tensor]) -> None:
        """The EMA update of every shadow (traced by torch.compile)."""
        layout = self.layout
        if action == "skip" or layout is None or not layout.groups:
            return
        groups = layout.groups
        weights: Optional[Sequence[_kernels.Weight]]
        if found_inf is not None:
            # A skipped (inf/NaN) step is only known on the device: weight it to zero there
            # (computed where found_inf lives; each group takes it to its own device).
            keep = 1.0 - found_inf.to(torch.float64).reshape(())
            shadows = len(groups[0].shadows)
            weights = [keep] * shadows if action == "copy" else [keep * w for w in self.weights(keep.device)]
        elif action == "copy":
            weights = None
        elif torch.compiler.is_compiling():
            weights = self.weights(groups[0].shadows[0][0].device)
        else:  # eager: a Python float is a kernel argument, the fastest form and sync-free
            assert self.plan is not None  # begin() made it; commit() clears it after this update
            weights = self.plan.weights
        try:
            if weights is None:
                _kernels.copy_(layout.here)
            else:
                _kernels.lerp_(layout.here, weights)
        except RuntimeError as e:
            self.layout = None  # rebuilt, and every shadow checked, at the next step
            raise RuntimeError(
                "the EMA update failed after the inner step ran (a param changed its shape or dtype "
                "after its shadow was made? e.g. p.data = ...); the counters did not advance, some "
                "shadows may be updated, and the next step() checks every shadow before it changes "
                f"anything: {e}"
            ) from e
        if layout.offloaded:  # ema_device: in the background, behind the next step (_offload.py)
            self.offload.launch(layout.offloaded, weights)

    @torch.compiler.disable
    def weights(self, device: torch.device) -> list[Tensor]:
        """This step's weights in cached 0-dim tensors, filled in place outside any compiled
        graph: a compiled step takes them as inputs, so a changing decay is data, not a guard."""
        assert self.plan is not None, "weights() is for a step in progress (between begin and commit)"
        values = self.plan.weights
        cached = self.weight_tensors
        if len(cached) != len(values) or cached[0].device != device:
            cached = self.weight_tensors = [
                torch.zeros((), dtype=torch.float64, device=device) for _ in values
            ]
        for w, value in zip(cached, values):
            w.fill_(value)
        return cached

    @torch.compiler.disable
    def commit(self) -> None:
        assert self.plan is not None, "commit() without begin()"
        self.counters, self.plan = self.plan.counters, None

    def load(
        self,
        inner: Optimizer,
        spec: _shadows.Spec,
        buffers: Optional[dict[str, Tensor]],
        plan: _load_check.LoadPlan,
    ) -> None:
        """Apply a checked state dict: make the new shadows (a failure changes nothing), load
        the inner optimizer's part (put back as it was if that fails), then install."""
        try:  # the new shadows first, so that nothing has changed if one cannot be made
            shadows = {p: {k: spec.make(p, v) for k, v in s.items()} for p, s in plan.shadows.items()}
            held = {}
            if plan.buffer_shadows:
                assert buffers is not None  # check() accepts buffer shadows only for our buffers
                held = {
                    k: spec.make(buffers[_shadows.split_buffer_key(k)[1]], v)
                    for k, v in plan.buffer_shadows.items()
                }
        except Exception as e:
            raise ValueError(f"could not make a shadow from the state dict: {e!r}") from e
        if plan.counters is None:
            warnings.warn(
                "loaded a state dict without EMA shadows (a plain inner-optimizer state dict?): "
                "the EMA restarts from the current weights at the next step",
                UserWarning,
                stacklevel=3,
            )
        if plan.counters is not None and buffers and not held:
            warnings.warn(
                "loaded a state dict without buffer shadows (saved without buffers=?): the buffers' EMA "
                "restarts from the current buffers at the next step",
                UserWarning,
                stacklevel=3,
            )
        _state_dict.load_inner(inner, plan.inner)  # warnings first: one raised as an error changes nothing
        for p, s in shadows.items():
            _shadows.install(inner.state, p, s)
        if held:
            anchor = _shadows.anchor(_shadows.averaged(inner.param_groups))
            assert anchor is not None, "buffer shadows need an averaged param to hold them"
            _shadows.install(inner.state, anchor, held)
        self.counters = plan.counters or _plan.Counters.start(spec.count)
        self.layout = None
        _state_dict.publish(inner.param_groups, inner.state, spec.count)


def inner_step(inner: Optimizer, args: tuple) -> Any:
    """``inner.step(*args)`` without the global step hooks: those run once per step, for the
    wrapper. The inner optimizer's own step hooks still run, as torch runs them (a bad return
    value of a pre hook is refused the same way), and a profiler still shows the inner step
    (``Optimizer.step#Adam.step``) inside the wrapper's."""
    step = type(inner).step
    patched = vars(inner).get("step")
    if patched is not None and getattr(patched, "__wrapped__", None) is step:
        # an LR scheduler built on the inner optimizer: its patch only marks the step as called
        inner._opt_called = True  # type: ignore[attr-defined]
        patched = None
    if patched is not None or not getattr(step, "hooked", False):  # another patch, or unhooked
        return inner.step(*args)
    call_args = (inner, *args)
    kwargs: dict[str, Any] = {}
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
        for pre_hook in list(inner._optimizer_step_pre_hooks.values()):
            result = pre_hook(inner, call_args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                    )
                call_args, kwargs = result
        out = step.__wrapped__(*call_args, **kwargs)  # type: ignore[attr-defined]
        inner._optimizer_step_code()
        for post_hook in list(inner._optimizer_step_post_hooks.values()):
            post_hook(inner, call_args, kwargs)
    return out
