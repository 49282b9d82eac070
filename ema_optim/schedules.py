"""Decay schedules for :class:`ema_optim.EMAOptimizer`.

Each factory validates its arguments once and returns a pure function ``t -> decay``
where ``t`` is the number of EMA updates already folded into the shadows (0 at the
first update). Pass the result as ``decay=``::

    >>> from ema_optim import schedules
    >>> d = schedules.polyak()
    >>> [d(t) for t in range(4)]
    [0.0, 0.5, 0.6666666666666666, 0.75]
    >>> round(schedules.half_life(10)(0) ** 10, 12)
    0.5

A rule of thumb for a constant decay ``d``: a weight's influence halves after about
``0.69 / (1 - d)`` updates (``d = 0.999`` -> ~693 updates).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from .posthoc import _real, gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = ["warmup", "polyak", "half_life", "linear", "cosine", "power", "scaled"]

Schedule = Callable[[int], float]


def _check_real(name: str, value: object) -> float:
    value = _real(name, value)  # an int beyond float64 (10 ** 400): ValueError, not OverflowError
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _check_decay(name: str, value: object) -> float:
    value = _check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_positive(name: str, value: object) -> float:
    value = _check_real(name, value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_ramp(start: object, end: object, steps: object) -> tuple[float, float, int]:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _check_decay("start", start), _check_decay("end", end), int(steps)


def warmup(
    max_decay: float = 0.9999,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
) -> Schedule:
    """Decay that grows from 0 toward ``max_decay``: ``1 - (1 + t / inv_gamma) ** -power``.

    The result is clamped to ``[min_decay, max_decay]``. With ``inv_gamma=1`` and
    ``power=2/3`` the decay reaches 0.999 after about 31.6K updates and 0.9999 after
    about 1M; ``power=3/4`` reaches 0.999 at 10K and 0.9999 at 215K updates. This is
    the warm-up of timm's ``ModelEmaV3`` and diffusers' ``EMAModel``.

    Args:
        max_decay: upper clamp, in [0, 1].
        inv_gamma: > 0; larger values slow the warm-up down.
        power: > 0; larger values speed it up.
        min_decay: lower clamp, in [0, max_decay].

    Raises:
        ValueError: for a bad argument.

    Example:
        >>> d = warmup(max_decay=0.999)
        >>> d(0), round(d(7), 4), d(10**9)
        (0.0, 0.75, 0.999)
    """
    max_decay = _check_decay("max_decay", max_decay)
    min_decay = _check_decay("min_decay", min_decay)
    inv_gamma = _check_positive("inv_gamma", inv_gamma)
    power = _check_positive("power", power)
    if min_decay > max_decay:
        raise ValueError(f"min_decay ({min_decay}) must be <= max_decay ({max_decay})")

    def decay(t: int) -> float:
        value = 1.0 - (1.0 + t / inv_gamma) ** -power
        return min(max(value, min_decay), max_decay)

    return decay


def polyak() -> Schedule:
    """Decay ``t / (t + 1)``: the shadow is the arithmetic mean of every weight averaged so far.

    This is Polyak-Ruppert averaging (Polyak and Juditsky, 1992), the average that
    ``torch.optim.swa_utils.AveragedModel`` computes by default.

    Example:
        >>> polyak()(3)
        0.75
    """

    def decay(t: int) -> float:
        return t / (t + 1.0)

    return decay


def half_life(h: float) -> Schedule:
    """Constant decay ``0.5 ** (1 / h)``: a weight's influence halves every ``h`` EMA updates.

    Args:
        h: the half-life in EMA updates, > 0.

    Example:
        >>> round(half_life(693)(0), 6)
        0.999
    """
    h = _check_positive("h", h)
    value = 0.5 ** (1.0 / h)

    def decay(t: int) -> float:
        return value

    return decay


def linear(start: float, end: float, steps: int) -> Schedule:
    """Decay that moves linearly from ``start`` to ``end`` over ``steps`` updates, then stays at ``end``.

    ``decay(t) = start + min(t / steps, 1) * (end - start)``.

    Example:
        >>> d = linear(0.9, 0.99, 10)
        >>> d(0), round(d(5), 6), d(100)
        (0.9, 0.945, 0.99)
    """
    start, end, steps = _check_ramp(start, end, steps)

    def decay(t: int) -> float:
        return start + min(t / steps, 1.0) * (end - start)

    return decay


def cosine(start: float, end: float, steps: int) -> Schedule:
    """Decay that moves from ``start`` to ``end`` along a half cosine over ``steps`` updates.

    ``decay(t) = end + (start - end) * (1 + cos(pi * min(t, steps) / steps)) / 2``.

    Example:
        >>> d = cosine(0.9, 0.99, 10)
        >>> d(0), round(d(5), 6), d(100)
        (0.9, 0.945, 0.99)
    """
    start, end, steps = _check_ramp(start, end, steps)

    def decay(t: int) -> float:
        return end + (start - end) * (1.0 + math.cos(math.pi * min(t, steps) / steps)) / 2.0

    return decay


def power(gamma: float | None = None, *, sigma_rel: float | None = None) -> Schedule:
    """The power-function EMA of Karras et al. (EDM2): ``decay(t) = (t / (t + 1)) ** (gamma + 1)``.

    After ``k`` updates of weights ``w_1..w_k`` the shadow is ``sum_s c_s w_s`` with
    ``c_s = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / k ** (gamma + 1)``: a profile that
    grows like ``s ** gamma``, so the average always covers the same *fraction* of training,
    of relative width ``sigma_rel`` (``sigma_rel = 0.05`` puts 85% of the weight on the last
    10% of the updates, ``0.10`` puts 57% there).
    ``gamma = 0`` is :func:`polyak` (the arithmetic mean, ``sigma_rel = 12 ** -0.5``).
    ``t`` counts EMA updates, so ``update_every`` and ``update_after_step`` need no correction.
    Two or more such shadows, snapshotted during training, let :mod:`ema_optim.posthoc`
    reconstruct any other ``sigma_rel`` afterwards.

    Args:
        gamma: the exponent, in ``[0, 1e100]``.
        sigma_rel: the relative width instead, in ``[1e-100, 12 ** -0.5]``; EDM2 tracks 0.05 and
            0.10. (The float64 arithmetic of the profile overflows beyond these bounds.)

    Returns:
        The schedule, with read-only attributes ``gamma`` and ``sigma_rel``
        (``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``). Only schedules
        made by ``power()`` count as power profiles in :mod:`ema_optim.posthoc`, not other
        callables with a ``gamma`` attribute.

    Raises:
        ValueError: neither or both of ``gamma`` and ``sigma_rel``, or one out of range.

    Example:
        >>> d = power(sigma_rel=0.10)
        >>> round(d.gamma, 4), d(0), round(d(9), 4)
        (6.9372, 0.0, 0.4333)

    References:
        Karras et al., `Analyzing and improving the training dynamics of diffusion models
        <https://arxiv.org/abs/2312.02696>`_, 2023 (Section 3.1, Eq. 127).
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(
            "pass exactly one of gamma (>= 0) or sigma_rel (in (0, 12 ** -0.5]), e.g. power(sigma_rel=0.05)"
        )
    if gamma is None:
        assert sigma_rel is not None  # exactly one of the two was given (checked above)
        gamma = sigma_rel_to_gamma(sigma_rel)
        sigma_rel = float(sigma_rel)  # as given, not recomputed from the rounded gamma
    else:
        sigma_rel = gamma_to_sigma_rel(gamma)
        gamma = float(gamma)
    return _Power(gamma, sigma_rel)


