"""What one ``step()`` does to the shadows, decided on the host from the counters alone.

:func:`plan` is pure: it reads the counters and the timing, and returns the action, the
lerp weight of every shadow and the counters after the step, which the optimizer commits
once the step has succeeded. Nothing here touches a tensor.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence, Union

Decay = Union[float, Callable[[int], float]]


class Counters(NamedTuple):
    """The EMA's progress: the only form the counters have inside the optimizer."""

    steps: int  # optimizer steps seen (n)
    updates: int  # EMA updates folded in (t)
    decay_prods: tuple[float, ...]  # per shadow: product of the decays used (bias correction)

    @classmethod
    def start(cls, shadows: int) -> Counters:
        return cls(0, 0, (1.0,) * shadows)


class Timing(NamedTuple):
    """The optimizer's EMA settings that :func:`plan` needs."""

    decays: tuple[Decay, ...]  # one per shadow
    update_after_step: int
    update_every: int
    bias_correction: bool


class StepPlan(NamedTuple):
    action: str  # "copy" (ema = w), "lerp" (one EMA update) or "skip"
    weights: tuple[float, ...]  # per shadow: the lerp weight (lerp only)
    counters: Counters  # the counters once the step has succeeded


def plan(counters: Counters, timing: Timing) -> StepPlan:
    """The action of the next step, its weights and the counters after it.

    Raises ``ValueError``/``TypeError`` if a schedule returns a bad value; nothing has
    been changed then, since the caller has not started the step yet.
    """
    n = counters.steps + 1
    a, e = timing.update_after_step, timing.update_every
    if n <= a:
        return StepPlan("copy", (), counters._replace(steps=n))
    if (n - a) % e != 0:
        return StepPlan("skip", (), counters._replace(steps=n))
    t = counters.updates
    decays = [decay_at(d, t) for d in timing.decays]
    if timing.bias_correction:
        prods = tuple(p * d for p, d in zip(counters.decay_prods, decays))
        # (1 - d) / (1 - prod(d)) reweights the EMA-from-zero into its debiased form; while
        # every decay so far was exactly 1 that is 0/0, whose limit is the mean.
        weights = tuple((1.0 - d) / (1.0 - p) if p < 1.0 else 1.0 / (t + 1) for d, p in zip(decays, prods))
    else:
        prods = counters.decay_prods
        weights = tuple(1.0 - d for d in decays)
    return StepPlan("lerp", weights, Counters(n, t + 1, prods))


def may_copy(timing: Timing) -> tuple[bool, ...]:
    """Per shadow: whether an update's weight can be exactly 1 (the update is a copy): a decay
    of 0, a schedule (it may return 0), or bias correction (its first update). Fixed by the
    settings, so code that depends on it is traced once."""
    return tuple(timing.bias_correction or callable(d) or float(d) == 0.0 for d in timing.decays)


def decay_at(decay: Decay, t: int) -> float:
    """The decay of the update after ``t`` updates, checked to be a float in [0, 1]."""
    if not callable(decay):
        return float(decay)
    d = decay(t)
    if isinstance(d, bool) or not isinstance(d, numbers.Real):
        raise TypeError(f"the decay schedule must return a float, got {type(d).__name__} at t={t}")
    d = float(d)
    if not 0.0 <= d <= 1.0:  # also catches NaN
        raise ValueError(
            f"the decay schedule returned {d} at t={t} (EMA updates done); it must be in [0, 1]. "
            "Nothing was changed by this step."
        )
    return d


def check_decays(decay: Any) -> tuple[Decay, ...]:
    """``decay`` as given to the optimizer (one, or a non-empty tuple/list) as a tuple, checked."""
    decays = tuple(decay) if isinstance(decay, (tuple, list)) else (decay,)
    if not decays:
        raise ValueError(
            "decay must not be an empty sequence; pass one decay per shadow, e.g. (0.999, 0.9999)"
        )
    for i, d in enumerate(decays):
        _check_decay(d, f"decay[{i}]" if isinstance(decay, (tuple, list)) else "decay")
    return decays


def _check_decay(decay: Any, name: str) -> None:
    if callable(decay):
        return
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1] or a schedule t -> float, got {type(decay).__name__}"
        )
    if math.isnan(decay) or not 0.0 <= float(decay) <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1], got {decay}; for a half-life of h updates use schedules.half_life(h)"
        )


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def describe(decays: Sequence[Decay]) -> str:
    names = [getattr(d, "__qualname__", None) or repr(d) for d in decays]
    return names[0] if len(names) == 1 else f"({', '.join(names)})"
