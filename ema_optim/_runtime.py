"""The mutable side of one EMAOptimizer (counters, the cached layout, the step in progress,
the swap records, the offload pipeline) and the three parts of one ``step()``.

A step is a host prologue (:meth:`Runtime.begin`), one body that a compiler can trace whole
(the inner optimizer's update, then the EMA update: :func:`fused_step`), and a host epilogue
(:meth:`Runtime.end`). Every host decision (the plan, the layout, new shadows, the counters)
sits in the prologue or the epilogue, which ``torch.compile`` does not trace
(``torch.compiler.disable``): neither the counters nor a changing decay become guards, and
nothing breaks the graph between the two updates. A step that must install new shadows
between them (the first one, or one after the params or groups changed) runs in parts instead
(:func:`inner_step`, :meth:`Runtime.adopt`, :meth:`Runtime.update`).

It is one object so that proxies that copy the optimizer's ``__dict__`` (Lightning's
``LightningOptimizer``) and ``copy.copy`` share it: a step, swap or load through any of them
is seen by all.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch._dynamo
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

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
        self.weights: Sequence[_kernels.Weight] = ()  # this step's lerp weights (begin to end)
        self.weight_tensors: list[Tensor] = []  # the 0-dim tensors they are kept in under compile
        # per shadow: whether a weight can be exactly 1 (set once, _plan.may_copy)
        self.may_copy: tuple[bool, ...] = ()
        self.record: list[Any] = []  # each shadow's decay as saved (_state_dict.record)
        self.loading = False  # inside load(): the inner optimizer's load hooks stand aside
        self.held: dict[Tensor, dict[str, Any]] = {}  # shadows an inner load keeps from torch's
        self.lost: Optional[str] = (
            None  # what a load through the inner optimizer lost (warned at the next step)
        )

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
        self,
        inner: Optimizer,
        timing: _plan.Timing,
        spec: _shadows.Spec,
        buffers: Optional[_shadows.Buffers],
        compiling: bool,
    ) -> Optional[Callable[..., Any]]:
        """The host prologue: everything decided before the inner update. A failure changes
        nothing. Keeps the plan and this step's weights for :meth:`update` and :meth:`end`.

        Returns the inner optimizer's undecorated update when this step can run as one traced
        body (:func:`fused_step`); None when it runs in parts: new shadows must be installed
        after the inner update (its lazily created state first), the inner optimizer has step
        post hooks (the EMA folds in the weights they leave), or the inner step is not torch's
        standard wrapper.
        """
        if self.swapped is not None:
            raise RuntimeError(
                "step() was called inside swap_ema_weights(): the params hold the EMA weights; "
                "leave the with-block before training"
            )
        self.offload.wait()  # the last offloaded update must be done before params change
        lost, self.lost = self.lost, None
        if lost is not None:
            warnings.warn(lost, UserWarning, stacklevel=4)
        step_plan = _plan.plan(self.counters, timing)
        layout = self.current_layout(inner, spec, buffers)
        if layout.incomplete:
            layout.make_missing()  # from the weights before this step
        self.plan = step_plan
        self.weights = step_plan.weights
        if compiling and step_plan.action == "lerp" and layout.groups:
            # A compiled body takes the weights as 0-dim tensors filled here, in place: data,
            # not guards, so a changing decay reuses the graph.
            shadows = [g.shadows[0][0] for g in layout.groups]
            self.weights = self._weight_tensors(step_plan.weights, shadows[0].device, _weight_dtype(shadows))
        # Here, not in the traced step: Dynamo drops attribute stores on an optimizer.
        _mark_called(inner)
        if layout.incomplete or getattr(inner, "_optimizer_step_post_hooks", None):
            return None  # the inner's post hooks are part of its step (they may edit the weights)
        return traced_body(inner)

    @torch.compiler.disable
    def adopt(self, inner: Optimizer, shadows: int) -> None:
        """After the inner step (of a step run in parts): install the shadows made by
        :meth:`begin` (the inner optimizer has created its state by now) and name the
        counters where they are saved."""
        if self.layout is not None and self.layout.adopt_missing():
            _state_dict.publish(inner.param_groups, inner.state, shadows)

    def update(self, found_inf: Optional[Tensor]) -> None:
        """The EMA update of every shadow kept with its param, right after the inner update
        (traced by torch.compile). Offloaded shadows are updated by :meth:`end`."""
        layout, step_plan = self.layout, self.plan
        if step_plan is None or step_plan.action == "skip" or layout is None or not layout.here:
            return
        weights = self._step_weights(step_plan.action, found_inf, len(layout.here[0].shadows))
        try:
            if weights is None:
                _kernels.copy_(layout.here)
            else:
                copies = self.may_copy if step_plan.action == "lerp" else (True,) * len(weights)
                _kernels.lerp_(layout.here, weights, copies)
        except RuntimeError as e:
            self.layout = None  # rebuilt, and every shadow checked, at the next step
            raise RuntimeError(
                "the EMA update failed after the inner step ran (a param changed its shape or dtype "
                "after its shadow was made? e.g. p.data = ...); the counters did not advance, some "
                "shadows may be updated, and the next step() checks every shadow before it changes "
                f"anything: {e}"
            ) from e

    def _step_weights(
        self, action: str, found_inf: Optional[Tensor], shadows: int
    ) -> Optional[Sequence[_kernels.Weight]]:
        """This step's lerp weight per shadow; None for a copy. With a GradScaler skip known
        only on the device (``found_inf``), weighted to zero there, without a sync."""
        if found_inf is None:
            return None if action == "copy" else self.weights
        keep = 1.0 - found_inf.to(torch.float64).reshape(())
        return [keep] * shadows if action == "copy" else [keep * w for w in self.weights]

    @torch.compiler.disable
    def end(self, found_inf: Optional[Tensor]) -> None:
        """The host epilogue: start the update of offloaded shadows (it runs behind the next
        step, see ``_offload``), then advance the counters."""
        step_plan, layout = self.plan, self.layout
        assert step_plan is not None, "end() without begin()"
        if layout is not None and layout.offloaded and step_plan.action != "skip":
            shadows = len(layout.offloaded[0].shadows)
            self.offload.launch(layout.offloaded, self._step_weights(step_plan.action, found_inf, shadows))
        self.counters, self.plan = step_plan.counters, None

    def _weight_tensors(
        self, values: Sequence[float], device: torch.device, dtype: torch.dtype
    ) -> list[Tensor]:
        """``values`` in cached 0-dim tensors on ``device``, filled in place."""
        cached = self.weight_tensors
        if len(cached) != len(values) or cached[0].device != device or cached[0].dtype != dtype:
            cached = self.weight_tensors = [torch.zeros((), dtype=dtype, device=device) for _ in values]
        for w, value in zip(cached, values):
            w.fill_(value)
        return cached

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
        if plan.shadows and buffers and not held:  # saved after a step, without buffers=
            warnings.warn(
                "loaded a state dict without buffer shadows (saved without buffers=?): the buffers' EMA "
                "restarts from the current buffers at the next step",
                UserWarning,
                stacklevel=3,
            )
        for note in plan.notes:
            warnings.warn(note, UserWarning, stacklevel=3)
        self.loading = True  # the inner optimizer's load hook: this load is ours
        try:
            # after the warnings: one raised as an error has changed nothing
            _state_dict.load_inner(inner, plan.inner)
        finally:
            self.loading = False
        for p, s in shadows.items():
            _shadows.install(inner.state, p, s)
        if held:
            anchor = _shadows.anchor(_shadows.averaged(inner.param_groups))
            assert anchor is not None, "buffer shadows need an averaged param to hold them"
            _shadows.install(inner.state, anchor, held)
        self.counters = plan.counters or _plan.Counters.start(spec.count)
        self.layout = None
        _state_dict.publish(inner.param_groups, inner.state, spec.count)

    # ------------------------------------------------------------ the inner optimizer's hooks
    # Code written before the wrapper saves and loads through the inner optimizer
    # (``opt.optimizer.state_dict()``): these hooks, registered on it, keep that exact.

    def before_inner_save(self, inner: Optimizer) -> None:
        self.offload.wait()
        _state_dict.publish(inner.param_groups, inner.state, len(self.record))

    def inner_saved(self, inner: Optimizer, sd: dict) -> dict:
        """The saved counters and decay record in place of the placeholders; inside
        ``swap_ema_weights()`` the EMA in place of the swapped shadows' bookkeeping."""
        sd = _state_dict.to_saved(sd, inner.param_groups, self.counters, self.record)
        if self.swapped is not None:
            ema = {id(r.shadow): r.ema() for r in self.swapped}
            for i, entry in sd["state"].items():
                if isinstance(entry, dict):
                    sd["state"][i] = {k: _inside_swap(k, v, ema) for k, v in entry.items()}
        return sd

    def before_inner_load(
        self, inner: Optimizer, sd: Any, buffers: Optional[_shadows.Buffers]
    ) -> Optional[dict]:
        """Refuse, with nothing changed, what the wrapper's own load refuses outright (a power
        shadow saved with another gamma or a constant decay, more shadows than this optimizer
        keeps, shadows of buffers it does not average); warn of a changed decay (before
        anything changes, as the wrapper's load does); keep from torch's load the shadows it
        would break (``_state_dict.hold_back``) and the groups' ``"ema"`` flags that a dict
        without them would drop."""
        self.held = {}
        if self.loading:
            return None
        if self.swapped is not None:
            raise RuntimeError(
                "load_state_dict() cannot run inside swap_ema_weights(); leave the block first"
            )
        self.offload.wait()
        if not isinstance(sd, dict):
            return None
        if isinstance(sd.get("param_groups"), (list, tuple)):
            for note in _load_check.check_record(sd["param_groups"], self.record):
                warnings.warn(note, UserWarning, stacklevel=4)
        _load_check.check_shadow_keys(sd.get("state"), len(self.record))
        _load_check.check_buffer_names(sd.get("state"), buffers.names if buffers is not None else None)
        sd, self.held = _state_dict.hold_back(sd, inner.param_groups)
        return _state_dict.with_enable_flags(sd, inner.param_groups)

    def inner_loaded(
        self, inner: Optimizer, spec: _shadows.Spec, buffers: Optional[_shadows.Buffers]
    ) -> None:
        """After ``opt.optimizer.load_state_dict(sd)``: take the counters it carried (exact), or
        note what was lost, for a warning at the next step."""
        if self.loading:
            return
        self.layout = None
        held, self.held = self.held, {}
        lost = _state_dict.adopt_inner_load(inner, spec, held)
        counters, problem = _load_check.counters_in(inner.param_groups, spec.count)
        shadowed = _state_dict.shadowed(inner.state)
        if not shadowed and counters is not None and counters.steps == 0:
            self.counters = counters  # saved before the first step: nothing to lose
        elif not shadowed:
            self.counters = _plan.Counters.start(spec.count)
            lost.insert(
                0,
                "it had no EMA shadows (a plain inner-optimizer state dict?): the EMA restarts "
                "from the current weights at this step",
            )
        elif counters is not None:
            self.counters = counters
        else:
            lost.insert(
                0,
                f"it has EMA shadows but {problem}: the shadows are kept, and the counters go on "
                f"from this optimizer's ({_state_dict.STEPS}={self.counters.steps}, "
                f"{_state_dict.UPDATES}={self.counters.updates}), so a schedule's decay may restart",
            )
        if (
            shadowed
            and buffers is not None
            and buffers.names
            and not _state_dict.buffer_shadowed(inner.state)
        ):
            lost.append(
                "it had no buffer shadows (saved without buffers=?): the buffers' EMA restarts from "
                "the current buffers at this step"
            )
        _state_dict.publish(inner.param_groups, inner.state, spec.count)
        if lost:
            self.lost = (
                "opt.optimizer.load_state_dict() (the inner optimizer's, not the EMAOptimizer's): "
                + "; ".join(lost)
                + ". Load through the EMAOptimizer's load_state_dict() to resume the EMA exactly."
            )