class _Power:
    """The schedule :func:`power` returns. Its class is what marks a power profile: only these
    shadows go into :func:`ema_optim.posthoc.snapshot` (any callable could have a ``gamma``)."""

    __slots__ = ("_gamma", "_sigma_rel", "_exponent")

    def __init__(self, gamma: float, sigma_rel: float) -> None:
        self._gamma, self._sigma_rel, self._exponent = gamma, sigma_rel, gamma + 1.0

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def sigma_rel(self) -> float:
        return self._sigma_rel

    def __call__(self, t: int) -> float:
        return (t / (t + 1.0)) ** self._exponent

    def __repr__(self) -> str:
        return f"power(gamma={self._gamma!r}, sigma_rel={self._sigma_rel!r})"

    def __reduce__(self) -> tuple:  # pickle and copy: __slots__ and read-only attributes
        return (_Power, (self._gamma, self._sigma_rel))


def _power_gamma(decay: object) -> float | None:
    """The ``gamma`` of a :func:`power` schedule; None for any other decay."""
    return decay.gamma if isinstance(decay, _Power) else None


def scaled(decay: float | Schedule, kappa: float) -> float | Schedule:
    """The EMA scaling rule: with the batch size multiplied by ``kappa``, use ``decay ** kappa``.

    Busbridge et al. show that when the batch size grows ``kappa``-fold (and the optimizer
    follows its own scaling rule, e.g. the learning rate ``kappa``-fold for SGD), an EMA
    keeps its training dynamics if its momentum ``rho`` becomes ``rho ** kappa``: one update
    of the larger batch then forgets as much as ``kappa`` updates of the smaller one did. This
    matters where the EMA feeds back into training (BYOL/DINO teachers, mean teachers,
    pseudo-labelling), and for an evaluated EMA alike.

    A constant gives a constant (``scaled(0.999, 4) == 0.999 ** 4``, so the optimizer still
    records it). A schedule written for the base run, in its EMA updates, is read where the
    base run would be after the same amount of data, ``kappa * t`` updates, and raised to
    ``kappa``: ``scaled(d, kappa)(t) == d(kappa * t) ** kappa`` (``kappa * t`` is a float
    unless ``kappa`` is an int). If your schedule is already written in the new run's
    updates (e.g. ``cosine(..., steps=total // kappa)``), use ``lambda t: d(t) ** kappa``.
    ``polyak()`` and ``power()`` profiles average a fixed *fraction* of training, the same at
    any batch size: pass them unchanged (``scaled`` refuses them).

    Args:
        decay: a decay in [0, 1] or a schedule ``t -> decay`` for the base batch size.
        kappa: new batch size / base batch size, a finite number > 0 (< 1 for a smaller batch).

    Returns:
        ``decay ** kappa`` for a constant, else a schedule.

    Raises:
        ValueError: ``kappa`` <= 0 or not finite, ``decay`` outside [0, 1], or a
            ``polyak()``/``power()`` schedule.
        TypeError: ``kappa`` or ``decay`` of the wrong type.

    Example:
        >>> scaled(0.9, 2)
        0.81
        >>> d = scaled(cosine(0.9, 0.99, steps=100), 4)   # the ramp now ends after 25 updates
        >>> round(d(0), 4), round(d(25), 4)
        (0.6561, 0.9606)

    References:
        Busbridge, Ramapuram, Ablin, Likhomanenko, Dhekane, Suau and Webb, `How to scale your
        EMA <https://arxiv.org/abs/2307.13813>`_, NeurIPS 2023 (Definition 1.2).
    """
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
        raise TypeError(
            f"kappa must be a real number (new batch size / base batch size), got {type(kappa).__name__}"
        )
    factor = _check_positive("kappa", kappa)
    if not callable(decay):
        return _check_decay("decay", decay) ** factor
    if isinstance(decay, _Power) or getattr(decay, "__qualname__", "") == "polyak.<locals>.decay":
        raise ValueError(
            "polyak() and power() average a fixed fraction of training, whatever the batch size: "
            "pass them unchanged instead of scaled(...)"
        )
    ahead = kappa if isinstance(kappa, numbers.Integral) else factor  # base updates per update

    def scaled_decay(t: int) -> float:
        d = decay(t * ahead)
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 <= d <= 1.0:
            return d  # the optimizer names the bad value before it changes anything
        return float(d) ** factor

    scaled_decay.__qualname__ = f"scaled({getattr(decay, '__qualname__', repr(decay))}, {kappa})"
    return scaled_decay