def _weight_dtype(shadows: Sequence[Tensor]) -> torch.dtype:
    """The dtype of a compiled step's weights: the kernels compute in the shadows' precision
    (a float32 lerp takes its weight as a float32), so float64 only for float64 shadows. (A
    float64 0-dim CPU tensor would also cost a guard that reads its value at every call.)"""
    wide = any(s.dtype in (torch.float64, torch.complex128) for s in shadows)
    return torch.float64 if wide else torch.float32


# torch's standard step wrapper (``torch.optim.optimizer._use_grad_for_differentiable``),
# known by its code: an inner step decorated with it has its undecorated update at
# ``type(inner).step.__wrapped__.__wrapped__`` (the hooks' wrapper, then the grad-mode one).
_USE_GRAD_CODE = _use_grad_for_differentiable(lambda self: None).__code__
_HOOKED_CODE = Optimizer.profile_hook_step(lambda self: None).__code__
_DISABLED_CODE = torch._dynamo.disable(lambda self: None).__code__


def traced_body(inner: Optimizer) -> Optional[Callable[..., Any]]:
    """The inner optimizer's undecorated update if its step is torch's standard one (hooked by
    ``Optimizer``, grad mode set by ``_use_grad_for_differentiable``) and not patched on the
    instance by anything but an LR scheduler; else None."""
    step, traceable = _class_step(inner)
    if step is None or not traceable or _patched(inner) is not None:
        return None
    use_grad = getattr(step, "__wrapped__", None)
    if getattr(use_grad, "__code__", None) is not _USE_GRAD_CODE:
        return None
    return getattr(use_grad, "__wrapped__", None)


def _class_step(inner: Optimizer) -> tuple[Optional[Callable[..., Any]], bool]:
    """The class's step as ``Optimizer`` hooked it (None if it is not hooked), and whether
    torch.compile may trace it. Dynamo wraps the steps it does not trace (LBFGS, SparseAdam)
    in its ``disable``, above or below the hooks' wrapper depending on which came first; both
    wrappers copy the attributes of what they wrap, so they are known by their code."""
    hooked, traceable = _hooked(type(inner).step)
    patched = vars(inner).get("step")
    if hooked is None and getattr(patched, "_wrapped_by_lr_sched", False):
        # torch < 2.8: Dynamo's disable of a hooked step keeps only what is below the hooks;
        # an LR scheduler's patch made before still holds the hooked step
        hooked, _ = _hooked(getattr(patched, "__wrapped__", None))
    return hooked, traceable


def _hooked(step: Any) -> tuple[Optional[Callable[..., Any]], bool]:
    traceable, hooked = True, None
    for f in _chain(step):  # to the innermost hooks' wrapper: a subclass of a class whose step
        code = getattr(f, "__code__", None)  # was hooked, then wrapped, has two
        if code is _HOOKED_CODE:
            hooked = f
        elif code is _DISABLED_CODE:
            traceable = False
    return hooked, traceable


def fused_step(inner: Optimizer, body: Callable[..., Any], args: tuple, update: Callable[[], None]) -> Any:
    """``inner.step(*args)`` and then ``update()`` as one traced body (the EMA update right after
    the inner one, in one graph under ``torch.compile``).

    Around both updates it keeps what torch's step wrapper guarantees (:func:`_with_inner_hooks`)
    and the grad mode of the update (``defaults["differentiable"]``; the EMA always runs without
    grad). Like that wrapper, it sets the grad mode and breaks the graph *before* the body, so the
    compiler sees an inference graph whose in-place updates it can fuse and run without copies;
    the body is its own frame (:func:`_body_and_update`), so nothing breaks the graph between the
    two updates.
    """

    def run(call_args: tuple, kwargs: dict) -> Any:
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(inner.defaults["differentiable"])
            torch._dynamo.graph_break()
            return _body_and_update(body, call_args, kwargs, update)
        finally:
            torch.set_grad_enabled(prev)

    return _with_inner_hooks(inner, args, run)


def _body_and_update(body: Callable[..., Any], args: tuple, kwargs: dict, update: Callable[[], None]) -> Any:
    out = body(*args, **kwargs)
    with torch.no_grad():  # a differentiable inner optimizer's update runs with grad; never the EMA's
        update()
    return out


def inner_step(inner: Optimizer, args: tuple) -> Any:
    """``inner.step(*args)`` without the global step hooks: those run once per step, for the
    wrapper. The inner optimizer's own step hooks still run, as torch runs them (a bad return
    value of a pre hook is refused the same way), and a profiler still shows the inner step
    (``Optimizer.step#Adam.step``) inside the wrapper's."""
    step, traceable = _class_step(inner)
    if _patched(inner) is not None or step is None:  # another patch, or unhooked
        return inner.step(*args)
    update = step.__wrapped__  # type: ignore[attr-defined]
    if not traceable:  # as Dynamo keeps it: run eagerly
        update = torch.compiler.disable(update)
    return _with_inner_hooks(inner, args, lambda call_args, kwargs: update(*call_args, **kwargs))


def _with_inner_hooks(inner: Optimizer, args: tuple, run: Callable[[tuple, dict], Any]) -> Any:
    """What torch's step wrapper (``Optimizer.profile_hook_step``) does around ``run``, but the
    global hooks: the profiler record, the inner optimizer's own pre hooks (which may replace
    the arguments) and post hooks."""
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
        call_args, kwargs = _pre_hooks(inner, (inner, *args), {})
        out = run(call_args, kwargs)
        inner._optimizer_step_code()
        for post_hook in list(inner._optimizer_step_post_hooks.values()):
            post_hook(inner, call_args, kwargs)
    return out


def _patched(inner: Optimizer) -> Optional[Callable[..., Any]]:
    """A ``step`` patched on the instance, other than an LR scheduler's (which only marks the
    step as called: :func:`_mark_called` does that). The scheduler's patch wraps the class's
    step as it was then, which Dynamo may have wrapped in its ``disable`` since (LBFGS)."""
    patched = vars(inner).get("step")
    if patched is not None and (
        getattr(patched, "_wrapped_by_lr_sched", False)  # torch's mark on that patch
        or _wraps_class_step(getattr(patched, "__wrapped__", None), inner)
    ):
        return None
    return patched


def _wraps_class_step(wrapped: Any, inner: Optimizer) -> bool:
    return any(f is wrapped for f in _chain(type(inner).step))


def _chain(step: Any) -> Iterator[Any]:
    """``step`` and what it wraps, each ``__wrapped__`` down."""
    while step is not None:
        yield step
        step = getattr(step, "__wrapped__", None)


def _mark_called(inner: Optimizer) -> None:
    """What an LR scheduler's patch of ``inner.step`` does, for the calls that bypass it
    (:meth:`Runtime.begin`, eager, before either path runs the inner update)."""
    if "step" in vars(inner) and _patched(inner) is None:  # an LR scheduler built on the inner
        inner._opt_called = True  # type: ignore[attr-defined]


def _pre_hooks(inner: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    step = type(inner).step
    for pre_hook in list(inner._optimizer_step_pre_hooks.values()):
        result = pre_hook(inner, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                )
            args, kwargs = result
    return args, kwargs


def _inside_swap(key: Any, value: Any, ema: dict[int, Tensor]) -> Any:
    """A state entry as :meth:`EMAOptimizer.state_dict` gives it inside the swap: shadows as
    copies, the swapped ones as the EMA they stand for."""
    if not (_shadows.is_key(key) and isinstance(value, Tensor)):
        return value
    return ema[id(value)] if id(value) in ema else value.clone()
